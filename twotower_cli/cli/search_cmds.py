"""`index`, `search` and `evaluate`: put documents in an index, query it, measure retrieval."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import err, note, out
from twotower_cli.cli.main import app
from twotower_cli.cli.options import (
    ConfigOpt,
    DocumentColOpt,
    JsonOpt,
    RunOpt,
    RunsDirOpt,
)

Opt = typer.Option
IndexOpt = Annotated[Optional[str], Opt("--index", help="Index name (default: the one training built).", show_default=False)]
TopKOpt = Annotated[Optional[int], Opt("--top-k", "-k", min=1, help="Results per query.", show_default=False)]
HybridOpt = Annotated[bool, Opt("--hybrid", help="Fuse BM25 and two-tower scores (needs bm25s).")]


def run_of(runs_dir, run, config):
    from twotower_cli.runs import resolve_run

    cfg = settings(config, {("train", "runs_dir"): str(runs_dir) if runs_dir else None})
    return cfg, resolve_run(cfg.train.runs_dir, run)


def bar(description: str, total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)
    task = p.add_task(description, total=total)
    return p, (lambda done, total=None: p.update(task, completed=done, total=total))  # total None: unchanged


@command(app, "index", help="Embed a corpus file into a named index of a run (for `search`).")
def index_command(
    corpus: Annotated[Path, typer.Argument(help="Corpus: .parquet, .tsv, .csv, .jsonl or .txt (one document per line).", show_default=False)],
    run: RunOpt = None,
    name: Annotated[str, Opt("--name", help="Index name.")] = "default",
    document_col: DocumentColOpt = None,
    id_col: Annotated[Optional[str], Opt("--id-col", help="Column of document ids (default: row numbers).", show_default=False)] = None,
    dtype: Annotated[str, Opt("--dtype", help="float32 or float16 embeddings.")] = "float32",
    backend: Annotated[str, Opt("--backend", help="exact or faiss (approximate, HNSW).")] = "exact",
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.data.corpus import corpus_chunks
    from twotower_cli.errors import UsageError
    from twotower_cli.model.artifacts import load_model
    from twotower_cli.retrieval.index import build_index

    if backend not in ("exact", "faiss"):
        raise UsageError(f"--backend {backend!r}: use exact or faiss")
    cfg, run_dir = run_of(runs_dir, run, config)
    total, chunks = corpus_chunks(corpus, document_col or cfg.data.document_col, id_col)
    model, vocab, _ = load_model(run_dir)
    progress, update = bar(f"indexing {corpus.name}", total)
    with progress:
        path = build_index(run_dir, model, vocab, chunks, name, dtype=dtype, backend=backend, progress=update,
                           total=total)
    meta = json.loads((path / "meta.json").read_text())
    note(f"indexed {meta['count']:,} documents ({meta['dim']}-d {meta['dtype']}, {backend}) into {path}")


def highlight(text: str, query: str, width: int = 160):
    from rich.text import Text

    words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
    flat = " ".join(text.split())
    start = 0
    if words:  # start the snippet near the first matching word
        m = re.search("|".join(re.escape(w) for w in words), flat, re.IGNORECASE)
        if m and m.start() > width // 2:
            start = m.start() - width // 4
    snippet = ("…" if start else "") + flat[start:start + width] + ("…" if len(flat) > start + width else "")
    t = Text(snippet)
    for w in words:
        t.highlight_regex(rf"(?i)\b{re.escape(w)}\w*", "bold yellow")
    return t


@command(app, "search", help="Search a run's index with one query or a file of queries.")
def search_command(
    query: Annotated[Optional[str], typer.Argument(help="The query text.", show_default=False)] = None,
    queries: Annotated[Optional[Path], Opt("--queries", help="File of queries: one per line, or a Parquet/JSONL/CSV/TSV 'query' column.", show_default=False)] = None,
    run: RunOpt = None,
    index: IndexOpt = None,
    top_k: TopKOpt = None,
    hybrid: HybridOpt = False,
    json_out: JsonOpt = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.errors import UsageError
    from twotower_cli.retrieval.search import load_searcher

    if (query is None) == (queries is None):
        raise UsageError("give one QUERY or --queries FILE")
    if query is not None:
        texts = [query]
    else:
        from twotower_cli.data.corpus import read_queries

        texts = read_queries(queries)
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        where = "the query" if query is not None else f"{queries}: query {blank[0] + 1}"
        raise UsageError(f"{where} is empty; give some words to search for")
    cfg, run_dir = run_of(runs_dir, run, config)
    k = top_k or cfg.search.top_k
    searcher = load_searcher(run_dir, index or cfg.search.index, hybrid=hybrid, weight=cfg.search.hybrid_weight)
    t0 = time.perf_counter()
    results = searcher.search(texts, k)
    elapsed = time.perf_counter() - t0
    if json_out:
        doc = {"run": run_dir.name, "index": searcher.index.path.name, "top_k": k, "hybrid": hybrid,
               "results": [{"query": q, "hits": hits} for q, hits in zip(texts, results)]}
        out.print_json(json.dumps(doc, ensure_ascii=False))
        return
    from rich.table import Table

    for q, hits in zip(texts, results):
        table = Table(title=f"“{q}”  ({run_dir.name}, index {searcher.index.path.name})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id")
        table.add_column("document")
        for h in hits:
            table.add_row(str(h["rank"]), f"{h['score']:.3f}", str(h["id"]), highlight(h["document"], q))
        out.print(table)
    note(f"[dim]{len(texts)} queries in {1e3 * elapsed:.1f} ms over {searcher.index.meta['count']:,} documents[/]")


@command(app, "evaluate", help="Measure retrieval (MRR@10, nDCG@10, Recall@k, MAP@100) on an evaluation folder.")
def evaluate_command(
    eval_dir: Annotated[Path, typer.Argument(metavar="EVAL", help="Folder in BEIR layout or the Parquet layout (queries/corpus/qrels .parquet).", show_default=False)],
    run: RunOpt = None,
    baseline: Annotated[Optional[str], Opt("--baseline", help="Also score a baseline on the same data: bm25.", show_default=False)] = None,
    hybrid: HybridOpt = False,
    json_out: JsonOpt = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.errors import UsageError
    from twotower_cli.evaluation.evaluate import evaluate_run

    if baseline not in (None, "bm25"):
        raise UsageError(f"--baseline {baseline!r}: the only baseline is bm25")
    cfg, run_dir = run_of(runs_dir, run, config)
    progress, update = bar("embedding corpus", 1)
    with progress:
        rows = evaluate_run(run_dir, eval_dir, baseline=baseline, hybrid=hybrid, weight=cfg.search.hybrid_weight,
                            progress=update)
    if json_out:
        out.print_json(json.dumps({"run": run_dir.name, "eval": str(eval_dir), "systems": rows}))
        return
    from rich.table import Table

    names = ["mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "map@100"]
    table = Table(title=f"{eval_dir} ({rows[0]['queries']:,} queries, {rows[0]['documents']:,} documents)",
                  title_justify="left")
    table.add_column("system")
    for n in names + ["queries/s"]:
        table.add_column(n, justify="right")
    best = {n: max(r["metrics"][n] for r in rows) for n in names}
    for r in rows:
        cells = [(f"[bold]{r['metrics'][n]:.4f}[/]" if r["metrics"][n] == best[n] and len(rows) > 1
                  else f"{r['metrics'][n]:.4f}") for n in names]
        table.add_row(r["system"], *cells, f"{r['queries_per_s']:,.0f}")
    out.print(table)

"""`index`, `search` and `evaluate`: put documents in an index, query it, measure retrieval. `index` and `search`
go through the Python API (`twotower_cli.load`), so the CLI and a program using the API take one code path."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, run_of
from twotower_cli.cli.console import err, interactive, note, out, plural, print_json
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, DocumentColOpt, JsonOpt, RunOpt, RunsDirOpt, setting

Opt = typer.Option
IndexOpt = Annotated[Optional[str], setting("search", "index", "--index", metavar="NAME", help="Index name.")]
TopKOpt = Annotated[Optional[int], setting("search", "top_k", "--top-k", "-k")]
ModeOpt = Annotated[Optional[str], setting("search", "mode", "--mode", metavar="MODE")]
HybridOpt = Annotated[bool, Opt("--hybrid", metavar="", help="Fuse BM25 and the model (same as --mode hybrid).")]
DeviceOpt = Annotated[str, Opt("--device", metavar="DEVICE",
                               help="auto (a GPU when there is one), cpu, cuda or cuda:N.")]
QueryDeviceOpt = Annotated[str, Opt("--device", metavar="DEVICE",
                                    help="cpu (the NumPy query path, no torch) or cuda[:N].")]
WeightOpt = Annotated[Optional[float], Opt("--hybrid-weight", metavar="W", show_default=False,
                                           help="Weight of the model's score in a hybrid search, 0..1 (default: the "
                                                "weight chosen on validation).")]


def bar(description: str, total: int):
    """A progress bar on a terminal; nothing elsewhere (one closing line says what was done)."""
    from contextlib import nullcontext

    if not interactive():
        return nullcontext(), (lambda done, total=None: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)
    task = p.add_task(description, total=total)
    return p, (lambda done, total=None: p.update(task, completed=done, total=total))  # total None: unchanged


def resolve(device: str):
    """The torch device a command embeds on (imports torch: index and evaluate need it anyway)."""
    from twotower_cli.training.loop import resolve_device

    return resolve_device(device)


def search_mode(cfg, mode: str | None, hybrid: bool, weight: float | None) -> tuple[str | None, float | None]:
    """The mode the user asked for (None: the run's default) and the fusion weight."""
    from twotower_cli.errors import UsageError

    if weight is not None and not 0 <= weight <= 1:
        raise UsageError(f"--hybrid-weight must be between 0 and 1, got {weight}")
    if mode not in (None, "hybrid") and (hybrid or weight is not None):
        flag = "--hybrid" if hybrid else "--hybrid-weight"
        raise UsageError(f"{flag} asks for a hybrid search but --mode is {mode}; drop one of them")
    weight = None if weight is None else weight + 0.0  # (-0.0 is 0)
    mode = mode or ("hybrid" if hybrid or weight is not None else cfg.search.mode)
    if mode not in ("auto", "dense", "hybrid", "bm25"):
        raise UsageError(f"--mode {mode!r} is not one of auto, dense, hybrid, bm25")
    if mode != "hybrid":
        return (None if mode == "auto" else mode), None
    if weight is None and cfg.sources["search"]["hybrid_weight"] != "default":
        weight = cfg.search.hybrid_weight  # (a fusion the user forces; auto keeps the weight chosen on validation)
    return mode, weight


@command(app, "index", short_help="Embed a corpus into a named index of a run",
         help="Embed a corpus file into a named index of a run (for `search`).")
def index_command(
    corpus: Annotated[Path, typer.Argument(
        readable=False, metavar="CORPUS", show_default=False,
        help="Corpus: .parquet, .tsv, .csv, .jsonl (a 'document' or 'text' column) or .txt (one document per line).")],
    run: RunOpt = None,
    name: Annotated[str, Opt("--name", metavar="NAME", help="Index name.")] = "default",
    document_col: DocumentColOpt = None,
    id_col: Annotated[Optional[str], Opt(
        "--id-col", metavar="NAME", show_default=False,
        help="Column of document ids (default: row numbers).")] = None,
    dtype: Annotated[str, Opt(
        "--dtype", metavar="float32|float16", help="Precision of the stored embeddings.")] = "float32",
    backend: Annotated[str, Opt(
        "--backend", metavar="exact|faiss", help="Exact search, or FAISS HNSW (approximate).")] = "exact",
    layout: Annotated[str, Opt(
        "--layout", metavar="auto|compact|full",
        help="compact: the learned half and the exact lexical rows inverted (a third of full's size, the same "
             "ranking); full: also a hashed lexical sketch in every embedding (what --backend faiss searches); "
             "auto: compact unless the run or the backend needs full.")] = "auto",
    device: DeviceOpt = "auto",
    chunk_rows: Annotated[int, Opt(
        "--chunk-rows", metavar="N", min=1,
        help="Documents read and embedded at a time (memory holds one chunk); under torchrun the chunks are "
             "dealt to the processes in turn.")] = 65536,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.api import TwoTowerModel
    from twotower_cli.data.corpus import corpus_chunks, read_in_slices
    from twotower_cli.errors import UsageError
    from twotower_cli.retrieval.build import build_index, faiss_available, layout_for
    from twotower_cli.retrieval.index import index_dir

    if backend not in ("exact", "faiss"):
        raise UsageError(f"--backend {backend!r}: use exact or faiss")
    if dtype not in ("float32", "float16"):
        raise UsageError(f"--dtype {dtype!r}: use float32 or float16")
    index_dir(Path("."), name)  # a bad name fails before any work
    if backend == "faiss":
        faiss_available()
    cfg, run_dir = run_of(runs_dir, run, config, write=True)
    layout = layout_for(cfg.model, layout, backend)  # before any document is read
    if read_in_slices(corpus) and os.environ.get("RANK", "0") == "0":  # (under torchrun: said once)
        note(f"counting the documents of {corpus.name} (a text file this large is read in slices: once to count "
             "and check them, once to embed them)")
    total, chunks = corpus_chunks(corpus, document_col or cfg.data.document_col, id_col, chunk_rows)
    from twotower_cli.training.distributed import launched

    if launched():  # torchrun: every process embeds its share of the chunks, rank 0 writes the index
        return index_sharded(corpus, cfg, run_dir, name, document_col, id_col, chunk_rows, dtype, backend, device,
                             total, layout)
    dev = str(resolve(device))
    model = TwoTowerModel(run_dir, name, dev)
    progress, update = bar(f"indexing {corpus.name}", total)
    with progress:
        path = build_index(run_dir, model.torch_model(), model.vocab, chunks, name, device=dev, dtype=dtype,
                           backend=backend, progress=update, total=total,
                           batch_size=8192 if dev.startswith("cuda") else 2048, bm25=model.plan.mode != "dense",
                           layout=layout)
    index_notes(path, backend, total)


def index_notes(path: Path, backend: str, total: int | None, world: int = 1) -> None:
    """What `index` did: the documents stored, and those stored once or sharing an id."""
    from twotower_cli.runs import read_json

    meta = read_json(path / "meta.json")
    layout = ", compact" if meta.get("layout") == "compact" else ""
    note(f"indexed {plural(meta['count'], 'document')} ({meta['dim']}-d {meta['dtype']}, {backend}{layout}) into {path}"
         + (f" with {world} processes" if world > 1 else ""))
    if total and meta["count"] < total:
        extra = total - meta["count"]
        note(f"{extra:,} of the {total:,} documents {'repeats' if extra == 1 else 'repeat'} an earlier one word for "
             "word: each text is stored once (the first id is kept)")
    if meta.get("shared_ids"):
        note(f"{meta['shared_ids']:,} documents have the id of an earlier, different document: results show that id "
             "for each of them; give every document its own id (--id-col) to tell them apart")


def index_sharded(corpus, cfg, run_dir, name, document_col, id_col, chunk_rows, dtype, backend, device, total,
                  layout: str = "auto"):
    from contextlib import nullcontext

    from twotower_cli.api import TwoTowerModel
    from twotower_cli.data.corpus import corpus_chunks
    from twotower_cli.retrieval.sharded import build_sharded
    from twotower_cli.training.distributed import setup

    d = setup(device)
    try:
        model = TwoTowerModel(run_dir, name, str(d.device))
        progress, update = bar(f"indexing {corpus.name} ({d.world} processes)", total)
        with progress if d.main else nullcontext():
            path = build_sharded(run_dir, model.torch_model(), model.vocab,
                                 lambda: corpus_chunks(corpus, document_col or cfg.data.document_col, id_col,
                                                       chunk_rows)[1],
                                 name, d, dtype=dtype, backend=backend, progress=update, total=total,
                                 batch_size=8192 if d.device.type == "cuda" else 2048, bm25=model.plan.mode != "dense",
                                 layout=layout)
        if d.main:
            index_notes(path, backend, total, d.world)
    finally:
        d.close()


def snippet(text: str, query: str, width: int | None = 160):
    """The document, cut around the first query word on a terminal (whole when the output is a pipe or file)."""
    from rich.text import Text

    words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
    flat = " ".join(text.split())
    start = 0
    if width and words:  # start the snippet near the first matching word
        m = re.search("|".join(re.escape(w) for w in words), flat, re.IGNORECASE)
        if m and m.start() > width // 2:
            start = m.start() - width // 4
    if width:
        flat = ("…" if start else "") + flat[start:start + width] + ("…" if len(flat) > start + width else "")
    t = Text(flat)
    for w in words:
        t.highlight_regex(re.compile(rf"(?i)\b{re.escape(w)}"), "bold yellow")
    return t


@command(app, "search", short_help="Search a run's index with a query or a file of them",
         help="Search a run's index with one query or a file of queries.")
def search_command(
    query: Annotated[Optional[str], typer.Argument(
        metavar="QUERY", show_default=False, help="The query text.")] = None,
    queries: Annotated[Optional[Path], Opt(
        "--queries", readable=False, metavar="FILE", show_default=False,
        help="File of queries ('-': standard input): one per line, or a 'query'/'text' column of "
             ".parquet/.jsonl/.csv/.tsv.")] = None,
    run: RunOpt = None,
    index: IndexOpt = None,
    top_k: TopKOpt = None,
    mode: ModeOpt = None,
    hybrid: HybridOpt = False,
    hybrid_weight: WeightOpt = None,
    device: QueryDeviceOpt = "cpu",
    json_out: JsonOpt = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.api import TwoTowerModel
    from twotower_cli.errors import UsageError

    if device != "cpu":
        device = str(resolve(device))
    if (query is None) == (queries is None):
        raise UsageError("give one QUERY or --queries FILE")
    if query is not None:
        texts = [query]
    else:
        from twotower_cli.data.corpus import read_queries

        texts = read_queries(queries)
    from twotower_cli.data.vocab import blank

    empty = [i for i, t in enumerate(texts) if blank(t)]
    if empty:
        where = "the query" if query is not None else f"{queries}: query {empty[0] + 1}"
        raise UsageError(f"{where} is empty (white space or invisible characters only); give some words to search for")
    cfg, run_dir = run_of(runs_dir, run, config, {("search", "top_k"): top_k})
    mode, weight = search_mode(cfg, mode, hybrid, hybrid_weight)
    model = TwoTowerModel(run_dir, index or cfg.search.index, device)
    t0 = time.perf_counter()
    used, w = model.resolve_mode(None, mode, weight)
    results = model.search(texts, cfg.search.top_k, mode=mode, weight=weight)
    elapsed = time.perf_counter() - t0
    if json_out:
        print_json({"run": run_dir.name, "index": model.index_name, "top_k": cfg.search.top_k, "mode": used,
                    "hybrid_weight": w if used == "hybrid" else None,
                    "results": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(texts, results)]})
        return
    from rich.table import Table

    how = used + (f", dense weight {w:g}" if used == "hybrid" else "")
    width = 160 if sys.stdout.isatty() else None
    for q, hits in zip(texts, results):
        table = Table(title=f"“{q}”  ({run_dir.name}, index {model.index_name}, {how})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id")
        table.add_column("document")
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.3f}", h.id, snippet(h.document, q, width))
        out.print(table)
    note(f"[dim]{len(texts)} {'query' if len(texts) == 1 else 'queries'} in {1e3 * elapsed:.1f} ms over "
         f"{model.index.count:,} documents[/]")


@command(app, "evaluate", short_help="Score a run, BM25 and its search on an evaluation set",
         help="Measure retrieval (MRR@10, nDCG@10, Recall@k, MAP@100) on an evaluation folder.")
def evaluate_command(
    eval_dir: Annotated[Path, typer.Argument(
        readable=False, metavar="EVAL", show_default=False,
        help="Folder in BEIR layout or the Parquet layout (queries/corpus/qrels .parquet).")],
    run: RunOpt = None,
    baseline: Annotated[Optional[str], Opt(
        "--baseline", metavar="bm25", show_default=False,
        help="Also score a baseline on the same data: bm25.")] = None,
    mode: ModeOpt = None,
    hybrid: HybridOpt = False,
    hybrid_weight: WeightOpt = None,
    device: DeviceOpt = "auto",
    index: Annotated[Optional[str], Opt(
        "--index", metavar="NAME", show_default=False,
        help="Search this index of the run, built from the evaluation corpus (twotower index EVAL/corpus.parquet "
             "--id-col doc_id --name NAME), instead of embedding the corpus in memory: for corpora too large to "
             "hold.")] = None,
    json_out: JsonOpt = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.errors import UsageError
    from twotower_cli.evaluation.eval_sets import load_eval
    from twotower_cli.evaluation.evaluate import evaluate_run

    if baseline not in (None, "bm25"):
        raise UsageError(f"--baseline {baseline!r}: the only baseline is bm25")
    cfg, run_dir = run_of(runs_dir, run, config)
    mode, weight = search_mode(cfg, mode, hybrid, hybrid_weight)
    ev = load_eval(eval_dir, texts=index is None)  # a mistyped folder fails here, before any bar or model
    from contextlib import nullcontext

    progress, update = bar("embedding the corpus", len(ev.doc_ids)) if index is None else (nullcontext(), None)
    with progress:
        rows = evaluate_run(run_dir, eval_dir, baseline=baseline, mode=mode, weight=weight, progress=update, ev=ev,
                            device=str(resolve(device)), index_name=index)
    for n in ev.notes:
        note(f"[yellow]note:[/] {eval_dir}: {n}")
    if json_out:
        print_json({"run": run_dir.name, "eval": str(eval_dir), "systems": rows})
        return
    from rich.table import Table

    names = ["mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "map@100"]
    headers = ["MRR@10", "nDCG@10", "R@1", "R@10", "R@100", "MAP@100"]  # (fits 80 columns; --json: full names)
    from rich import box

    table = Table(title=f"{eval_dir} ({rows[0]['queries']:,} queries, {rows[0]['documents']:,} documents)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("system", no_wrap=True)
    for n in headers + ["q/s"]:
        table.add_column(n, justify="right", no_wrap=True)
    best = {n: max(r["metrics"][n] for r in rows) for n in names}
    for r in rows:
        cells = [(f"[bold]{r['metrics'][n]:.4f}[/]" if r["metrics"][n] == best[n] and len(rows) > 1
                  else f"{r['metrics'][n]:.4f}") for n in names]
        table.add_row(short_name(r) + (" *" if r.get("default") else ""), *cells, f"{r['queries_per_s']:,.0f}")
    out.print(table)
    for r in rows:
        out.print(f"{short_name(r)}: {r['system']}", highlight=False)
    out.print("R@k: recall@k; q/s: queries a second; * the run's default search (what `twotower search` does)",
              highlight=False)


def short_name(row: dict) -> str:
    """A system's name in a table cell: the model, bm25, or the search mode with its weight."""
    system = row["system"]
    if system.startswith("two-tower"):
        return "model"
    if system.startswith("hybrid"):
        weight = system.split("weight ", 1)[1].split(";")[0].split(")")[0] if "weight " in system else ""
        return f"hybrid {weight}".strip()
    return "bm25" if system.startswith("bm25") else system.split(" ")[0]

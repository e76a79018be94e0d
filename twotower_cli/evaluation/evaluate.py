"""Scoring retrieval: a model on token rows (validation each epoch), and a run's search on an evaluation folder
(`twotower evaluate`): the model alone, BM25 and the run's default search, each through `retrieval.search`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from twotower_cli.evaluation.eval_sets import load_eval
from twotower_cli.evaluation.metrics import retrieval_metrics
from twotower_cli.model.encode import LexicalTable, embed_tokens, lexical_rows
from twotower_cli.retrieval.search import Search
from twotower_cli.retrieval.topk import exact_topk

K = 100
CHUNK = 65536  # documents tokenised at a time


def row(system: str, ranked, ev, seconds: float) -> dict:
    return {"system": system, "metrics": retrieval_metrics(pad(ranked), ev.qrels), "queries": len(ev.qrels),
            "documents": len(ev.doc_ids), "queries_per_s": len(ev.qrels) / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate_model(model, q_tokens: torch.Tensor, d_tokens: torch.Tensor, qrels: list[dict[int, float]],
                   device, k: int = 100) -> dict[str, float]:
    """The model's embeddings alone, exact top-k: what each epoch's validation scores."""
    was_training = model.training
    model.eval()
    try:
        qe = embed_tokens(model.encode_queries, q_tokens, device)
        de = embed_tokens(model.encode_documents, d_tokens, device)
        _, idx = exact_topk(qe, de, k)
        return retrieval_metrics(idx.cpu().numpy(), qrels)
    finally:
        model.train(was_training)


def evaluate_run(run_dir: Path, eval_dir: Path, baseline: str | None = None, mode: str | None = None,
                 weight: float | None = None, progress=None, ev=None, device: str = "cpu",
                 index_name: str | None = None) -> list[dict]:
    """Rows: the model alone (always), BM25 (``baseline``), and the run's default search when it is not the model
    alone, or the search ``mode`` forced (with ``weight`` for hybrid). Each row has ``default``: whether it is what
    `twotower search` does. ``index_name``: search that index of the run (built from the evaluation corpus, its
    ids the corpus's) instead of embedding the corpus in memory."""
    from twotower_cli.model.run_encoder import RunEncoder
    from twotower_cli.retrieval.search import stored_plan

    ev = ev or load_eval(eval_dir, texts=index_name is None)
    run = RunEncoder(run_dir, device)  # the run's query side, as `search` encodes
    default = stored_plan(run_dir)
    if index_name is None:
        index, position = corpus_index(run, ev.documents, device, progress), None
    else:
        index, position = built_index(run_dir, index_name, ev)
    queries = ev.queries.to_list()
    asked = default.forced(mode, weight) if mode is not None or weight is not None else default

    def ranked(plan):
        t0 = time.perf_counter()  # query time: encode, search (the corpus is indexed beforehand)
        _, rows = Search(plan, run, index, device).rank(queries, K)
        if position is not None:  # the index's rows as the corpus's
            rows = [position[np.asarray(r, dtype=np.int64)].tolist() for r in rows]
        return rows, time.perf_counter() - t0

    rows = []
    dense_plan = default.forced("dense")
    found, seconds = ranked(dense_plan)
    rows.append({**row(f"two-tower ({run_dir.name})", found, ev, seconds), "default": default == dense_plan})
    if baseline == "bm25":
        index.bm25()  # built before the clock starts, as an index's is
        found, seconds = ranked(default.forced("bm25"))
        rows.append({**row("bm25", found, ev, seconds), "default": False})
    if asked.mode != "dense":
        why = "forced" if asked != default else "the run's default search, chosen on validation"
        name = "bm25" if asked.mode == "bm25" else f"hybrid (dense weight {asked.hybrid_weight:g}"
        name = f"{name} ({why})" if asked.mode == "bm25" else f"{name}; {why})"
        index.bm25()
        found, seconds = ranked(asked)
        rows.append({**row(name, found, ev, seconds), "default": asked == default})
    for r in rows:
        r["notes"] = ev.notes
    return rows


def built_index(run_dir: Path, name: str, ev) -> tuple:
    """The run's index ``name`` and, for each of its rows, the corpus row of its id (it must hold no other id)."""
    import polars as pl

    from twotower_cli.errors import DataError
    from twotower_cli.retrieval.index import load_index

    index = load_index(run_dir, name)
    ids = pl.Series("doc_id", index.ids.range(0, index.count) if index.ids is not None else [], dtype=pl.String)
    corpus = pl.DataFrame({"doc_id": ev.doc_ids}).with_row_index("row")
    found = pl.DataFrame({"doc_id": ids}).join(corpus, on="doc_id", how="left", maintain_order="left")["row"]
    if index.ids is None or found.null_count():
        first = ids.filter(found.is_null())[0] if index.ids is not None and len(ids) else "(none)"
        other = name if name != "default" else "eval"  # (never advise replacing the run's own index)
        raise DataError(f"index '{name}' of {Path(run_dir).name} holds documents that are not in {ev.path} (id "
                        f"{first!r}); build one from that corpus: twotower index {ev.path}/corpus.parquet "
                        f"--id-col doc_id --name {other}")
    missing = len(ev.doc_ids) - found.n_unique()
    if missing:
        ev.notes.append(f"{missing:,} documents are not in index '{name}' (an index keeps one copy of a repeated "
                        "text): they are never found")
    return index, np.append(found.to_numpy().astype(np.int64), -1)  # (row -1, a missing result, stays -1)


@torch.no_grad()
def corpus_index(run, documents, device, progress=None, chunk: int = CHUNK):
    """The documents as an in-memory index of the run (`retrieval.snapshot.Index.in_memory`): their embeddings and,
    for models with an exact lexical half, their sparse rows, tokenised a chunk at a time; BM25 built on demand."""
    from twotower_cli.retrieval.bm25 import BM25
    from twotower_cli.retrieval.snapshot import Index

    model, vocab = run.torch_model(), run.vocab
    cfg, n = model.cfg, len(documents)
    parts = []
    for s in range(0, n, chunk):
        tokens = torch.from_numpy(vocab.encode(documents.slice(s, chunk), cfg.max_document_length))
        parts.append(embed_tokens(model.encode_documents, tokens, device, batch_size=8192 if device != "cpu" else 2048,
                                  progress=(lambda done, s=s: progress(s + done, n)) if progress else None).cpu())
    embeddings = torch.cat(parts).numpy() if parts else np.zeros((0, cfg.output_dim), np.float32)
    rows, meta = None, None
    if cfg.lexical_exact:
        rows = lexical_rows(model, LexicalTable(documents, vocab, cfg.lexical_length, device), "document", device)
        meta = {"dim": cfg.lexical_dim, "buckets": cfg.ngram_buckets, "weight": cfg.lexical_weight}
    return Index.in_memory(embeddings, rows, meta, lambda: BM25.build(documents))


def pad(ranked: list[list[int]]) -> list[list[int]]:
    return [list(r) + [-1] * (K - len(r)) for r in ranked]

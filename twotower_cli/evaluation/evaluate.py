"""Scoring retrieval: a model on token rows (validation), and a run, BM25 and the run's default search on an
evaluation folder (`twotower evaluate`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twotower_cli.evaluation.eval_sets import load_eval
from twotower_cli.evaluation.metrics import retrieval_metrics
from twotower_cli.model.artifacts import load_model
from twotower_cli.model.encode import LexicalTable, embed_tokens, lexical_rows
from twotower_cli.retrieval.hybrid import CANDIDATES, fuse
from twotower_cli.retrieval.lexical import search_tokens
from twotower_cli.retrieval.topk import exact_topk

K = 100
CHUNK = 65536  # documents tokenised at a time


def row(system: str, ranked, ev, seconds: float) -> dict:
    return {"system": system, "metrics": retrieval_metrics(ranked, ev.qrels), "queries": len(ev.qrels),
            "documents": len(ev.doc_ids), "queries_per_s": len(ev.qrels) / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate_model(model, q_tokens: torch.Tensor, d_tokens: torch.Tensor, qrels: list[dict[int, float]],
                   device, k: int = 100) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        qe = embed_tokens(model.encode_queries, q_tokens, device)
        de = embed_tokens(model.encode_documents, d_tokens, device)
        _, idx = exact_topk(qe, de, k)
        return retrieval_metrics(idx.cpu().numpy(), qrels)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_run(run_dir: Path, eval_dir: Path, baseline: str | None = None, mode: str | None = None,
                 weight: float | None = None, progress=None, ev=None, device: str = "cpu") -> list[dict]:
    """Rows: the dense model alone (always), BM25 (``baseline``), and the run's default search when it is not the
    dense model alone (what training chose on validation), or the search ``mode`` forced (with ``weight`` for
    hybrid). Each row has ``default``: whether it is what `twotower search` does."""
    from twotower_cli.runs import search_choice

    ev = ev or load_eval(eval_dir)
    model, vocab, _ = load_model(run_dir, device)
    cfg = model.cfg
    choice = search_choice(run_dir)
    forced = mode is not None
    mode = mode or choice["mode"]
    w = weight if weight is not None else float(choice.get("hybrid_weight", 0.5))
    if mode == "hybrid" and not 0 < w < 1:
        w = 0.5
    de, d_rows = embed_corpus(model, vocab, ev.documents, device, progress)  # (what an index holds)
    t0 = time.perf_counter()  # query time: tokenise, embed, search (the corpus is indexed beforehand)
    q_tokens = torch.from_numpy(vocab.encode(ev.queries, cfg.max_query_length))
    qe = embed_tokens(model.encode_queries, q_tokens, device)
    # exact top-k on the device when it is a GPU (the corpus fits there); re-scored with the exact lexical half
    ds, di = search_tokens(model, qe, de, q_tokens, lambda: d_rows, max(K, CANDIDATES), device)
    dense_time = time.perf_counter() - t0
    rows = [row(f"two-tower ({run_dir.name})", di[:, :K].numpy(), ev, dense_time)]
    rows[0]["default"] = choice["mode"] == "dense"
    if baseline == "bm25" or mode != "dense":
        from twotower_cli.retrieval.bm25 import BM25

        bm = BM25.build(ev.documents.to_list())
        t0 = time.perf_counter()
        ls, li = bm.search(ev.queries.to_list(), max(K, CANDIDATES))
        bm_time = time.perf_counter() - t0
        if baseline == "bm25":
            rows.append(row("bm25", pad(li[:, :K].tolist()), ev, bm_time))
        why = "forced" if forced else "the run's default search, chosen on validation" \
            if "val_mrr@10" in choice else "the run's default search"
        if mode == "bm25":
            rows.append(row(f"bm25 ({why})", pad(li[:, :K].tolist()), ev, bm_time))
        elif mode == "hybrid":
            t0 = time.perf_counter()
            _, fi = fuse(ds.numpy(), di.numpy(), ls, li, w, K)
            rows.append(row(f"hybrid (dense weight {w:g}; {why})", pad(fi), ev,
                            bm_time + dense_time + time.perf_counter() - t0))
        if mode != "dense":  # the row of the run's own default search, unless a forced one differs from it
            rows[-1]["default"] = mode == choice["mode"] and (mode == "bm25" or
                                                            w == float(choice.get("hybrid_weight", 0.5)))
    for r in rows:
        r["notes"] = ev.notes
    return rows


def embed_corpus(model, vocab, documents, device, progress=None, chunk: int = CHUNK):
    """The documents' embeddings (on ``device``) and, for models with an exact lexical half, their sparse rows
    (read to that half's own length, a batch at a time); tokenised a chunk at a time, so memory holds one chunk's
    token rows, not the corpus's."""
    cfg, n = model.cfg, len(documents)
    parts = []
    for s in range(0, n, chunk):
        tokens = torch.from_numpy(vocab.encode(documents.slice(s, chunk), cfg.max_document_length))
        parts.append(embed_tokens(model.encode_documents, tokens, device, batch_size=8192 if device != "cpu" else 2048,
                                  progress=(lambda done, s=s: progress(s + done, n)) if progress else None))
    de = torch.cat(parts) if parts else torch.zeros(0, cfg.output_dim, device=device)
    if not cfg.lexical_exact:
        return de, None
    return de, lexical_rows(model, LexicalTable(documents, vocab, cfg.lexical_length, device), "document", device)


def pad(ranked: list[list[int]]) -> list[list[int]]:
    return [r + [-1] * (K - len(r)) for r in ranked]

"""`twotower evaluate`: a run (and optionally BM25 and the hybrid) scored on an evaluation folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twotower_cli.artifacts import load_model
from twotower_cli.evaluation import embed_tokens, load_eval
from twotower_cli.metrics import retrieval_metrics
from twotower_cli.search import CANDIDATES, fuse
from twotower_cli.topk import exact_topk

K = 100


def row(system: str, ranked, ev, seconds: float) -> dict:
    return {"system": system, "metrics": retrieval_metrics(ranked, ev.qrels), "queries": len(ev.qrels),
            "documents": len(ev.doc_ids), "queries_per_s": len(ev.qrels) / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate_run(run_dir: Path, eval_dir: Path, baseline: str | None = None, hybrid: bool = False,
                 weight: float = 0.5, progress=None) -> list[dict]:
    ev = load_eval(eval_dir)
    model, vocab, _ = load_model(run_dir)
    cfg = model.cfg
    d_tokens = torch.from_numpy(vocab.encode(ev.documents, cfg.max_document_length))
    n = d_tokens.shape[0]
    de = embed_tokens(model.encode_documents, d_tokens, "cpu",
                      progress=(lambda done: progress(done, n)) if progress else None)
    t0 = time.perf_counter()  # query time: tokenise, embed, search (the corpus is indexed beforehand)
    q_tokens = torch.from_numpy(vocab.encode(ev.queries, cfg.max_query_length))
    qe = embed_tokens(model.encode_queries, q_tokens, "cpu")
    ds, di = exact_topk(qe, de, max(K, CANDIDATES))
    rows = [row(f"two-tower ({run_dir.name})", di[:, :K].numpy(), ev, time.perf_counter() - t0)]
    if baseline == "bm25" or hybrid:
        from twotower_cli.bm25 import BM25

        bm = BM25.build(ev.documents.to_list())
        t0 = time.perf_counter()
        ls, li = bm.search(ev.queries.to_list(), max(K, CANDIDATES))
        bm_time = time.perf_counter() - t0
        if baseline == "bm25":
            rows.append(row("bm25", li[:, :K], ev, bm_time))
        if hybrid:
            t0 = time.perf_counter()
            fs, fi = fuse(ds.numpy(), di.numpy(), ls, li, weight, K)
            rows.append(row(f"hybrid (dense weight {weight:g})", [r + [-1] * (K - len(r)) for r in fi], ev,
                            bm_time + rows[0]["queries"] / rows[0]["queries_per_s"] + time.perf_counter() - t0))
    return rows

"""Scoring retrieval: a model on token rows (validation), and a run, BM25 and the run's default search on an
evaluation folder (`twotower evaluate`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twotower_cli.evaluation.eval_sets import load_eval
from twotower_cli.evaluation.metrics import retrieval_metrics
from twotower_cli.model.artifacts import load_model
from twotower_cli.model.encode import embed_tokens
from twotower_cli.retrieval.search import CANDIDATES, fuse
from twotower_cli.retrieval.topk import exact_topk

K = 100


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


def search_choice(run_dir: Path) -> dict:
    """What training chose as the run's default search (run.json); runs from before the choice: dense."""
    from twotower_cli.runs import read_json_or

    run = read_json_or(Path(run_dir) / "run.json", {})
    choice = run.get("search") if isinstance(run, dict) else None
    return choice if isinstance(choice, dict) and choice.get("mode") in ("dense", "hybrid", "bm25") else \
        {"mode": "dense", "hybrid_weight": 0.5}


@torch.no_grad()
def evaluate_run(run_dir: Path, eval_dir: Path, baseline: str | None = None, hybrid: bool = False,
                 weight: float | None = None, progress=None) -> list[dict]:
    """Rows: the dense model alone, BM25 (``baseline``), and the run's default search when it is not the dense
    model (the fusion chosen on validation), or the fusion at ``weight`` when ``hybrid`` forces it."""
    ev = load_eval(eval_dir)
    model, vocab, _ = load_model(run_dir)
    cfg = model.cfg
    choice = search_choice(run_dir)
    mode = "hybrid" if hybrid else choice["mode"]
    w = weight if weight is not None else float(choice.get("hybrid_weight", 0.5))
    d_tokens = torch.from_numpy(vocab.encode(ev.documents, cfg.max_document_length))
    n = d_tokens.shape[0]
    de = embed_tokens(model.encode_documents, d_tokens, "cpu",
                      progress=(lambda done: progress(done, n)) if progress else None)
    t0 = time.perf_counter()  # query time: tokenise, embed, search (the corpus is indexed beforehand)
    q_tokens = torch.from_numpy(vocab.encode(ev.queries, cfg.max_query_length))
    qe = embed_tokens(model.encode_queries, q_tokens, "cpu")
    ds, di = exact_topk(qe, de, max(K, CANDIDATES))
    dense_time = time.perf_counter() - t0
    rows = [row(f"two-tower ({run_dir.name})", di[:, :K].numpy(), ev, dense_time)]
    rows[0]["default"] = mode == "dense"
    if baseline == "bm25" or mode != "dense":
        from twotower_cli.retrieval.bm25 import BM25

        bm = BM25.build(ev.documents.to_list())
        t0 = time.perf_counter()
        ls, li = bm.search(ev.queries.to_list(), max(K, CANDIDATES))
        bm_time = time.perf_counter() - t0
        if baseline == "bm25":
            rows.append(row("bm25", li[:, :K], ev, bm_time))
        if mode == "bm25":
            rows.append(row("bm25 (the run's default search, chosen on validation)", li[:, :K], ev, bm_time))
        elif mode == "hybrid":
            t0 = time.perf_counter()
            fs, fi = fuse(ds.numpy(), di.numpy(), ls, li, w, K)
            why = "forced by --hybrid" if hybrid and weight is not None else "chosen on validation" \
                if "val_mrr@10" in choice else "configured"
            rows.append(row(f"hybrid (dense weight {w:g}, {why})", [r + [-1] * (K - len(r)) for r in fi], ev,
                            bm_time + dense_time + time.perf_counter() - t0))
        if mode != "dense":
            rows[-1]["default"] = True
    return rows

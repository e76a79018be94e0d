"""Answering queries: embed them, search the dense index, optionally fuse with BM25 (hybrid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from twotower_cli.artifacts import load_model
from twotower_cli.evaluation import embed_tokens
from twotower_cli.index import Index, load_index

CANDIDATES = 100  # each side's list that hybrid fusion re-ranks


def fuse(dense_s, dense_i, lex_s, lex_i, weight: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of min-max normalised scores over the union of both candidate lists, per query.

    A document missing from one list gets that list's lowest normalised score (0)."""
    out_s, out_i = [], []
    for ds, di, ls, li in zip(dense_s, dense_i, lex_s, lex_i):
        scores: dict[int, float] = {}
        for s, i, w in ((ds, di, weight), (ls, li, 1.0 - weight)):
            s = np.asarray(s, dtype=np.float64)
            lo, hi = (s.min(), s.max()) if s.size else (0.0, 0.0)
            norm = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
            for doc, v in zip(np.asarray(i).tolist(), norm.tolist()):
                if doc >= 0:
                    scores[doc] = scores.get(doc, 0.0) + w * v
        best = sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:k]
        out_s.append([b[1] for b in best])
        out_i.append([b[0] for b in best])
    return out_s, out_i


class Searcher:
    def __init__(self, run_dir: Path, index: Index, model, vocab, bm25=None, weight: float = 0.5):
        self.run_dir, self.index, self.model, self.vocab = run_dir, index, model, vocab
        self.bm25, self.weight = bm25, weight

    def embed(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.from_numpy(self.vocab.encode(pl.Series(texts, dtype=pl.String), self.model.cfg.max_query_length))
        return embed_tokens(self.model.encode_queries, tokens, "cpu", batch_size=4096)

    def rank(self, texts: list[str], k: int):
        """Scores and index rows [Q, <=k], best first."""
        qe = self.embed(texts)
        if self.bm25 is None:
            s, i = self.index.search(qe, k)
            return s.tolist(), i.tolist()
        ds, di = self.index.search(qe, max(k, CANDIDATES))
        ls, li = self.bm25.search(texts, max(k, CANDIDATES))
        return fuse(ds.numpy(), di.numpy(), ls, li, self.weight, k)

    def search(self, texts: list[str], k: int) -> list[list[dict]]:
        scores, rows = self.rank(texts, k)
        wanted = sorted({r for rr in rows for r in rr})
        docs = dict(zip(wanted, self.index.documents(wanted)))
        return [[{"rank": j + 1, "score": round(float(s), 6), "id": docs[r]["id"], "document": docs[r]["document"]}
                 for j, (s, r) in enumerate(zip(ss, rr))] for ss, rr in zip(scores, rows)]


def load_bm25(index: Index):
    """The BM25 index stored beside the dense one; built (and saved) on first use if training skipped it."""
    from twotower_cli.bm25 import BM25

    folder = index.path / "bm25"
    if folder.is_dir():
        return BM25.load(folder)
    return save_bm25(index.path, pl.read_parquet(index.path / "documents" / "*.parquet")["document"].to_list())


def save_bm25(index_path: Path, documents: list[str]):
    import os
    import shutil

    from twotower_cli.bm25 import BM25

    bm = BM25.build(documents)
    tmp = index_path / f".bm25.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bm.save(tmp)
    os.replace(tmp, index_path / "bm25")
    return bm


def load_searcher(run_dir: Path, index_name: str, hybrid: bool = False, weight: float = 0.5) -> Searcher:
    index = load_index(run_dir, index_name)
    model, vocab, _ = load_model(run_dir)
    return Searcher(run_dir, index, model, vocab, load_bm25(index) if hybrid else None, weight)

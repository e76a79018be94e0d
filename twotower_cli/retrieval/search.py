"""Answering queries: embed them, search the dense index, optionally fuse with BM25 (hybrid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from twotower_cli.model.artifacts import load_model
from twotower_cli.model.encode import embed_tokens
from twotower_cli.retrieval.bm25 import load_bm25
from twotower_cli.retrieval.hybrid import CANDIDATES, fuse
from twotower_cli.retrieval.index import Index, load_index


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


def load_searcher(run_dir: Path, index_name: str, hybrid: bool = False, weight: float = 0.5) -> Searcher:
    index = load_index(run_dir, index_name)
    model, vocab, _ = load_model(run_dir)
    return Searcher(run_dir, index, model, vocab, load_bm25(index) if hybrid else None, weight)

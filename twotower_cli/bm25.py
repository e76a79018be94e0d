"""BM25 (the `bm25s` package, Lucene variant, k1 1.5, b 0.75, lowercase + English stop words): the lexical
baseline of `evaluate --baseline bm25` and the lexical half of hybrid search. An optional extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twotower_cli.errors import UsageError


def bm25s_module():
    try:
        import bm25s
    except ImportError:
        raise UsageError("BM25 needs the bm25s package: pip install 'twotower-cli[bm25]'") from None
    return bm25s


class BM25:
    def __init__(self, retriever):
        self.retriever = retriever

    @classmethod
    def build(cls, documents: list[str]) -> "BM25":
        bm25s = bm25s_module()
        retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
        return cls(retriever)

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        bm25s = bm25s_module()
        return cls(bm25s.BM25.load(str(folder), load_corpus=False, mmap=False))

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and document rows [Q, k]; rows with no matching term are filled with score 0."""
        bm25s = bm25s_module()
        n = self.retriever.scores["num_docs"]
        k = min(k, n)
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return np.asarray(scores), np.asarray(docs)

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
    """``retriever`` is None for a corpus with no indexable word at all (every text empty, one-letter words or stop
    words): every document then scores 0, in row order."""

    def __init__(self, retriever, n_docs: int):
        self.retriever, self.n_docs = retriever, n_docs

    @classmethod
    def build(cls, documents: list[str]) -> "BM25":
        bm25s = bm25s_module()
        tokens = bm25s.tokenize(documents, stopwords="en", show_progress=False)
        if not tokens.vocab:
            return cls(None, len(documents))
        retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        retriever.index(tokens, show_progress=False)
        return cls(retriever, len(documents))

    def save(self, folder: Path) -> None:
        import json

        if self.retriever is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "empty.json").write_text(json.dumps({"num_docs": self.n_docs}))
            return
        self.retriever.save(str(folder), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        import json

        if (folder / "empty.json").exists():
            return cls(None, int(json.loads((folder / "empty.json").read_text())["num_docs"]))
        bm25s = bm25s_module()
        retriever = bm25s.BM25.load(str(folder), load_corpus=False, mmap=False)
        return cls(retriever, int(retriever.scores["num_docs"]))

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and document rows [Q, k]; rows with no matching term are filled with score 0."""
        k = min(k, self.n_docs)
        if self.retriever is None:
            return np.zeros((len(queries), k)), np.tile(np.arange(k), (len(queries), 1))
        bm25s = bm25s_module()
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return np.asarray(scores), np.asarray(docs)


def load_bm25(index) -> BM25:
    """The BM25 index stored beside the dense one (``index.path / "bm25"``); built on first use when the index has
    none, and saved there when the folder is writable (reading a run never needs write access)."""
    import polars as pl

    folder = index.path / "bm25"
    if folder.is_dir():
        return BM25.load(folder)
    documents = pl.read_parquet(index.path / "documents" / "*.parquet")["document"].to_list()
    try:
        return save_bm25(index.path, documents)
    except OSError:  # a read-only run: build it for this process only
        return BM25.build(documents)


def save_bm25(index_path: Path, documents: list[str]) -> BM25:
    """Build BM25 over ``documents`` and save it as ``index_path / "bm25"`` (written aside, then renamed)."""
    import os
    import shutil

    bm = BM25.build(documents)
    tmp = index_path / f".bm25.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bm.save(tmp)
        os.replace(tmp, index_path / "bm25")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bm

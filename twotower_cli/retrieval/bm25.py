"""BM25 (the `bm25s` package builds it: Lucene variant, k1 1.5, b 0.75, lowercase, English stop words): the lexical
baseline of `evaluate --baseline bm25` and the lexical side of hybrid search.

bm25s precomputes every (term, document) score into a sparse matrix; a query only sums the columns of its terms.
That part is done here in NumPy, on the matrix bm25s saved (mapped from disk), with bm25s' own tokenisation
rules and stop words (saved beside the index), so answering a query imports neither bm25s nor torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError, UsageError

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s' default token pattern


def bm25s_module():
    try:
        import bm25s
    except ImportError:
        raise UsageError("BM25 needs the bm25s package: pip install bm25s") from None
    return bm25s


class BM25:
    """Scores [n_docs] of a query are ``data`` summed over the columns of its terms (CSC: ``indptr`` per term)."""

    def __init__(self, data, indices, indptr, vocab: dict[str, int], n_docs: int, stopwords: set[str]):
        self.data, self.indices, self.indptr = data, indices, indptr
        self.vocab, self.n_docs, self.stopwords = vocab, n_docs, stopwords

    @classmethod
    def build(cls, documents: list[str]) -> "BM25":
        bm25s = bm25s_module()
        from bm25s.stopwords import STOPWORDS_EN

        stop = set(STOPWORDS_EN)
        tokens = bm25s.tokenize(documents, stopwords="en", show_progress=False)
        if not tokens.vocab:  # no indexable word at all (empty texts, one-letter words, stop words)
            empty = np.zeros(0, dtype=np.float32)
            return cls(empty, np.zeros(0, np.int32), np.zeros(1, np.int64), {}, len(documents), stop)
        retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        retriever.index(tokens, show_progress=False)
        s = retriever.scores
        return cls(s["data"], s["indices"], s["indptr"], dict(retriever.vocab_dict), len(documents), stop)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("data", "indices", "indptr"):
            np.save(folder / f"{name}.npy", getattr(self, name))
        (folder / "bm25.json").write_text(json.dumps({"format": "twotower-bm25", "num_docs": self.n_docs,
                                                     "k1": 1.5, "b": 0.75, "method": "lucene",
                                                     "stopwords": sorted(self.stopwords), "vocab": self.vocab},
                                                    ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "bm25.json").read_text(encoding="utf-8"))
            arrays = [np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("data", "indices", "indptr")]
            vocab = meta["vocab"]
            n_docs = int(meta["num_docs"])
            terms = max((v for t, v in vocab.items() if t), default=-1) + 1 if isinstance(vocab, dict) else -1
            if terms < 0 or arrays[2].shape[0] < terms + 1 or int(arrays[2][-1]) != arrays[0].shape[0]:
                raise ValueError("the vocabulary does not match the score matrix")
        except FileNotFoundError:
            raise ArtifactError(f"{folder}: the BM25 index is incomplete; rebuild it with twotower index") from None
        except (ValueError, KeyError, TypeError, EOFError, OSError) as exc:
            raise ArtifactError(f"{folder}: the BM25 index is damaged ({exc}); rebuild it with twotower "
                                "index") from None
        return cls(*arrays, vocab, n_docs, set(meta.get("stopwords", [])))

    def term_ids(self, text: str) -> list[int]:
        """bm25s' tokenisation: lowercase, words of two or more word characters, stop words dropped; terms that
        no document has are left out (repeated terms count again, as in bm25s)."""
        return [self.vocab[t] for t in TOKEN.findall(text.lower())
                if t not in self.stopwords and t in self.vocab and self.vocab[t] + 1 < len(self.indptr)]

    def scores(self, text: str) -> np.ndarray:
        spans = [(int(self.indptr[t]), int(self.indptr[t + 1])) for t in self.term_ids(text)]
        if not spans:
            return np.zeros(self.n_docs, dtype=np.float32)
        rows = np.concatenate([self.indices[a:b] for a, b in spans])
        values = np.concatenate([self.data[a:b] for a, b in spans]).astype(np.float64)
        return np.bincount(rows, weights=values, minlength=self.n_docs).astype(np.float32)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and document rows [Q, min(k, n)], best first (ties: lower row first; no match scores 0)."""
        k = min(k, self.n_docs)
        out_s = np.zeros((len(queries), k), dtype=np.float32)
        out_i = np.zeros((len(queries), k), dtype=np.int64)
        for j, q in enumerate(queries):
            s = self.scores(q)
            top = np.argpartition(-s, k - 1)[:k] if k < s.size else np.arange(s.size)
            order = top[np.lexsort((top, -s[top]))]
            out_s[j], out_i[j] = s[order], order
        return out_s, out_i


def load_bm25(index) -> BM25:
    """The BM25 index saved beside a dense index (``index.path / "bm25"``); built on first use when the index has
    none, and saved there when the folder is writable (reading a run never needs write access)."""
    folder = index.path / "bm25"
    if (folder / "bm25.json").is_file():
        return BM25.load(folder)
    documents = read_all_documents(index)
    try:
        return save_bm25(index.path, documents)
    except OSError:  # a read-only run: build it for this process only
        return BM25.build(documents)


def read_all_documents(index) -> list[str]:
    if (index.path / "texts.bin").exists():
        data = (index.path / "texts.bin").read_bytes()
        offsets = np.load(index.path / "texts.offsets.npy")
        return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    import polars as pl

    return pl.read_parquet(index.path / "documents" / "*.parquet")["document"].to_list()


def save_bm25(index_path: Path, documents: list[str]) -> BM25:
    """Build BM25 over ``documents`` and save it as ``index_path / "bm25"`` (written aside, then renamed)."""
    import os
    import shutil

    bm = BM25.build(documents)
    tmp = Path(index_path) / f".bm25.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bm.save(tmp)
        old = Path(index_path) / "bm25"
        if old.exists():  # an older layout (bm25s' own files): replaced
            shutil.rmtree(old)
        os.replace(tmp, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bm

"""BM25 as the `bm25s` package scores it (Lucene variant, k1 1.5, b 0.75, lowercase, English stop words): the
lexical baseline of `evaluate --baseline bm25` and the lexical side of hybrid search.

Every (term, document) score is precomputed into a sparse matrix, a column per term; a query only sums the columns
of its terms. Both are done here in NumPy with bm25s' tokenisation rules and stop words (saved beside the index):
building streams the documents in two passes (memory: the vocabulary, not the texts), and answering a query,
on the matrix mapped from disk, imports neither bm25s nor torch. A test holds the scores equal to bm25s'.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.model.files import load_npy

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s' default token pattern
K1, B = 1.5, 0.75
ARRAYS = ("data", "indices", "indptr")
VERIFY_UP_TO = 64 << 20  # BM25 files up to this size are checked against bm25.json's sha256 when loaded


def stop_words() -> set[str]:
    """bm25s' English stop words (building needs the package for this list only)."""
    bm25s_module()
    from bm25s.stopwords import STOPWORDS_EN

    return set(STOPWORDS_EN)


def terms(text: str, stop: set[str]) -> list[str]:
    """bm25s' tokenisation: lowercase, words of two or more word characters, stop words dropped."""
    return [t for t in TOKEN.findall(text.lower()) if t not in stop]


def texts_of(documents, a: int, b: int) -> list[str]:
    """Rows a..b of a list, a Polars Series or a `TextStore` (read from disk), as a list of strings."""
    if hasattr(documents, "range"):
        return documents.range(a, min(b, len(documents)))
    part = documents[a:b]
    return part.to_list() if hasattr(part, "to_list") else list(part)


def bm25s_module():
    try:
        import bm25s
    except ImportError:
        raise UsageError("BM25 needs the bm25s package: pip install bm25s") from None
    return bm25s


class BM25:
    """Scores [n_docs] of a query are ``data`` summed over the columns of its terms (CSC: ``indptr`` per term)."""

    def __init__(self, data, indices, indptr, vocab: dict[str, int], n_docs: int, stopwords: set[str],
                 folder: Path | None = None):
        self.data, self.indices, self.indptr = data, indices, indptr
        self.vocab, self.n_docs, self.stopwords, self.folder = vocab, n_docs, stopwords, folder

    @classmethod
    def build(cls, documents, folder: Path | None = None, chunk: int = 65536) -> "BM25":
        """BM25 over ``documents`` (a list, a Polars Series or a `TextStore`, read ``chunk`` rows at a time) in
        two passes over the texts, so that memory holds the vocabulary and a length per document, not every text
        or its terms (bm25s, which built it before, takes a list of every text and keeps all their tokens): the
        first pass counts each term's documents, the second writes each (term, document) score into the term's
        column. With ``folder`` the columns are written straight into its files (mapped), and the BM25 is saved
        there. bm25s' tokenisation, stop words and Lucene scores: a test holds the scores equal to bm25s'."""
        stop = stop_words()
        n = len(documents)
        vocab: dict[str, int] = {}
        df: list[int] = []
        lengths = np.zeros(n, dtype=np.int64)
        for a in range(0, n, chunk):  # pass 1: document frequencies and lengths
            for j, text in enumerate(texts_of(documents, a, a + chunk)):
                words = terms(text, stop)
                lengths[a + j] = len(words)
                for t in dict.fromkeys(words):  # each term once, in order (ids do not depend on hashing)
                    i = vocab.get(t)
                    if i is None:
                        i = vocab[t] = len(df)
                        df.append(0)
                    df[i] += 1
        dfs = np.asarray(df, dtype=np.int64)
        indptr = np.zeros(len(dfs) + 1, dtype=np.int64)
        np.cumsum(dfs, out=indptr[1:])
        nnz = int(indptr[-1])
        if folder is not None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "indptr.npy", indptr)
        alloc = (lambda name, dtype: np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, (nnz,))) \
            if folder is not None else (lambda name, dtype: np.empty(nnz, dtype=dtype))
        data, indices = alloc("data", np.float32), alloc("indices", np.int32)
        idf = np.log(1.0 + (n - dfs + 0.5) / (dfs + 0.5))
        avg = float(lengths.mean()) if n else 1.0
        cursor = indptr[:-1].copy()
        for a in range(0, n if nnz else 0, chunk):  # pass 2: the scores, column by column
            term, doc, tf = [], [], []
            for j, text in enumerate(texts_of(documents, a, a + chunk)):
                counts = Counter(terms(text, stop))
                term.extend(vocab[t] for t in counts)
                doc.extend([a + j] * len(counts))
                tf.extend(counts.values())
            if not term:
                continue
            term, doc, tf = np.asarray(term), np.asarray(doc, dtype=np.int64), np.asarray(tf, dtype=np.float64)
            score = idf[term] * tf / (K1 * (1 - B + B * lengths[doc] / avg) + tf)
            order = np.argsort(term, kind="stable")  # by term; by document within a term
            t = term[order]
            first, size = np.unique(t, return_index=True, return_counts=True)[1:]
            pos = cursor[t] + np.arange(t.size) - np.repeat(first, size)
            data[pos], indices[pos] = score[order], doc[order]
            cursor[t[first]] += size
        bm = cls(data, indices, indptr, vocab, n, stop)
        if folder is not None:
            data.flush()
            indices.flush()
            bm.write_meta(folder)
        return bm

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name))
        self.write_meta(folder)

    def write_meta(self, folder: Path) -> None:
        """bm25.json, written last: the vocabulary, the settings and the three arrays' sha256."""
        from twotower_cli.retrieval.index import file_digest

        digests = {name: file_digest(folder / f"{name}.npy") for name in ARRAYS}
        (folder / "bm25.json").write_text(json.dumps({"format": "twotower-bm25", "num_docs": self.n_docs,
                                                     "k1": K1, "b": B, "method": "lucene", "sha256": digests,
                                                     "stopwords": sorted(self.stopwords), "vocab": self.vocab},
                                                    ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        folder = Path(folder)
        try:
            if (folder / "bm25.json").exists() and not (folder / "bm25.json").is_file():  # (a device is never read)
                raise ValueError("bm25.json is not a regular file")
            meta = json.loads((folder / "bm25.json").read_text(encoding="utf-8"))
            arrays = [load_npy(folder / f"{n}.npy") for n in ARRAYS]
            verify(folder, arrays, meta.get("sha256"))
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
        return cls(*arrays, vocab, n_docs, set(meta.get("stopwords", [])), folder)

    def term_ids(self, text: str) -> list[int]:
        """The query's terms (`terms`) that some document has (repeated terms count again, as in bm25s)."""
        return [self.vocab[t] for t in terms(text, self.stopwords)
                if t in self.vocab and self.vocab[t] + 1 < len(self.indptr)]

    def scores(self, text: str) -> np.ndarray:
        spans = [(int(self.indptr[t]), int(self.indptr[t + 1])) for t in self.term_ids(text)]
        if not spans:
            return np.zeros(self.n_docs, dtype=np.float32)
        rows = np.concatenate([self.indices[a:b] for a, b in spans])
        values = np.concatenate([self.data[a:b] for a, b in spans]).astype(np.float64)
        if not np.isfinite(values).all() or (rows.size and not 0 <= int(rows.min()) <= int(rows.max()) < self.n_docs):
            raise ArtifactError(f"{self.folder or 'BM25'}: its scores of a query term are damaged (not finite, or "
                                "naming no document); rebuild the index")
        return np.bincount(rows, weights=values, minlength=self.n_docs).astype(np.float32)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and document rows [Q, min(k, n)], best first (ties: lower row first, across the k-th place too;
        no match scores 0)."""
        from twotower_cli.retrieval.fusion import best_rows

        k = min(k, self.n_docs)
        out_s = np.zeros((len(queries), k), dtype=np.float32)
        out_i = np.zeros((len(queries), k), dtype=np.int64)
        for j, q in enumerate(queries):
            s = self.scores(q)
            order = best_rows(s, k)
            out_s[j], out_i[j] = s[order], order
        return out_s, out_i


def verify(folder: Path, arrays: list[np.ndarray], digests) -> None:
    """The arrays against bm25.json's sha256 when they are small enough to read at every load."""
    if not isinstance(digests, dict) or sum(a.nbytes for a in arrays) > VERIFY_UP_TO:
        return
    from twotower_cli.retrieval.index import file_digest

    for name in ARRAYS:
        if file_digest(folder / f"{name}.npy") != digests.get(name):
            raise ValueError(f"{name}.npy does not match its checksum in bm25.json")


def load_bm25(index) -> BM25:
    """The BM25 side saved in an index (``index.path / "bm25"``); built on first use when the index has none, and
    saved there when the folder is writable (reading a run never needs write access)."""
    folder = index.path / "bm25"
    if (folder / "bm25.json").is_file():
        return BM25.load(folder)
    try:
        return save_bm25(index.path, index.texts if index.texts is not None else index.all_documents())
    except OSError:  # a read-only run: built for this process only
        return BM25.build(index.texts if index.texts is not None else index.all_documents())


def save_bm25(index_path: Path, documents) -> BM25:
    """Build BM25 over ``documents`` into ``index_path / "bm25"`` (written aside, then renamed; see `BM25.build`
    for what ``documents`` may be)."""
    import os
    import shutil

    for left in Path(index_path).glob(".bm25.tmp-*"):  # a killed builder's (a live one's is left alone)
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(index_path) / f".bm25.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    final = Path(index_path) / "bm25"
    try:
        BM25.build(documents, tmp)
        if final.exists():  # another layout (bm25s' own files): replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BM25.load(final)


def alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

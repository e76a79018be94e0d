"""The documents' exact lexical rows inverted: for each n-gram bucket, the documents that hold it (ascending) and
their weights. What a search engine keeps instead of a vector per document: a query reads only its own buckets'
lists, so the exact lexical score of every document costs the length of those lists, not the size of the corpus,
and the hashed sketch in every embedding (1,024 of its 1,152 numbers) is no longer needed to find candidates.

Built from rows arriving chunk by chunk in bounded memory (``PostingsWriter``): each chunk's entries, sorted by
bucket, go to a run file; the lists are then assembled bucket range by bucket range from every run (documents
arrive in row order, so each list comes out sorted). NumPy only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twotower_cli.retrieval.meta_file import POSTINGS_PARTS as FILES  # (one list of the files, for meta.json too)

PREFIX = "postings"


@dataclass
class Postings:
    """List of bucket b: ``docs[indptr[b]:indptr[b + 1]]`` (ascending rows), with ``weights`` alike."""
    indptr: np.ndarray
    docs: np.ndarray
    weights: np.ndarray

    @property
    def buckets(self) -> int:
        return int(self.indptr.shape[0]) - 1

    def lengths(self, buckets: np.ndarray) -> np.ndarray:
        return self.indptr[buckets + 1] - self.indptr[buckets]

    def scores(self, buckets: np.ndarray, weights: np.ndarray, count: int, out: np.ndarray | None = None,
               longest: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The lexical score of every document holding one of the query's ``buckets`` (with their query
        ``weights``): (rows, scores), rows ascending. Lists longer than ``longest`` are left out (a first pass:
        `at` adds them for the candidates). ``out``: a zeroed float32 scratch of ``count`` entries, left zeroed."""
        scratch = np.zeros(count, dtype=np.float32) if out is None else out
        touched = []
        for b, w in zip(buckets.tolist(), weights.tolist()):
            a, e = int(self.indptr[b]), int(self.indptr[b + 1])
            if e == a or (longest is not None and e - a > longest):
                continue
            docs = self.docs[a:e]
            scratch[docs] += np.float32(w) * self.weights[a:e].astype(np.float32)  # a list holds a row once
            touched.append(docs)
        if not touched:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        rows = np.unique(np.concatenate(touched)).astype(np.int64)
        values = scratch[rows]
        scratch[rows] = 0.0
        return rows, values

    def at(self, buckets: np.ndarray, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The exact lexical scores of ``rows`` (ascending, unique): each query bucket's list searched for them."""
        out = np.zeros(rows.shape[0], dtype=np.float32)
        if not rows.size:
            return out
        for b, w in zip(buckets.tolist(), weights.tolist()):
            a, e = int(self.indptr[b]), int(self.indptr[b + 1])
            if e == a:
                continue
            docs = self.docs[a:e]
            # only the part of the list between the first and last candidate is searched (pages read: a few)
            lo, hi = np.searchsorted(docs, [rows[0], rows[-1] + 1])
            if lo == hi:
                continue
            part = docs[lo:hi]
            pos = np.minimum(np.searchsorted(part, rows), part.shape[0] - 1)
            hit = part[pos] == rows
            out[hit] += np.float32(w) * self.weights[a + lo + pos[hit]].astype(np.float32)
        return out

    def save(self, folder: Path) -> None:
        for name in FILES:
            np.save(Path(folder) / f"{PREFIX}.{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path, count: int, buckets: int) -> "Postings":
        """Read (or map, `files.load_npy`); ValueError when the files do not fit together or the index."""
        from twotower_cli.model.files import load_npy

        arrays = [load_npy(Path(folder) / f"{PREFIX}.{name}.npy") for name in FILES]
        indptr, docs, weights = arrays
        if indptr.dtype != np.int64 or docs.dtype != np.uint32 or weights.dtype not in (np.float16, np.float32):
            raise ValueError("its files have the wrong number types")
        if indptr.shape != (buckets + 1,) or docs.ndim != 1 or docs.shape != weights.shape \
                or int(indptr[0]) != 0 or int(indptr[-1]) != docs.shape[0]:
            raise ValueError(f"its lists do not fit together or the {buckets:,} buckets of the model")
        if count > np.iinfo(np.uint32).max:
            raise ValueError("more documents than its row numbers hold")
        return cls(indptr, docs, weights)


def from_rows(indptr: np.ndarray, buckets: np.ndarray, weights: np.ndarray, n_buckets: int,
              dtype=np.float32) -> Postings:
    """The postings of rows held in memory (CSR: ``indptr``, ``buckets``, ``weights``)."""
    doc = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.uint32), np.diff(indptr))
    order = np.argsort(buckets, kind="stable")  # rows stay ascending within a bucket
    out_ptr = np.zeros(n_buckets + 1, dtype=np.int64)
    np.cumsum(np.bincount(buckets, minlength=n_buckets), out=out_ptr[1:])
    return Postings(out_ptr, doc[order], weights[order].astype(dtype))


class PostingsWriter:
    """Postings of rows added chunk by chunk, in memory bounded by a chunk and ``range_entries``: each chunk's
    entries sorted by bucket go to run files in ``folder``; `close` assembles the lists range by range."""

    def __init__(self, folder: Path, n_buckets: int, dtype=np.float32, range_entries: int = 1 << 25):
        self.folder, self.n_buckets, self.dtype, self.range_entries = Path(folder), n_buckets, np.dtype(dtype), \
            range_entries
        self.run_docs = open(self.folder / f".{PREFIX}.run-docs", "wb")
        self.run_weights = open(self.folder / f".{PREFIX}.run-weights", "wb")
        self.counts: list[np.ndarray] = []  # per chunk: entries per bucket
        self.rows = 0

    def add(self, indptr: np.ndarray, buckets: np.ndarray, weights: np.ndarray) -> None:
        part = from_rows(indptr, buckets, weights, self.n_buckets, self.dtype)
        (part.docs + np.uint32(self.rows)).tofile(self.run_docs)
        part.weights.tofile(self.run_weights)
        self.counts.append(np.diff(part.indptr).astype(np.int32))
        self.rows += int(indptr.shape[0]) - 1

    def close(self) -> int:
        """Writes the three postings files (the run files removed); returns the entry count."""
        from twotower_cli.retrieval.build import npy_header

        self.run_docs.close()
        self.run_weights.close()
        counts = np.stack(self.counts) if self.counts else np.zeros((0, self.n_buckets), np.int32)
        per_bucket = counts.sum(0, dtype=np.int64)
        indptr = np.zeros(self.n_buckets + 1, dtype=np.int64)
        np.cumsum(per_bucket, out=indptr[1:])
        nnz = int(indptr[-1])
        # where each chunk's list of each bucket starts in the run files
        chunk_start = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(counts.sum(1, dtype=np.int64), out=chunk_start[1:])
        within = np.zeros_like(counts, dtype=np.int64)
        np.cumsum(counts[:, :-1], axis=1, out=within[:, 1:])
        run_docs = np.memmap(self.run_docs.name, dtype=np.uint32, mode="r") if nnz else np.zeros(0, np.uint32)
        run_w = np.memmap(self.run_weights.name, dtype=self.dtype, mode="r") if nnz else np.zeros(0, self.dtype)
        with open(self.folder / f"{PREFIX}.docs.npy", "wb") as fd, open(self.folder / f"{PREFIX}.weights.npy",
                                                                         "wb") as fw:
            fd.write(npy_header((nnz,), "uint32"))
            fw.write(npy_header((nnz,), self.dtype.name))
            b0 = 0
            while b0 < self.n_buckets:  # a range of buckets holding about range_entries entries
                b1 = int(np.searchsorted(indptr, indptr[b0] + self.range_entries, "right")) - 1
                b1 = min(max(b1, b0 + 1), self.n_buckets)
                docs, ws, keys = [], [], []
                for c in range(len(self.counts)):
                    a = chunk_start[c] + within[c, b0]
                    e = chunk_start[c] + within[c, b1 - 1] + counts[c, b1 - 1]
                    docs.append(run_docs[a:e])
                    ws.append(run_w[a:e])
                    keys.append(np.repeat(np.arange(b0, b1, dtype=np.int32), counts[c, b0:b1]))
                if docs:
                    order = np.argsort(np.concatenate(keys), kind="stable")  # chunk order = row order, kept
                    np.concatenate(docs)[order].tofile(fd)
                    np.concatenate(ws)[order].tofile(fw)
                b0 = b1
        np.save(self.folder / f"{PREFIX}.indptr.npy", indptr)
        del run_docs, run_w
        for name in (self.run_docs.name, self.run_weights.name):
            os.remove(name)
        return nnz

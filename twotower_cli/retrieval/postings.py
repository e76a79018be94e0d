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
# a row is stored as its low ROW_BITS bits (2 bytes, not 4); each list is split into blocks of 2**ROW_BITS rows,
# whose starts `indptr` holds, so the high bits are the block's number
ROW_BITS = 16
# weights in 2 bytes too: fixed point, the index's largest weight = 65,535 (``scale`` each step); a dot product moves
# by a few 1e-6 (float16 moved it by up to 1e-4, and swapped near-tied rows of 1 query in 75)
WEIGHTS = np.uint16


def blocks_for(count: int, row_bits: int) -> int:
    return max(1, (int(count) + (1 << row_bits) - 1) >> row_bits)


@dataclass
class Postings:
    """Bucket b's list in block h (rows ``h << row_bits`` onwards): entries ``indptr[b * blocks + h]`` up to the
    next start, in ``docs`` (each row's low ``row_bits`` bits, ascending) and ``weights`` alike. Row bits 32: the
    whole row (one block; indexes of format 4). A weight is ``weights`` x ``scale`` (fixed point when uint16)."""
    indptr: np.ndarray
    docs: np.ndarray
    weights: np.ndarray
    buckets: int
    row_bits: int = 32
    scale: float = 1.0

    @property
    def blocks(self) -> int:
        return (int(self.indptr.shape[0]) - 1) // self.buckets

    def lengths(self, buckets: np.ndarray) -> np.ndarray:
        return self.indptr[(buckets + 1) * self.blocks] - self.indptr[buckets * self.blocks]

    def rows(self, b: int) -> tuple[int, np.ndarray]:
        """Where bucket ``b``'s list starts in ``docs``, and its rows (ascending)."""
        h = self.blocks
        starts = self.indptr[b * h:(b + 1) * h + 1]
        low = self.docs[int(starts[0]):int(starts[-1])]
        if h == 1:
            return int(starts[0]), low
        high = np.repeat(np.arange(h, dtype=np.int64) << self.row_bits, np.diff(starts))
        return int(starts[0]), low.astype(np.int64) + high

    def scores(self, buckets: np.ndarray, weights: np.ndarray, count: int, out: np.ndarray | None = None,
               longest: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The lexical score of every document holding one of the query's ``buckets`` (with their query
        ``weights``): (rows, scores), rows ascending. Lists longer than ``longest`` are left out (a first pass:
        `at` adds them for the candidates). ``out``: a zeroed float32 scratch of ``count`` entries, left zeroed."""
        scratch = np.zeros(count, dtype=np.float32) if out is None else out
        touched = []
        lengths = self.lengths(buckets)
        for b, w, m in zip(buckets.tolist(), weights.tolist(), lengths.tolist()):
            if m == 0 or (longest is not None and m > longest):
                continue
            a, docs = self.rows(b)
            scratch[docs] += np.float32(w * self.scale) * self.weights[a:a + m]  # a list holds a row once
            touched.append(docs)
        if not touched:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        rows = np.unique(np.concatenate(touched)).astype(np.int64)
        values = scratch[rows]
        scratch[rows] = 0.0
        return rows, values

    def at(self, buckets: np.ndarray, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The exact lexical scores of ``rows`` (ascending, unique): each query bucket's list searched for them,
        block by block (only the part of a block between its first and last candidate: a few pages read)."""
        out = np.zeros(rows.shape[0], dtype=np.float32)
        if not rows.size:
            return out
        h = self.blocks
        high = rows >> self.row_bits if self.row_bits < 32 else np.zeros_like(rows)
        low = (rows - (high << self.row_bits)).astype(self.docs.dtype)
        held, first = np.unique(high, return_index=True)
        spans = list(zip(held.tolist(), first.tolist(), [*first[1:].tolist(), rows.shape[0]]))
        for b, w in zip(buckets.tolist(), weights.tolist()):
            for block, r0, r1 in spans:
                a, e = int(self.indptr[b * h + block]), int(self.indptr[b * h + block + 1])
                if e == a:
                    continue
                want, docs = low[r0:r1], self.docs[a:e]
                lo, hi = np.searchsorted(docs, [want[0], want[-1]])
                hi = min(int(hi) + 1, e - a)
                if lo >= hi:
                    continue
                part = docs[lo:hi]
                pos = np.minimum(np.searchsorted(part, want), part.shape[0] - 1)
                hit = part[pos] == want
                found = out[r0:r1]
                found[hit] += np.float32(w * self.scale) * self.weights[a + lo + pos[hit]]
        return out

    def in_range(self, count: int, step: int = 1 << 24) -> bool:
        """Every stored row below ``count`` (read a range of buckets at a time)."""
        h, top = self.blocks, np.int64(1) << self.row_bits
        last = count - (h - 1) * int(top)  # the rows of the last block end here
        b0 = 0
        while b0 < self.buckets:
            b1 = min(self.buckets, max(b0 + 1, int(np.searchsorted(self.indptr[::h], self.indptr[b0 * h] + step))))
            starts = self.indptr[b0 * h:b1 * h + 1]
            docs = self.docs[int(starts[0]):int(starts[-1])]
            if docs.size:
                block = np.repeat(np.tile(np.arange(h, dtype=np.int64), b1 - b0), np.diff(starts))
                if (docs.astype(np.int64) >= np.where(block == h - 1, last, top)).any():
                    return False
            b0 = b1
        return True

    @classmethod
    def load(cls, folder: Path, count: int, buckets: int, row_bits: int = 32, scale: float | None = None) \
            -> "Postings":
        """Read (or map, `files.load_npy`); ValueError when the files do not fit together or the index."""
        from twotower_cli.model.files import load_npy

        arrays = []
        for name in FILES:
            path = Path(folder) / f"{PREFIX}.{name}.npy"
            try:
                arrays.append(load_npy(path))
            except (ValueError, EOFError) as exc:
                raise ValueError(f"{path.name}: {exc}") from None
        indptr, docs, weights = arrays
        if not (isinstance(row_bits, int) and (1 <= row_bits <= 16 or row_bits == 32)):
            raise ValueError(f"row_bits {row_bits!r} is not one this twotower reads")
        if count > np.iinfo(np.uint32).max:
            raise ValueError("more documents than its row numbers hold")
        want = np.uint16 if row_bits <= 16 else np.uint32
        if indptr.dtype != np.int64 or docs.dtype != want or weights.dtype not in (np.uint16, np.float32):
            raise ValueError("its files have the wrong number types")
        fixed = weights.dtype == np.uint16
        if fixed != (scale is not None) or fixed and not (isinstance(scale, float) and 0 < scale < np.inf):
            raise ValueError(f"its weight scale {scale!r} does not fit its {weights.dtype} weights")
        if indptr.shape != (buckets * blocks_for(count, row_bits) + 1,) or docs.ndim != 1 \
                or docs.shape != weights.shape or int(indptr[0]) != 0 or int(indptr[-1]) != docs.shape[0]:
            raise ValueError(f"its lists do not fit together or the {buckets:,} buckets of the model")
        return cls(indptr, docs, weights, buckets, row_bits, scale if fixed else 1.0)


def from_rows(indptr: np.ndarray, buckets: np.ndarray, weights: np.ndarray, n_buckets: int,
              dtype=np.float32, row_bits: int = 32) -> Postings:
    """The postings of rows held in memory (CSR: ``indptr``, ``buckets``, ``weights``)."""
    n = int(indptr.shape[0]) - 1
    h = blocks_for(n, row_bits)
    doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    key = buckets.astype(np.int64) * h + (doc >> row_bits if row_bits < 32 else 0)
    order = np.argsort(key, kind="stable")  # rows stay ascending within a list
    out_ptr = np.zeros(n_buckets * h + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=n_buckets * h), out=out_ptr[1:])
    low = doc[order] & ((1 << row_bits) - 1)
    scale = weight_scale(weights) if np.dtype(dtype) == np.uint16 else 1.0
    return Postings(out_ptr, low.astype(np.uint16 if row_bits <= 16 else np.uint32),
                    fixed_point(weights[order], dtype, scale), n_buckets, row_bits, scale)


def weight_scale(weights: np.ndarray) -> float:
    """The step of 2-byte fixed-point weights: the largest weight is 65,535 steps."""
    top = float(np.max(np.abs(weights), initial=0.0))
    return top / 65535.0 if top > 0 else 1.0


def fixed_point(weights: np.ndarray, dtype, scale: float) -> np.ndarray:
    if np.dtype(dtype) != np.uint16:
        return weights.astype(dtype)
    if (weights < 0).any():
        raise ValueError("negative lexical weights cannot be stored as postings")
    return np.rint(weights / np.float32(scale)).astype(np.uint16)  # (float32 holds 65,535 steps exactly)


class PostingsWriter:
    """Postings of rows added chunk by chunk, in memory bounded by a chunk and ``range_entries``: each chunk's
    entries sorted by bucket go to run files in ``folder`` (whole rows); `close` assembles the lists range by
    range, each row stored as its low ``row_bits`` bits."""

    def __init__(self, folder: Path, n_buckets: int, dtype=WEIGHTS, range_entries: int = 1 << 23,
                 row_bits: int = ROW_BITS):
        self.folder, self.n_buckets, self.dtype, self.range_entries = Path(folder), n_buckets, np.dtype(dtype), \
            range_entries
        self.row_bits, self.top = row_bits, 0.0  # (the largest weight: the fixed point's scale, known at the end)
        self.run_docs = open(self.folder / f".{PREFIX}.run-docs", "wb")
        self.run_weights = open(self.folder / f".{PREFIX}.run-weights", "wb")
        self.counts: list[np.ndarray] = []  # per chunk: entries per bucket
        self.rows = 0

    def add(self, indptr: np.ndarray, buckets: np.ndarray, weights: np.ndarray) -> None:
        part = from_rows(indptr, buckets, weights, self.n_buckets, np.float32)  # (run files: exact weights)
        self.top = max(self.top, float(np.max(part.weights, initial=0.0)))
        (part.docs + np.uint32(self.rows)).tofile(self.run_docs)
        part.weights.tofile(self.run_weights)
        self.counts.append(np.diff(part.indptr).astype(np.int32))
        self.rows += int(indptr.shape[0]) - 1
        if self.rows > np.iinfo(np.uint32).max:
            raise ValueError(f"more than {np.iinfo(np.uint32).max:,} documents in one index")

    def close(self) -> int:
        """Writes the three postings files (the run files removed); returns the entry count (`scale`: the
        weights' step)."""
        from twotower_cli.retrieval.build import npy_header

        self.run_docs.close()
        self.run_weights.close()
        counts = np.stack(self.counts) if self.counts else np.zeros((0, self.n_buckets), np.int32)
        per_bucket = counts.sum(0, dtype=np.int64)
        starts = np.zeros(self.n_buckets + 1, dtype=np.int64)
        np.cumsum(per_bucket, out=starts[1:])
        nnz = int(starts[-1])
        h, bits = blocks_for(self.rows, self.row_bits), self.row_bits
        per_list = np.zeros(self.n_buckets * h, dtype=np.int64)  # entries per (bucket, block)
        # where each chunk's list of each bucket starts in the run files
        chunk_start = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(counts.sum(1, dtype=np.int64), out=chunk_start[1:])
        within = np.zeros_like(counts, dtype=np.int64)
        np.cumsum(counts[:, :-1], axis=1, out=within[:, 1:])
        run_docs = np.memmap(self.run_docs.name, dtype=np.uint32, mode="r") if nnz else np.zeros(0, np.uint32)
        run_w = np.memmap(self.run_weights.name, dtype=np.float32, mode="r") if nnz else np.zeros(0, np.float32)
        self.scale = weight_scale(np.float32([self.top])) if self.dtype == np.uint16 else 1.0
        low = np.uint16 if bits <= 16 else np.uint32
        with open(self.folder / f"{PREFIX}.docs.npy", "wb") as fd, open(self.folder / f"{PREFIX}.weights.npy",
                                                                         "wb") as fw:
            fd.write(npy_header((nnz,), np.dtype(low).name))
            fw.write(npy_header((nnz,), self.dtype.name))
            b0 = 0
            while b0 < self.n_buckets:  # a range of buckets holding about range_entries entries
                b1 = int(np.searchsorted(starts, starts[b0] + self.range_entries, "right")) - 1
                b1 = min(max(b1, b0 + 1), self.n_buckets)
                docs, ws, keys = [], [], []
                for c in range(len(self.counts)):
                    a = chunk_start[c] + within[c, b0]
                    e = chunk_start[c] + within[c, b1 - 1] + counts[c, b1 - 1]
                    docs.append(run_docs[a:e])
                    ws.append(run_w[a:e])
                    keys.append(np.repeat(np.arange(b0, b1, dtype=np.int32), counts[c, b0:b1]))
                if docs:
                    key = np.concatenate(keys)
                    order = np.argsort(key, kind="stable")  # chunk order = row order, kept
                    rows = np.concatenate(docs)[order]
                    block = (rows >> np.uint32(bits)).astype(np.int64) if bits < 32 else 0
                    per_list[b0 * h:b1 * h] = np.bincount((key[order] - b0) * np.int64(h) + block,
                                                          minlength=(b1 - b0) * h)
                    (rows & np.uint32((1 << bits) - 1)).astype(low).tofile(fd)
                    fixed_point(np.concatenate(ws)[order], self.dtype, self.scale).tofile(fw)
                b0 = b1
        indptr = np.zeros(self.n_buckets * h + 1, dtype=np.int64)
        np.cumsum(per_list, out=indptr[1:])
        np.save(self.folder / f"{PREFIX}.indptr.npy", indptr)
        del run_docs, run_w
        for name in (self.run_docs.name, self.run_weights.name):
            os.remove(name)
        return nnz

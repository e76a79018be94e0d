"""A batch of sparse vectors as rows (CSR): what the exact lexical half of a model is for each text, and what an
index stores for its documents (`retrieval/lexical.py` explains why and how search uses them). NumPy only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILES = ("indptr", "buckets", "weights")


@dataclass
class SparseRows:
    """Rows of sparse vectors: row r holds ``buckets[indptr[r]:indptr[r + 1]]`` with ``weights`` alike."""
    indptr: np.ndarray
    buckets: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return int(self.indptr.shape[0]) - 1

    @classmethod
    def from_features(cls, buckets, weights, text, n: int, scale=None, factor: float = 1.0) -> "SparseRows":
        """Unit rows (times ``scale`` per row and ``factor``), buckets ascending, from features grouped by text as
        the towers build them."""
        buckets, weights, text = np.asarray(buckets), np.asarray(weights, dtype=np.float64), np.asarray(text)
        # a bucket that two kinds of feature share (a hash collision) is one entry: their sum
        text, buckets, weights = summed_entries(text, buckets, weights)
        norm = np.sqrt(np.bincount(text, weights=weights * weights, minlength=n))
        mult = factor / np.maximum(norm, 1e-12)
        if scale is not None:
            mult = mult * np.asarray(scale, dtype=np.float64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(text, minlength=n), out=indptr[1:])
        return cls(indptr, buckets.astype(np.int32), (weights * mult[text]).astype(np.float32))

    def plus(self, other: "SparseRows", factor: float) -> "SparseRows":
        """Row by row, self + ``factor`` x other (as many rows), buckets ascending, shared buckets summed."""
        n = len(self)
        text, buckets, weights = summed_entries(
            np.concatenate([np.repeat(np.arange(n), np.diff(r.indptr)) for r in (self, other)]),
            np.concatenate([self.buckets, other.buckets]),
            np.concatenate([self.weights.astype(np.float64), other.weights.astype(np.float64) * factor]))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(text, minlength=n), out=indptr[1:])
        return SparseRows(indptr, buckets.astype(np.int32), weights.astype(np.float32))

    @classmethod
    def concat(cls, parts: list["SparseRows"]) -> "SparseRows":
        if not parts:
            return cls(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        sizes = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
        indptr = np.concatenate([parts[0].indptr[:1]] + [p.indptr[1:] + s for p, s in zip(parts, sizes)])
        return cls(indptr, np.concatenate([p.buckets for p in parts]), np.concatenate([p.weights for p in parts]))

    def take(self, rows: np.ndarray) -> "SparseRows":
        """The given rows, in that order."""
        starts, lengths = self.indptr[rows], self.indptr[np.asarray(rows) + 1] - self.indptr[rows]
        pos = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return SparseRows(indptr, self.buckets[pos], self.weights[pos])

    def save(self, folder: Path, prefix: str = "lexical") -> None:
        for name in FILES:
            np.save(Path(folder) / f"{prefix}.{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path, rows: int, prefix: str = "lexical", buckets: int | None = None,
             digests: dict | None = None, verify_up_to: int = 0) -> "SparseRows":
        """Read from disk (`files.load_npy`); ``ValueError`` when the three files do not fit together, ``rows`` or
        their types. Files of up to ``verify_up_to`` bytes in all are also checked against ``digests``: row offsets
        in order, buckets in range, weights finite (larger ones are checked for shape and type only, as
        embeddings)."""
        from twotower_cli.model.files import load_npy

        arrays = []
        for name in FILES:
            try:
                arrays.append(load_npy(Path(folder) / f"{prefix}.{name}.npy"))
            except (ValueError, EOFError) as exc:
                raise ValueError(f"{prefix}.{name}.npy cannot be read: {exc}") from None
        indptr, bucket_ids, weights = arrays
        if indptr.dtype != np.int64 or bucket_ids.dtype != np.int32 or weights.dtype != np.float32:
            raise ValueError("its files have the wrong number types")
        if indptr.shape != (rows + 1,) or bucket_ids.shape != weights.shape or bucket_ids.ndim != 1 \
                or int(indptr[-1]) != bucket_ids.shape[0] or int(indptr[0]) != 0:
            raise ValueError("its lexical rows do not match the embeddings")
        if digests and sum(a.nbytes for a in arrays) <= verify_up_to:
            bad = [name for name, a in zip(FILES, arrays) if digest(a) != digests.get(name)]
            if bad:
                raise ValueError(f"{prefix}.{bad[0]}.npy does not match its checksum in meta.json")
            if (np.diff(indptr) < 0).any() or (bucket_ids.size and (int(bucket_ids.min()) < 0 or (
                    buckets is not None and int(bucket_ids.max()) >= buckets))) or not np.isfinite(weights).all():
                raise ValueError("its rows are out of order or out of range")
        return cls(indptr, bucket_ids, weights)

    def dots(self, query: "SparseRows", q: int, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        """Exact dot products of query ``q`` of ``query`` with rows ``rows`` of self; ``table`` is a zeroed float32
        scratch vector of the bucket count (left zeroed)."""
        a, b = int(query.indptr[q]), int(query.indptr[q + 1])
        qb = query.buckets[a:b]
        table[qb] = query.weights[a:b]
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        out = np.zeros(len(rows), dtype=np.float32)
        if total:
            offsets = np.cumsum(lengths) - lengths  # where each row's entries start in the gathered arrays
            pos = np.repeat(starts - offsets, lengths) + np.arange(total)
            values = table[self.buckets[pos]] * self.weights[pos]
            some = lengths > 0  # (reduceat would give an empty row its neighbour's first value)
            out[some] = np.add.reduceat(values, offsets[some])
        table[qb] = 0.0
        return out


def summed_entries(text: np.ndarray, buckets: np.ndarray, weights: np.ndarray):
    """(text, bucket, weight) entries sorted by text then bucket, entries of one text and bucket summed into one."""
    if not buckets.size:
        return text.astype(np.int64), buckets.astype(np.int64), weights
    m = int(buckets.max()) + 1
    key, inverse = np.unique(text.astype(np.int64) * m + buckets, return_inverse=True)
    return key // m, key % m, np.bincount(inverse.ravel(), weights=weights, minlength=key.size)


def digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

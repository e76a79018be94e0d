"""Exact top-k in NumPy alone: the CPU search path, which needs no torch (a cold `twotower search` never imports it).

Scores for one chunk of the corpus go into one reused buffer, then top-k is taken in two stages: the maximum of
each block of `block` scores, the top-k blocks, then an exact top-k over the candidates of those blocks only.
"""

from __future__ import annotations

import numpy as np


def np_topk(scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Indices of the k largest along ``axis`` (unordered)."""
    if k >= scores.shape[axis]:
        return np.argsort(-scores, axis=axis)
    return np.take(np.argpartition(-scores, k - 1, axis=axis), np.arange(k), axis=axis)


def np_chunk_topk_cols(scores: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-stage exact top-k of each column of ``scores`` [n, Q]: block maxima, then the candidates."""
    n, q = scores.shape
    k = min(k, n)
    nblocks = n // block
    if nblocks <= k:
        cand = np.broadcast_to(np.arange(n)[:, None], (n, q))
    else:
        maxima = scores[: nblocks * block].reshape(nblocks, block, q).max(1)  # [nblocks, Q]
        blocks = np_topk(maxima, k, 0)  # [k, Q]
        cand = (blocks[:, None, :] * block + np.arange(block)[None, :, None]).reshape(k * block, q)
        if nblocks * block < n:
            tail = np.broadcast_to(np.arange(nblocks * block, n)[:, None], (n - nblocks * block, q))
            cand = np.concatenate([cand, tail], 0)
    cs = np.take_along_axis(scores, cand, 0)
    top = np_topk(cs, k, 0)
    return np.take_along_axis(cs, top, 0).T, np.take_along_axis(cand, top, 0).T


def cpu_topk(q: np.ndarray, corpus, k: int, chunk: int = 65536, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """CPU path, all in numpy: its BLAS product streams the corpus on every core (torch's matrix-vector product
    runs on one), into one reused buffer; the top-k stays in numpy too, since alternating BLAS and torch thread
    pools make the cores wait on each other."""
    mat = corpus.numpy() if hasattr(corpus, "numpy") and not isinstance(corpus, np.ndarray) else corpus
    qn = np.ascontiguousarray(np.asarray(q, dtype=np.float32).T)  # [D, Q]
    n = mat.shape[0]
    k = min(k, n)
    buf = np.empty((min(chunk, n), qn.shape[1]), dtype=np.float32)
    best_s = best_i = None
    for start in range(0, n, chunk):
        part = mat[start:start + chunk]
        if part.dtype != np.float32:
            part = part.astype(np.float32)
        out = buf[: part.shape[0]]
        np.matmul(part, qn, out=out)
        if not np.isfinite(out).all():  # a damaged index: never rank (or serve) NaN or infinite scores
            bad = start + int(np.flatnonzero(~np.isfinite(out).all(1))[0])
            raise FloatingPointError(f"row {bad} of the index has non-finite values")
        s, i = np_chunk_topk_cols(out, k, block)
        i = i + start
        if best_s is not None:
            s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
            keep = np_topk(s.T, k, 0).T
            s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        best_s, best_i = s, i
    order = np.argsort(-best_s, axis=1, kind="stable")
    return (np.ascontiguousarray(np.take_along_axis(best_s, order, 1)),
            np.ascontiguousarray(np.take_along_axis(best_i, order, 1)).astype(np.int64))


def numpy_topk(q: np.ndarray, corpus, k: int, chunk: int = 65536, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k on the CPU in NumPy alone (no torch), any number of queries: scores and rows, best first."""
    q = np.asarray(q, dtype=np.float32)
    n = corpus.shape[0]
    k = min(k, n)
    if q.shape[0] == 0 or k == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    chunk = max(min(chunk, n, max(4096, (1 << 24) // q.shape[0])), 1)  # score buffer <= ~64 MB
    if 1 < q.shape[0] <= 4:  # BLAS' 2-4 column products are slower than that many matrix-vector ones
        parts = [cpu_topk(q[j:j + 1], corpus, k, chunk, block) for j in range(q.shape[0])]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return cpu_topk(q, corpus, k, chunk, block)

"""Exact maximum-inner-product top-k, the search core shared by validation, `search` and `evaluate`.

The corpus is scanned in chunks: scores for one chunk go into a preallocated buffer (a fresh 1 GB score matrix
costs ~0.8 s of page faults), then top-k is taken in two stages: the maximum of each block of `block` scores,
the top-k blocks, then an exact top-k over the candidates of those blocks only. The k best items of a chunk lie in
at most k blocks, each of whose maximum is among the k largest block maxima, so the result is exact.
Never holds a queries x corpus score matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memmaps: we only ever read them
        return torch.from_numpy(np.asarray(x))


def merge(best_s, best_i, s, i, k):
    """Merge two [Q, *] candidate lists into the k best."""
    if best_s is None:
        return s, i
    cs = torch.cat([best_s, s], 1)
    ci = torch.cat([best_i, i], 1)
    top = torch.topk(cs, min(k, cs.shape[1]), dim=1, sorted=True)
    return top.values, torch.gather(ci, 1, top.indices)


def chunk_topk(scores: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``scores`` [Q, n] via block maxima."""
    q, n = scores.shape
    k = min(k, n)
    nblocks = n // block
    if nblocks <= k or block <= 1:
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices
    head = scores[:, : nblocks * block].view(q, nblocks, block)
    maxima = head.amax(2)
    blocks = torch.topk(maxima, k, dim=1).indices  # [Q, k]
    cand = (blocks.unsqueeze(2) * block + torch.arange(block, device=scores.device)).view(q, -1)
    if nblocks * block < n:  # the ragged tail is always a candidate
        tail = torch.arange(nblocks * block, n, device=scores.device).expand(q, -1)
        cand = torch.cat([cand, tail], 1)
    cs = torch.gather(scores, 1, cand)
    top = torch.topk(cs, k, dim=1)
    return top.values, torch.gather(cand, 1, top.indices)


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


def cpu_topk(q: torch.Tensor, corpus, k: int, chunk: int, block: int):
    """CPU path, all in numpy: its BLAS product streams the corpus on every core (measured on 1M x 128: one
    query 17 ms where torch's matrix-vector product took 67 ms on one core), into one reused buffer; the top-k
    stays in numpy too, since alternating BLAS and torch thread pools made the cores wait on each other."""
    mat = corpus.numpy() if isinstance(corpus, torch.Tensor) else corpus
    qn = np.ascontiguousarray(q.numpy().T)  # [D, Q]
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
        s, i = np_chunk_topk_cols(out, k, block)
        i = i + start
        if best_s is not None:
            s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
            keep = np_topk(s.T, k, 0).T
            s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        best_s, best_i = s, i
    order = np.argsort(-best_s, axis=1, kind="stable")
    return (torch.from_numpy(np.ascontiguousarray(np.take_along_axis(best_s, order, 1))),
            torch.from_numpy(np.ascontiguousarray(np.take_along_axis(best_i, order, 1)).astype(np.int64)))


def exact_topk(queries, corpus, k: int, chunk: int = 65536, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and indices [Q, min(k, N)] of the highest inner products, best first.

    ``corpus`` may be a torch tensor or a (memory-mapped) numpy array, float32 or float16; float16 chunks
    are upcast one chunk at a time. ``queries`` must be float32 on the corpus' device.
    """
    q = as_tensor(queries).float()
    n = corpus.shape[0]
    k = min(k, n)
    if q.shape[0] == 0 or k == 0:
        return torch.zeros(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.long)
    chunk = max(min(chunk, n, max(4096, (1 << 24) // q.shape[0])), 1)  # score buffer <= ~64 MB
    on_cpu = q.device.type == "cpu" and not (isinstance(corpus, torch.Tensor) and corpus.device.type != "cpu")
    if on_cpu and q.shape[0] <= 256:  # beyond that torch's blocked top-k is the faster half
        if 1 < q.shape[0] <= 4:  # BLAS' 2-4 column products are slower than that many matrix-vector ones
            parts = [cpu_topk(q[j:j + 1].contiguous(), corpus, k, chunk, block) for j in range(q.shape[0])]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return cpu_topk(q.contiguous(), corpus, k, chunk, block)
    buffer = torch.empty(q.shape[0] * chunk, dtype=torch.float32, device=q.device)  # one, reused by every chunk
    best_s = best_i = None
    for start in range(0, n, chunk):
        part = as_tensor(corpus[start:start + chunk])
        if part.device != q.device:
            part = part.to(q.device, non_blocking=True)
        if part.dtype != torch.float32:
            part = part.float()
        m = part.shape[0]
        out = buffer.view(-1)[: q.shape[0] * m].view(q.shape[0], m)  # contiguous, reused
        torch.mm(q, part.T, out=out)
        s, i = chunk_topk(out, k, block)
        best_s, best_i = merge(best_s, best_i, s, i + start, k)
    return best_s, best_i

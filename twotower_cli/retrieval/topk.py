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

from twotower_cli.retrieval.topk_numpy import numpy_topk


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
        s, i = numpy_topk(q.numpy(), corpus, k, chunk, block)
        return torch.from_numpy(s), torch.from_numpy(i)
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

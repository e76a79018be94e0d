"""The model's ranking over a compact index: the documents' learned half and their exact lexical rows
inverted (`postings.py`), without the hashed lexical sketch.

Every document's score is the search's own (the learned half's dot product plus the exact lexical one): the
learned half in one scan, the lexical half from the query's buckets' lists, except the longest lists (the commonest
n-grams: ``LONG_LIST_SHARE``), which are added to the best ``rerank`` rows of that first pass (rows past them follow,
sorted among themselves, as in the full layout's search: the top 10 does not depend on k).
"""

from __future__ import annotations

import numpy as np

from twotower_cli.model.sparse_rows import SparseRows
from twotower_cli.retrieval.postings import Postings

CHUNK = 1 << 16  # documents scored at a time: a [CHUNK, queries] float32 block
QUERIES = 64  # queries scored together: the scan reads the documents once per this many queries
# lists longer than this share of the documents (the commonest n-grams, of low weight) are left out of the first
# pass and added to its best rows only: they are most of what a query would read, and change almost no top 10
# (the share was measured: benchmarks/RESULTS.md, session 11)
LONG_LIST_SHARE = 0.02
LONG_LIST_FLOOR = 1000  # never shorter: in a small corpus every list is cheap, and a 2% cut lost whole documents


def exact_ranking(learned_queries: np.ndarray, query_rows: SparseRows, learned_docs, postings: Postings,
                  depth: int, longest: int, rerank: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [Q, min(depth, N)], best first (ties: the lower row first). ``longest``: lists longer than
    this are left out of the first pass and added to the rows it passes on: its best ``rerank``, then (a depth
    over ``rerank``) its next rows, sorted among themselves."""
    n = learned_docs.shape[0]
    Q = learned_queries.shape[0]
    depth = min(depth, n)
    out_s = np.empty((Q, depth), dtype=np.float32)
    out_i = np.empty((Q, depth), dtype=np.int64)
    scratch = np.zeros(n, dtype=np.float32)
    q = np.ascontiguousarray(learned_queries, dtype=np.float32)
    for a in range(0, Q, QUERIES):
        b = min(Q, a + QUERIES)
        scores = np.empty((b - a, n), dtype=np.float32)
        for s in range(0, n, CHUNK):
            block = np.asarray(learned_docs[s:s + CHUNK], dtype=np.float32)
            np.matmul(q[a:b], block.T, out=scores[:, s:s + block.shape[0]])
        if not np.isfinite(scores).all():
            raise FloatingPointError("embeddings.npy")
        for j in range(a, b):
            lo, hi = int(query_rows.indptr[j]), int(query_rows.indptr[j + 1])
            qb, qw = query_rows.buckets[lo:hi], query_rows.weights[lo:hi]
            rows, lexical = postings.scores(qb, qw, n, scratch, longest)
            if not np.isfinite(lexical).all():  # a damaged index: never rank NaN (the caller names the file)
                raise FloatingPointError("postings.weights.npy")
            row = scores[j - a]
            row[rows] += lexical
            _, first = best(row, max(depth, rerank))  # the first pass's order, the same whatever depth is
            long = postings.lengths(qb) > longest
            # its best ``rerank`` rows re-scored and sorted; rows past them follow, re-scored among themselves (so
            # that the top of the ranking never depends on how deep a caller asks)
            ranked = [rescored(row, first[:rerank], postings, qb[long], qw[long]),
                      rescored(row, first[rerank:], postings, qb[long], qw[long])]
            out_s[j] = np.concatenate([r[0] for r in ranked])[:depth]
            out_i[j] = np.concatenate([r[1] for r in ranked])[:depth]
    return out_s, out_i


def rescored(first_pass: np.ndarray, rows: np.ndarray, postings: Postings, long_buckets: np.ndarray,
             long_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` with the long lists' part of their lexical score added to their first-pass score, best first."""
    rows = np.sort(rows)
    added = postings.at(long_buckets, long_weights, rows)
    if not np.isfinite(added).all():
        raise FloatingPointError("postings.weights.npy")
    scores, order = best(first_pass[rows] + added, rows.shape[0])
    return scores, rows[order]


def ranking(index, embedded: np.ndarray, query_rows: SparseRows, depth: int, rerank: int):
    """The model's ranking over a compact ``index`` (`snapshot.Index`), as `search.Search.dense` returns it."""
    lexical_dim = index.meta["lexical"]["dim"]
    longest = max(LONG_LIST_FLOOR, int(LONG_LIST_SHARE * index.count))
    try:
        return exact_ranking(np.asarray(embedded)[:, lexical_dim:], query_rows, index.embeddings, index.lexical,
                             depth, longest, rerank)
    except FloatingPointError as exc:
        raise index.damaged(str(exc)) from None


def best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of a score vector, best first, ties broken by the lower row."""
    if k < scores.shape[0]:
        cut = np.partition(scores, -k)[-k]
        top = np.flatnonzero(scores >= cut)  # every row tied with the k-th, so the tie rule decides among them
    else:
        top = np.arange(scores.shape[0])
    order = np.lexsort((top, -scores[top]))[:k]
    return scores[top[order]], top[order]

"""The exact lexical half (models with ``lexical_exact``): each text's TF-IDF n-gram vector kept sparse, over the
model's n-gram buckets, instead of only its hashed sketch in the embedding (1,024 dimensions by default).

Why: the sketch adds collision noise to every score (of order 1/sqrt(dim)), which costs most where matching words
is most of what a model can do: small and definitional corpora (benchmarks/RESULTS.md).

How: a search ranks by the embeddings first, then re-scores the best ``RERANK`` rows with the exact half:
score = learned half's dot product + the exact lexical cosine (each already weighted as in the embedding). The
index stores the documents' sparse rows (CSR: ``lexical.indptr.npy``, ``lexical.buckets.npy``,
``lexical.weights.npy``). NumPy only: a cold `twotower search` imports neither torch nor SciPy.
"""

from __future__ import annotations

import numpy as np

from twotower_cli.model.sparse_rows import SparseRows

RERANK = 1000  # rows of the first pass re-scored exactly (the sample: the exact top 10 of 496 of 500 queries)


EXTRA = 200  # rows of the even mix's ranking added to the candidates (see ``first_pass``)


def first_pass(queries: np.ndarray, lexical_dim: int, weight) -> np.ndarray:
    """The first pass's query vectors: the query embeddings as they are (the index stores its documents at the
    lexical ``weight`` chosen on validation), then, when that weight is not 0.5, the same queries re-weighted to an
    even mix of sketch and learned half, whose best ``EXTRA`` rows join the candidates (``candidates``). At a high
    weight the sketch dominates the first pass, and its noise on short queries pushed rows of the exact top 10 below
    rank 1,000 (11 of 500 queries of the shipped sample at weight 1.0); an even mix alone, tried instead, lost 0.02
    MRR@10 on FOLDOC, where the learned half is weak."""
    if weight is None or weight == 0.5:
        return queries
    q = np.array(queries, dtype=np.float32)
    q[:, :lexical_dim] *= 0.5 / weight if weight > 0 else 0.0
    q[:, lexical_dim:] *= 0.5 / (1.0 - weight) if weight < 1 else 0.0
    return np.concatenate([np.asarray(queries, dtype=np.float32), q])


def candidate_rows(first: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    """Candidate rows [Q, K (+ EXTRA)]: the first pass's, then the even mix's best (may repeat rows)."""
    return first if extra is None else np.concatenate([first, extra[:, :EXTRA]], 1)


def rescore(queries: np.ndarray, query_rows: SparseRows, embeddings, doc_rows: SparseRows, rows: np.ndarray,
            lexical_dim: int, k: int, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [Q, k], best first, of the candidate ``rows`` [Q, K] (-1: none) re-scored as the learned
    half's dot product plus the exact lexical one. ``queries`` are the query embeddings; ``embeddings`` the index's."""
    Q = rows.shape[0]
    k = min(k, rows.shape[1])
    out_s = np.full((Q, k), -np.inf, dtype=np.float32)
    out_i = np.full((Q, k), -1, dtype=np.int64)
    table = np.zeros(buckets, dtype=np.float32)
    learned_q = np.asarray(queries, dtype=np.float32)[:, lexical_dim:]
    for j in range(Q):
        cand = np.unique(rows[j][rows[j] >= 0])  # each row once, in file order: mapped pages read forward
        if cand.size == 0:
            continue
        learned = np.asarray(embeddings[cand, lexical_dim:], dtype=np.float32) @ learned_q[j]
        lex = doc_rows.dots(query_rows, j, cand, table)
        for values, name in ((learned, "embeddings.npy"), (lex, "lexical.weights.npy")):
            if not np.isfinite(values).all():  # a damaged index: never rank NaN (the caller names the file)
                raise FloatingPointError(name)
        s = learned + lex
        best = np.lexsort((cand, -s))[:k]
        out_s[j, :best.size], out_i[j, :best.size] = s[best], cand[best]
    return out_s, out_i

"""Fusing two rankings (the model's and BM25's) into one: each side's score min-max normalised over its top
``depth`` rows, then ``weight`` x model + (1 - weight) x BM25.

The normalisation is fixed by each side's top ``depth`` rows, and a row below them counts 0 on that side, so a
row's fused score depends on the query alone: asking for more results only shows more of one ranking.
"""

from __future__ import annotations

import numpy as np

DEPTH = 100  # rows of each side that fusion normalises over and draws from
WEIGHTS = [round(0.1 * i, 1) for i in range(11)]  # model weights tried on validation (0: BM25 alone)


def best_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The rows of the ``k`` highest scores, best first; equal scores in row order, also across the k-th place
    (BM25 gives many documents the same score)."""
    n = scores.size
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        above = np.flatnonzero(scores > kth)
        top = np.concatenate([above, np.flatnonzero(scores == kth)[: k - above.size]])
    else:
        top = np.arange(n)
    return top[np.lexsort((top, -scores[top]))]


def normalised(scores: np.ndarray, rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """One side's top ``depth`` rows and their scores mapped to [0, 1] by the min and max of those rows."""
    keep = rows[:depth] >= 0
    s, r = np.asarray(scores[:depth], dtype=np.float64)[keep], np.asarray(rows[:depth], dtype=np.int64)[keep]
    lo, hi = (s.min(), s.max()) if s.size else (0.0, 0.0)
    return r, (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


class Candidates:
    """One query's fusion candidates: the union of both sides' top rows, each side's normalised score on them (0
    below that side's top), and the model's ranking further down, which continues the fused one past the union."""

    def __init__(self, dense_s, dense_i, lex_s, lex_i, depth: int = DEPTH):
        (di, dv), (li, lv) = normalised(dense_s, dense_i, depth), normalised(lex_s, lex_i, depth)
        self.rows = np.union1d(di, li)
        self.dense, self.lex = np.zeros(self.rows.size), np.zeros(self.rows.size)
        self.dense[np.searchsorted(self.rows, di)] = dv
        self.lex[np.searchsorted(self.rows, li)] = lv
        rest = np.asarray(dense_i, dtype=np.int64)[depth:]
        self.rest = rest[(rest >= 0) & ~np.isin(rest, self.rows)]

    def ranking(self, weight: float, k: int) -> tuple[list[float], list[int]]:
        """The top ``k``: the union by fused score (ties: lower row first), then the model's next rows at 0."""
        score = weight * self.dense + (1.0 - weight) * self.lex
        order = np.lexsort((self.rows, -score))[:k]
        rows, scores = self.rows[order].tolist(), score[order].tolist()
        more = k - len(rows)
        if more > 0:
            rows += self.rest[:more].tolist()
            scores += [0.0] * min(more, self.rest.size)
        return scores, rows


def candidates(dense_s, dense_i, lex_s, lex_i, depth: int = DEPTH) -> list[Candidates]:
    """Per query, from each side's ranking (scores and rows, best first, -1 padding)."""
    return [Candidates(*sides, depth) for sides in zip(dense_s, dense_i, lex_s, lex_i)]


def fused(cands: list[Candidates], weight: float, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Scores and rows of the top ``k`` per query at ``weight``."""
    out = [c.ranking(weight, k) for c in cands]
    return [s for s, _ in out], [r for _, r in out]

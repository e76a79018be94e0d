"""Hybrid search: fusing the dense model's and BM25's candidate lists, and choosing the fusion weight on
validation queries."""

from __future__ import annotations

import numpy as np

CANDIDATES = 100  # each side's list that hybrid fusion re-ranks


WEIGHTS = [round(0.1 * i, 1) for i in range(11)]  # dense weights tried on validation (0: BM25 alone)


def fusion_candidates(dense_s, dense_i, lex_s, lex_i) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per query: the union of both candidate lists and each side's min-max normalised score on it (a document
    missing from one list gets that list's lowest normalised score, 0)."""
    out = []
    for ds, di, ls, li in zip(dense_s, dense_i, lex_s, lex_i):
        sides = []
        for s, i in ((ds, di), (ls, li)):
            s, i = np.asarray(s, dtype=np.float64), np.asarray(i, dtype=np.int64)
            s, i = s[i >= 0], i[i >= 0]
            lo, hi = (s.min(), s.max()) if s.size else (0.0, 0.0)
            sides.append((i, (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)))
        ids = np.union1d(sides[0][0], sides[1][0])
        scores = []
        for i, v in sides:
            full = np.zeros(ids.size)
            full[np.searchsorted(ids, i)] = v
            scores.append(full)
        out.append((ids, scores[0], scores[1]))
    return out


def fused(candidates, weight: float, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """The top ``k`` of ``weight`` x dense + (1 - weight) x BM25 per query; ties go to the lower row."""
    out_s, out_i = [], []
    for ids, dense, lex in candidates:
        score = weight * dense + (1.0 - weight) * lex
        order = np.lexsort((ids, -score))[:k]
        out_s.append(score[order].tolist())
        out_i.append(ids[order].tolist())
    return out_s, out_i


def fuse(dense_s, dense_i, lex_s, lex_i, weight: float, k: int) -> tuple[list, list]:
    """Weighted sum of min-max normalised scores over the union of both candidate lists, per query."""
    return fused(fusion_candidates(dense_s, dense_i, lex_s, lex_i), weight, k)

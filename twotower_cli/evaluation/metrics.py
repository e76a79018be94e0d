"""Standard IR metrics over ranked lists, as trec_eval defines them (linear gains in nDCG).

``ranked`` is [Q, K] corpus indices, best first (-1 pads a short list); ``qrels`` maps each query row to
{doc index: grade}. A query with no relevant document scores 0 on every metric (it is counted, as in trec_eval);
relevant documents missing from the corpus have indices <= -2, so they count as relevant and are never found.
Ties are whatever order the ranking gives (exact search: the lower corpus row first).
"""

from __future__ import annotations

import math

import numpy as np

CUTOFFS = {"mrr@10": 10, "ndcg@10": 10, "recall@1": 1, "recall@10": 10, "recall@100": 100, "map@100": 100}


def retrieval_metrics(ranked, qrels: list[dict[int, float]], names=tuple(CUTOFFS)) -> dict[str, float]:
    ranked = np.asarray(ranked)
    totals = {n: 0.0 for n in names}
    counted = 0
    for row, rel in zip(ranked, qrels):
        relevant = {d: g for d, g in rel.items() if g > 0}
        counted += 1
        if not relevant:
            continue  # scores 0 on every metric
        gains = np.array([relevant.get(int(d), 0.0) for d in row], dtype=np.float64)
        hits = gains > 0
        for name in names:
            k = CUTOFFS[name]
            g, h = gains[:k], hits[:k]
            if name.startswith("mrr"):
                first = np.flatnonzero(h)
                totals[name] += 1.0 / (first[0] + 1) if first.size else 0.0
            elif name.startswith("recall"):
                totals[name] += h.sum() / len(relevant)
            elif name.startswith("ndcg"):
                disc = 1.0 / np.log2(np.arange(2, g.size + 2))
                ideal = np.sort(np.fromiter(relevant.values(), float))[::-1][:k]
                idcg = (ideal * (1.0 / np.log2(np.arange(2, ideal.size + 2)))).sum()
                totals[name] += (g * disc).sum() / idcg if idcg > 0 else 0.0
            elif name.startswith("map"):
                ranks = np.flatnonzero(h) + 1
                prec = np.arange(1, ranks.size + 1) / ranks
                totals[name] += prec.sum() / len(relevant)
    return {n: (totals[n] / counted if counted else math.nan) for n in names}

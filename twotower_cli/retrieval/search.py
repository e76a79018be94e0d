"""A run's search: the one ranking that `search`, `serve`, the Python API, `evaluate` and the choices made after
training all run.

    dense   first pass over the index's embeddings -> its best rows re-scored with the exact lexical half
    bm25    BM25 over the index's documents
    hybrid  the two rankings' top `depth` rows each, min-max normalised, fused at `hybrid_weight`

Every parameter is a `SearchPlan`, stored in the run (run.json's "search"). No stage looks at k: k only cuts the
final ranking, so the top 10 are the same whatever k a caller asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.retrieval import fusion
from twotower_cli.retrieval.lexical import EXTRA, RERANK, candidate_rows, first_pass, rescore

MODES = ("dense", "hybrid", "bm25")


@dataclass(frozen=True)
class SearchPlan:
    """What a search does: its mode, the model's weight in a fusion, and each stage's depth."""
    mode: str = "dense"
    hybrid_weight: float = 0.5
    depth: int = fusion.DEPTH  # rows of each ranking that a fusion normalises over and draws from
    rerank: int = RERANK  # rows of the first pass re-scored with the exact lexical half

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"search mode {self.mode!r} is not one of {', '.join(MODES)}")
        w = self.hybrid_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            raise UsageError(f"hybrid weight {w!r} must be a number between 0 and 1")
        for name in ("depth", "rerank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"search {name} {value!r} must be a positive integer")

    @classmethod
    def from_dict(cls, stored: dict) -> "SearchPlan":
        """The plan a run stored; ValueError when a value is missing or out of range."""
        if "mode" not in stored:
            raise ValueError("it names no mode")
        known = {k: stored[k] for k in ("mode", "hybrid_weight", "depth", "rerank") if k in stored}
        try:
            return cls(**known)
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    def to_dict(self) -> dict:
        return asdict(self)

    def forced(self, mode: str | None = None, weight: float | None = None) -> "SearchPlan":
        """This plan with ``mode`` and/or the fusion ``weight`` a caller asks for: a weight alone asks for a
        fusion; a fusion asked of a run whose plan is one side alone mixes evenly unless a weight is given."""
        mode = mode or ("hybrid" if weight is not None else self.mode)
        if weight is None:  # (a dense or BM25 plan keeps its weight: the same plan asked again is equal to it)
            weight = 0.5 if mode == "hybrid" and not 0 < self.hybrid_weight < 1 else self.hybrid_weight
        return replace(self, mode=mode, hybrid_weight=float(weight))


RUN_FORMAT = 3  # run.json of format 2 always holds its plan; of format 3, with the plan's sha256


def plan_digest(plan: SearchPlan) -> str:
    """The sha256 of a plan's parameters, stored beside it: an edited plan is noticed, not silently searched."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()


def stored_plan(run_dir: Path) -> SearchPlan:
    """The run's default search, as training stored it in run.json. A missing or damaged run.json, or a damaged
    plan, is an error naming the file (it would silently change every search); a run saved before training chose
    its search, or one still training, has none: the model alone."""
    from twotower_cli.runs import read_json

    path = Path(run_dir) / "run.json"
    run = read_json(path, "run record")
    stored = run.get("search")
    if stored is None and (run.get("format_version", 1) < RUN_FORMAT or not run.get("complete")):
        return SearchPlan()
    try:
        if not isinstance(stored, dict):
            raise ValueError("missing or not an object")
        plan = SearchPlan.from_dict(stored)
        if run.get("format_version", 1) >= 3 and run.get("search_sha256") != plan_digest(plan):
            raise ValueError("it does not match its recorded sha256: it was edited")
        return plan
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: its 'search' entry is damaged ({exc}); the file is corrupt: retrain, or "
                            "restore it from a copy") from None


class Search:
    """A plan over one index, with the model's query side: ``encoder`` has ``encode_queries(texts)`` and
    ``query_lexical(texts)`` (the queries' exact lexical rows, for an index that has the documents')."""

    def __init__(self, plan: SearchPlan, encoder, index, device: str = "cpu"):
        self.plan, self.encoder, self.index, self.device = plan, encoder, index, device

    def rank(self, queries: list[str], k: int) -> tuple[list[list[float]], list[list[int]]]:
        """Scores and index rows of the top ``k`` per query, best first."""
        mode = self.plan.mode
        if mode == "bm25":
            s, i = self.bm25(queries, k)
            return s.tolist(), i.tolist()
        if mode == "dense":
            s, i = self.dense(queries, k)
            return s.tolist(), i.tolist()
        return fusion.fused(self.candidates(queries, k), self.plan.hybrid_weight, k)

    def candidates(self, queries: list[str], k: int = 0) -> list[fusion.Candidates]:
        """What a fusion ranks, per query (the model's ranking as deep as ``k`` too, to continue past the union)."""
        ds, di = self.dense(queries, max(self.plan.depth, k))
        ls, li = self.bm25(queries, self.plan.depth)
        return fusion.candidates(ds, di, ls, li, self.plan.depth)

    def bm25(self, queries: list[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.bm25().search(queries, depth)

    def dense(self, queries: list[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's ranking: scores and rows [Q, min(depth, documents)], best first."""
        index = self.index
        embedded = self.encoder.encode_queries(queries)
        rows = self.encoder.query_lexical(queries) if index.lexical is not None else None
        if index.meta.get("layout") == "compact":
            from twotower_cli.retrieval.compact import ranking

            scores, found = ranking(index, embedded, rows, depth, self.plan.rerank)
        elif rows is None:
            scores, found = index.nearest(embedded, depth, self.device)
        else:
            scores, found = exact_lexical_ranking(index, embedded, rows, depth, self.plan.rerank, self.device)
        if not np.isfinite(scores[found >= 0]).all():
            raise index.damaged("embeddings.npy")
        return scores, found


    def pair_scores(self, queries: list[str], rows: np.ndarray) -> np.ndarray:
        """The model's score of each query with one row of the index, as `dense` ranks it."""
        index = self.index
        embedded = self.encoder.encode_queries(queries)
        if index.lexical is None:
            return (embedded * np.asarray(index.embeddings[rows], dtype=np.float32)).sum(1)
        query_rows, lex = self.encoder.query_lexical(queries), index.meta["lexical"]
        if index.meta.get("layout") != "compact":
            return scored(index, embedded, query_rows, np.asarray(rows).reshape(-1, 1), lex)[0][:, 0]
        learned = (embedded[:, lex["dim"]:] * np.asarray(index.embeddings[rows], dtype=np.float32)).sum(1)
        ptr = query_rows.indptr
        return learned + np.array([index.lexical.at(query_rows.buckets[ptr[j]:ptr[j + 1]],
                                                    query_rows.weights[ptr[j]:ptr[j + 1]], np.array([r]))[0]
                                   for j, r in enumerate(np.asarray(rows).tolist())], dtype=np.float32)


def exact_lexical_ranking(index, embedded: np.ndarray, query_rows, depth: int, rerank: int, device: str):
    """The first pass's best ``rerank`` rows (and an even mix's best `EXTRA`: see `lexical.first_pass`), re-scored
    with the exact lexical half and sorted. Past them (a depth over ``rerank``) the ranking continues with the
    first pass's next rows, re-scored and sorted among themselves."""
    lex = index.meta["lexical"]
    vectors = first_pass(embedded, lex["dim"], lex.get("weight"))
    n = embedded.shape[0]
    _, first = index.nearest(vectors[:n], max(rerank, depth), device)
    extra = index.nearest(vectors[n:], EXTRA, device)[1] if vectors.shape[0] > n else None
    pool = candidate_rows(first[:, :rerank], extra)
    scores, rows = scored(index, embedded, query_rows, pool, lex)
    if depth <= rerank or first.shape[1] <= rerank:
        return scores[:, :depth], rows[:, :depth]
    tail = np.full((n, first.shape[1] - rerank), -1, dtype=np.int64)
    for j in range(n):
        rest = first[j, rerank:]
        rest = rest[(rest >= 0) & ~np.isin(rest, pool[j])]
        tail[j, :rest.size] = rest
    tail_s, tail_r = scored(index, embedded, query_rows, tail, lex)
    scores, rows = np.concatenate([scores, tail_s], 1), np.concatenate([rows, tail_r], 1)
    return packed(scores, rows, depth)


def scored(index, embedded, query_rows, pool: np.ndarray, lex: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``pool`` [Q, K] (-1: none) re-scored, best first, padded with -1."""
    try:
        return rescore(embedded, query_rows, index.embeddings, index.lexical, pool, lex["dim"], pool.shape[1],
                       lex["buckets"])
    except FloatingPointError as exc:
        raise index.damaged(str(exc)) from None


def packed(scores: np.ndarray, rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's valid rows moved to the front (their order kept), cut to ``depth``."""
    out_s = np.full((rows.shape[0], min(depth, rows.shape[1])), -np.inf, dtype=np.float32)
    out_i = np.full(out_s.shape, -1, dtype=np.int64)
    for j in range(rows.shape[0]):
        keep = np.flatnonzero(rows[j] >= 0)[: out_s.shape[1]]
        out_s[j, :keep.size], out_i[j, :keep.size] = scores[j, keep], rows[j, keep]
    return out_s, out_i

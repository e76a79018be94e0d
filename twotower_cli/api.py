"""The Python API: a trained run as an object you load once and use from a notebook, an application or a server.

    import twotower_cli
    model = twotower_cli.load("runs/latest")            # a run folder, or a run id under runs/
    vectors = model.encode_queries(["gnu c compiler"])   # float32 [n, dim], unit-length rows
    hits = model.search("gnu c compiler", k=5)[0]       # [Hit(rank, score, id, document), ...]
    model.index_documents(texts, name="catalog")        # a new named index of the run

The CLI's `search`, `index` and `serve` go through this class. Queries of the default (ngram) model are encoded in
NumPy from the memory-mapped weights, so loading and searching import no torch; other encoders, `device="cuda"`
and indexing load the torch model when first needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from twotower_cli.data.vocab import blank
from twotower_cli.errors import UsageError
from twotower_cli.model.run_encoder import RunEncoder, clean  # noqa: F401  (clean: re-exported)
from twotower_cli.retrieval.search import MODES, Search, SearchPlan, stored_plan  # noqa: F401  (MODES: re-exported)


@dataclass(frozen=True)
class Hit:
    """One search result: its rank (1 = best), score, document id and text."""

    rank: int
    score: float
    id: str
    document: str

    def to_dict(self) -> dict:
        return asdict(self)


def find_run(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run folder from a path (``runs/latest``, ``runs/<id>``, anywhere) or a run id / prefix under ``runs_dir``."""
    path = Path(run)
    if path.is_dir() and (path / "config.json").exists():
        return path.resolve()
    from twotower_cli.runs import resolve_run

    return resolve_run(runs_dir, None if str(run) in ("latest", "") else str(run))


def load(run: str | Path = "runs/latest", index: str = "default", device: str = "cpu",
         runs_dir: str | Path = "runs") -> "TwoTowerModel":
    """Load a trained run (its model and the named index) for encoding and search."""
    return TwoTowerModel(find_run(run, runs_dir), index, device)


class TwoTowerModel(RunEncoder):
    """A trained run's towers (`RunEncoder`) with one of its indexes and its default search. Safe to share between
    threads: loading is done once, and a search reads one build of its index from start to end."""

    def __init__(self, run_dir: Path, index: str = "default", device: str = "cpu"):
        super().__init__(run_dir, device)
        self.plan = stored_plan(self.run_dir)  # the run's default search
        self.index_name = index
        self._index = None

    # -- indexes and search ---------------------------------------------------------------------------------------
    @property
    def index(self):
        """The index searched: one build, opened once; a rebuild of it (by `twotower index` or `index_documents`)
        is opened as a whole at the next search, never mixed with the one before."""
        self.check_unchanged()  # a run replaced under this object: said as such, not as an index of another model
        index = self._index
        if index is None or not index.current():
            with self._lock:
                if self._index is None or not self._index.current():
                    from twotower_cli.retrieval.index import load_index

                    self._index = load_index(self.run_dir, self.index_name, model=self.fingerprint)
                index = self._index
        return index

    def resolve_mode(self, hybrid: bool | None = None, mode: str | None = None,
                     weight: float | None = None) -> tuple[str, float]:
        """The search to run and its model weight (see `search_plan`)."""
        plan = self.search_plan(hybrid, mode, weight)
        return plan.mode, plan.hybrid_weight

    def search_plan(self, hybrid: bool | None = None, mode: str | None = None,
                    weight: float | None = None) -> SearchPlan:
        """``mode`` if given, else ``hybrid`` True/False, else the run's default search (chosen on validation when
        it was trained); a fusion at ``weight`` when given."""
        if mode is None and hybrid is not None:
            mode = "hybrid" if hybrid else "dense"
        return self.plan if mode is None and weight is None else self.plan.forced(mode, weight)

    def rank(self, queries: list[str], k: int, plan: SearchPlan | None = None, index=None):
        """Scores and index rows of the top ``k`` per query, best first, by ``plan`` (the run's default)."""
        return Search(plan or self.plan, self, index or self.index, self.device).rank(queries, k)

    def search(self, queries: str | Sequence[str], k: int = 10, hybrid: bool | None = None,
               mode: str | None = None, weight: float | None = None) -> list[list[Hit]]:
        """The top ``k`` documents of the index for each query (a string is one query).

        ``hybrid``: None uses the run's default search (what training chose on validation: dense, hybrid or
        bm25), True fuses BM25 and the model, False searches with the model alone. ``mode`` names one directly;
        ``weight`` is the model's share of a fusion (0..1)."""
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UsageError(f"k must be a positive integer, got {k!r}")
        queries = [clean(q) for q in queries]
        empty = next((i for i, q in enumerate(queries) if blank(q)), None)
        if empty is not None:
            raise UsageError(f"query {empty + 1} is empty (white space or invisible characters only); give some "
                             "words to search for")
        plan = self.search_plan(hybrid, mode, weight)
        from twotower_cli.retrieval.snapshot import Replaced

        for attempt in (0, 1):
            index = self.index  # one build for the whole search: its rows, its BM25 and its texts
            try:
                scores, rows = self.rank(queries, k, plan, index)
                wanted = sorted({r for rr in rows for r in rr if r >= 0})
                docs = dict(zip(wanted, index.documents(wanted)))
                break
            except Replaced:  # rebuilt while this search read it: once more, on the new build
                if attempt:
                    raise
        return [[Hit(j + 1, round(float(s), 6), str(docs[r]["id"]), docs[r]["document"])
                 for j, (s, r) in enumerate((s, r) for s, r in zip(ss, rr) if r >= 0)]
                for ss, rr in zip(scores, rows)]

    def index_documents(self, documents: Iterable[str], name: str, ids: Sequence[str] | None = None,
                        dtype: str = "float32", backend: str = "exact", layout: str = "auto") -> Path:
        """Embed ``documents`` into a new (or replaced) named index of this run; returns its folder. A hybrid run
        also gets the BM25 side. Use ``load(run, index=name)`` (or ``use_index``) to search it. ``layout``: as
        `twotower index --layout`."""
        import polars as pl

        from twotower_cli.retrieval.build import build_index

        docs = pl.Series("document", [clean(d) for d in documents], dtype=pl.String)
        if ids is not None and len(ids) != len(docs):
            raise UsageError(f"{len(ids)} ids for {len(docs)} documents")
        return build_index(self.run_dir, self.torch_model(), self.vocab,
                           [(docs, None if ids is None else [str(i) for i in ids])], name, self.device, dtype, backend,
                           bm25=self.plan.mode != "dense", layout=layout)

    def use_index(self, name: str) -> "TwoTowerModel":
        """Search another index of the same run from now on (a search under way finishes on the one it began)."""
        from twotower_cli.retrieval.index import load_index

        index = load_index(self.run_dir, name, model=self.fingerprint)
        with self._lock:
            self.index_name, self._index = name, index
        return self

    def __repr__(self) -> str:
        return (f"TwoTowerModel(run={self.run_dir.name!r}, encoder={self.config.encoder!r}, dim={self.dim}, "
                f"index={self.index_name!r}, search={self.plan.mode!r})")

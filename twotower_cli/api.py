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

import threading
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from twotower_cli.data.vocab import blank
from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.retrieval.hybrid import CANDIDATES
from twotower_cli.runs import search_choice

MODES = ("dense", "hybrid", "bm25")


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


def clean(text) -> str:
    """What files get when read: NFKC. A lone surrogate (possible in a Python str, never in a file) becomes
    U+FFFD, as an undecodable byte does."""
    text = unicodedata.normalize("NFKC", str(text))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def load(run: str | Path = "runs/latest", index: str = "default", device: str = "cpu",
         runs_dir: str | Path = "runs") -> "TwoTowerModel":
    """Load a trained run (its model and the named index) for encoding and search."""
    return TwoTowerModel(find_run(run, runs_dir), index, device)


class TwoTowerModel:
    """A trained two-tower model with one of its indexes. Safe to share between threads: loading is done once and
    searches only read."""

    def __init__(self, run_dir: Path, index: str = "default", device: str = "cpu"):
        from twotower_cli.data.vocab import Vocab
        from twotower_cli.model.config import ModelConfig
        from twotower_cli.model.files import fingerprint, read_config

        self.run_dir = Path(run_dir)
        self.device = device
        self.run_config = read_config(self.run_dir)
        self.config = ModelConfig(**self.run_config["model"])
        self.vocab = Vocab.load(self.run_dir / "vocab.json")
        if self.config.vocab_size != len(self.vocab):
            raise ArtifactError(f"{self.run_dir / 'vocab.json'}: {len(self.vocab)} entries but config.json says "
                                f"vocab_size {self.config.vocab_size}; the files come from different runs")
        self.fingerprint = fingerprint(self.run_dir)
        self.choice = search_choice(self.run_dir)
        self._lock = threading.Lock()
        self._torch = None  # (model) loaded on first need
        self._numpy = None
        self._bm25 = None
        self._verified = None
        self.index_name = index
        self._index = None

    # -- encoders -------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.output_dim

    def uses_numpy(self) -> bool:
        return self.config.encoder == "ngram" and self.device == "cpu"

    def _numpy_towers(self):
        with self._lock:
            if self._numpy is None:
                from twotower_cli.model.files import mapped_tensors
                from twotower_cli.model.numpy_encoder import NumpyTowers

                path = self.run_dir / "model.safetensors"
                tensors = mapped_tensors(path)
                # The fingerprint check reads every weight: done once per file (like git's stat cache, a marker
                # records the file's size, time and inode when it matched), on the other core, while the query is
                # answered.
                if not Verification.known_good(path, self.fingerprint, self.config):
                    self._verified = Verification(path, tensors, self.config, self.fingerprint)
                self._numpy = NumpyTowers(self.config, tensors, str(path))
            return self._numpy

    def torch_model(self):
        with self._lock:
            if self._torch is None:
                from twotower_cli.model.artifacts import load_model

                self._torch, _, _ = load_model(self.run_dir, self.device)
            return self._torch

    def _encode(self, texts: Sequence[str], side: str, batch_size: int) -> np.ndarray:
        if isinstance(texts, str):
            raise UsageError("give a list of texts (a single string would be read as characters)")
        texts = [clean(t) for t in texts]
        max_len = self.config.max_query_length if side == "query" else self.config.max_document_length
        parts = []
        for s in range(0, len(texts), max(1, batch_size)):
            ids = self.vocab.encode_list(texts[s:s + batch_size], max_len)
            if self.uses_numpy():
                parts.append(self._numpy_towers().encode(ids, side))
            else:
                import torch

                model = self.torch_model()
                with torch.no_grad():
                    t = torch.from_numpy(ids).to(self.device)
                    e = model.encode_queries(t) if side == "query" else model.encode_documents(t)
                parts.append(e.float().cpu().numpy())
        out = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        if self._verified is not None:
            self._verified.check()
        return out

    def query_lexical(self, texts: Sequence[str]):
        """The queries' exact lexical rows (`retrieval.lexical.SparseRows`), for an index that re-scores with them."""
        ids = self.vocab.encode_list([clean(t) for t in texts], self.config.max_query_length)
        if self.uses_numpy():
            return self._numpy_towers().lexical_rows(ids, "query")
        import torch

        from twotower_cli.model.encode import lexical_rows

        return lexical_rows(self.torch_model(), torch.from_numpy(ids), "query", self.device)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """Query embeddings, float32 [len(texts), dim]."""
        return self._encode(texts, "query", batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Document embeddings, float32 [len(texts), dim] (what an index stores)."""
        return self._encode(texts, "document", batch_size)

    # -- indexes and search ---------------------------------------------------------------------------------------
    @property
    def index(self):
        with self._lock:
            if self._index is None:
                from twotower_cli.retrieval.index import load_index

                self._index = load_index(self.run_dir, self.index_name)
            return self._index

    def bm25(self):
        index = self.index
        with self._lock:
            if self._bm25 is None:
                from twotower_cli.retrieval.bm25 import load_bm25

                self._bm25 = load_bm25(index)
            return self._bm25

    def resolve_mode(self, hybrid: bool | None = None, mode: str | None = None) -> tuple[str, float]:
        """The search to run and its dense weight: ``mode`` if given, else ``hybrid`` True/False, else the run's
        default (chosen on validation when it was trained)."""
        weight = float(self.choice.get("hybrid_weight", 0.5))
        if mode is None:
            mode = self.choice["mode"] if hybrid is None else ("hybrid" if hybrid else "dense")
        if mode not in MODES:
            raise UsageError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "hybrid" and not 0 < weight < 1:
            weight = 0.5  # forced hybrid on a run that chose one side alone: an even mix
        return mode, weight

    def rank(self, queries: list[str], k: int, mode: str, weight: float) -> tuple[list, list]:
        """Scores and index rows per query, best first."""
        if mode == "bm25":
            s, i = self.bm25().search(queries, k)
            return s.tolist(), i.tolist()
        qe = self.encode_queries(queries)
        index = self.index
        rows = self.query_lexical(queries) if index.lexical is not None else None
        ds, di = index.search(qe, max(k, CANDIDATES) if mode == "hybrid" else k, self.device, rows)
        if not np.isfinite(ds[di >= 0]).all():
            raise ArtifactError(f"{self.index.path / 'embeddings.npy'}: holds non-finite values (NaN or "
                                "infinity); rebuild the index: twotower index CORPUS --name " + self.index_name)
        if mode == "dense":
            return ds[:, :k].tolist(), di[:, :k].tolist()
        from twotower_cli.retrieval.hybrid import fuse

        ls, li = self.bm25().search(queries, max(k, CANDIDATES))
        return fuse(ds, di, ls, li, weight, k)

    def search(self, queries: str | Sequence[str], k: int = 10, hybrid: bool | None = None,
               mode: str | None = None) -> list[list[Hit]]:
        """The top ``k`` documents of the index for each query (a string is one query).

        ``hybrid``: None uses the run's default search (what training chose on validation: dense, hybrid or
        bm25), True fuses BM25 and the model, False searches with the model alone. ``mode`` names one directly."""
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UsageError(f"k must be a positive integer, got {k!r}")
        queries = [clean(q) for q in queries]
        empty = next((i for i, q in enumerate(queries) if blank(q)), None)
        if empty is not None:
            raise UsageError(f"query {empty + 1} is empty (white space or invisible characters only); give some "
                             "words to search for")
        mode, weight = self.resolve_mode(hybrid, mode)
        scores, rows = self.rank(queries, k, mode, weight)
        wanted = sorted({r for rr in rows for r in rr if r >= 0})
        docs = dict(zip(wanted, self.index.documents(wanted)))
        return [[Hit(j + 1, round(float(s), 6), str(docs[r]["id"]), docs[r]["document"])
                 for j, (s, r) in enumerate((s, r) for s, r in zip(ss, rr) if r >= 0)]
                for ss, rr in zip(scores, rows)]

    def index_documents(self, documents: Iterable[str], name: str, ids: Sequence[str] | None = None,
                        dtype: str = "float32", backend: str = "exact") -> Path:
        """Embed ``documents`` into a new (or replaced) named index of this run; returns its folder. A hybrid run
        also gets the BM25 side. Use ``load(run, index=name)`` (or ``use_index``) to search it."""
        import polars as pl

        from twotower_cli.retrieval.build import build_index

        docs = pl.Series("document", [clean(d) for d in documents], dtype=pl.String)
        if ids is not None and len(ids) != len(docs):
            raise UsageError(f"{len(ids)} ids for {len(docs)} documents")
        path = build_index(self.run_dir, self.torch_model(), self.vocab,
                           [(docs, None if ids is None else [str(i) for i in ids])], name, self.device, dtype, backend)
        self.after_indexing(name)
        return path

    def after_indexing(self, name: str) -> None:
        """Give a new index its BM25 side when this run's search uses it, and forget cached copies of it."""
        if self.choice["mode"] != "dense":
            from twotower_cli.retrieval.bm25 import read_all_documents, save_bm25
            from twotower_cli.retrieval.index import load_index

            index = load_index(self.run_dir, name)
            save_bm25(index.path, read_all_documents(index))
        if name == self.index_name:
            with self._lock:
                self._index = self._bm25 = None

    def use_index(self, name: str) -> "TwoTowerModel":
        """Search another index of the same run from now on."""
        with self._lock:
            self.index_name, self._index, self._bm25 = name, None, None
        return self

    def __repr__(self) -> str:
        return (f"TwoTowerModel(run={self.run_dir.name!r}, encoder={self.config.encoder!r}, dim={self.dim}, "
                f"index={self.index_name!r}, search={self.choice['mode']!r})")


class Verification:
    """The weights' fingerprint, computed in a thread (hashing releases the GIL) and checked before a result is
    returned: an altered model.safetensors is refused on the NumPy path too."""

    def __init__(self, path: Path, tensors: dict, cfg, expected: str):
        self.path, self.error, self.done = path, None, threading.Event()
        threading.Thread(target=self.run, args=(tensors, cfg, expected), daemon=True).start()

    @staticmethod
    def stamp(path: Path, fingerprint: str, cfg) -> dict:
        """What was verified: the file as it was (size, time, inode) and the settings of config.json that the
        fingerprint covers (an edited lexical or opening weight is checked again, and refused)."""
        from twotower_cli.model.files import with_settings

        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "fingerprint": fingerprint,
                "settings": with_settings("", cfg)}

    @staticmethod
    def marker(path: Path) -> Path:
        return path.parent / f".{path.name}.verified.json"

    @classmethod
    def known_good(cls, path: Path, fingerprint: str, cfg) -> bool:
        from twotower_cli.runs import read_json_or

        return read_json_or(cls.marker(path), {}) == cls.stamp(path, fingerprint, cfg)

    def run(self, tensors, cfg, expected):
        try:
            from twotower_cli.model.files import numpy_digest

            if numpy_digest(tensors, cfg) != expected:
                self.error = (f"{self.path}: weights do not match their recorded fingerprint; the file was altered "
                              "or damaged. Retrain, or restore the file from a copy")
            else:
                try:  # a read-only run: checked again next time
                    from twotower_cli.runs import atomic_write_json

                    atomic_write_json(self.marker(self.path), self.stamp(self.path, expected, cfg))
                except Exception:
                    pass
        except Exception as exc:  # pragma: no cover - reported below
            self.error = f"{self.path}: cannot be read ({exc})"
        finally:
            self.done.set()

    def check(self) -> None:
        self.done.wait()
        if self.error:
            raise ArtifactError(self.error)

"""An index opened for reading: one build's embeddings, exact lexical rows, documents and BM25, every file read
(or, when large, mapped) when it is opened, so that a reader never mixes two builds (`index.py` finds, checks and
opens the folder)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError
from twotower_cli.runs import file_stamp


class Replaced(ArtifactError):
    """The index was rebuilt while a reader used it: the reader opens the new build and tries again."""


class Strings:
    """A strings file of an index (`texts.bin`, `ids.bin`) and its offsets, read (or mapped) when the index is
    opened: a reader keeps the build it opened even when the index is rebuilt under it."""

    def __init__(self, folder: Path, name: str):
        import mmap

        self.path = folder / f"{name}.bin"
        from twotower_cli.model.files import IN_MEMORY_UP_TO, load_npy

        self.offsets = load_npy(folder / f"{name}.offsets.npy")
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > IN_MEMORY_UP_TO:  # (see IN_MEMORY_UP_TO)
                self.data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                self.data = fh.read()
                if len(self.data) != size:
                    raise ValueError("the file changed while it was read")
        self.size = size

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def range(self, a: int, b: int) -> list[str]:
        return self[list(range(a, min(b, len(self))))]

    def __getitem__(self, rows: list[int]) -> list[str]:
        out = []
        for r in rows:
            start, end = int(self.offsets[r]), int(self.offsets[r + 1])
            try:
                out.append(self.data[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise ArtifactError(f"{self.path}: entry {r} is not valid UTF-8; the file is damaged: rebuild "
                                    "the index") from None
        return out


class Index:
    """An index as one build: every file is opened (mapped) when it is loaded, BM25 on first use from the same
    folder, so a reader never mixes two builds. `current` tells whether the folder still holds that build."""

    def __init__(self, path: Path | None, meta: dict, embeddings: np.ndarray, lexical=None, texts=None, ids=None,
                 bm25=None, stamps: dict | None = None):
        self.path, self.meta, self.embeddings, self.lexical = path, meta, embeddings, lexical
        self.texts, self.ids = texts, ids
        self.stamps = stamps or {}  # every file opened: its inode, size and times when it was opened
        self._bm25, self._faiss, self.on_device = bm25, None, None  # (the embeddings copied once to a GPU)
        self._lock = threading.Lock()

    @classmethod
    def in_memory(cls, embeddings: np.ndarray, lexical, lexical_meta: dict | None, bm25) -> "Index":
        """An index held in memory (`evaluate`'s corpus): the same search, nothing on disk. ``bm25``: a callable
        that builds the BM25 side when first needed."""
        meta = {"count": int(embeddings.shape[0]), "dim": int(embeddings.shape[1])}
        if lexical is not None:
            meta["lexical"] = lexical_meta
        index = cls(None, meta, embeddings, lexical)
        index._build_bm25 = bm25
        return index

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "(in memory)"

    def current(self) -> bool:
        """Whether every file this object opened is as it was: a rebuild replaces meta.json, and a file written in
        place changes its change time whatever its modification time says (then the index is opened, and
        checked, again)."""
        for path, stamp in list(self.stamps.items()):  # (a copy: BM25, loaded on first use, adds its files)
            try:
                if file_stamp(path) != stamp:
                    return False
            except OSError:
                return False
        return True

    def damaged(self, name: str) -> ArtifactError:
        where = self.path / name if self.path is not None else name
        return ArtifactError(f"{where}: holds non-finite values (NaN or infinity); rebuild the index: twotower "
                             f"index CORPUS --name {self.name}")

    def documents(self, rows: list[int]) -> list[dict]:
        """Id and text of the given rows, read without loading the rest."""
        if self.texts is not None:
            return [{"row": r, "id": i, "document": t} for r, i, t in zip(rows, self.ids[rows], self.texts[rows])]
        import polars as pl  # format 1 indexes: the Parquet parts only

        p = self.path / "documents"
        try:
            frame = (pl.scan_parquet(p / "*.parquet").with_row_index("row").filter(pl.col("row").is_in(rows))
                     .collect())
        except Exception as exc:
            raise ArtifactError(f"{p}: cannot read ({str(exc).splitlines()[0]}); rebuild with twotower index") from None
        if not self.current():
            raise Replaced(f"{self.path}: rebuilt while it was being read")
        by_row = {r["row"]: r for r in frame.to_dicts()}
        missing = [r for r in rows if r not in by_row]
        if missing:
            raise ArtifactError(f"{p}: has no document for row {missing[0]} of the embeddings; rebuild the index")
        return [by_row[r] for r in rows]

    def all_documents(self) -> list[str]:
        if self.texts is not None:
            return self.texts[list(range(self.count))]
        import polars as pl

        return pl.read_parquet(self.path / "documents" / "*.parquet")["document"].to_list()

    def bm25(self):
        """The BM25 side of this build: loaded from its folder on first use (built, and saved when the folder is
        writable, for an index that has none)."""
        with self._lock:
            if self._bm25 is None:
                if self.path is None:
                    self._bm25 = self._build_bm25()
                else:
                    from twotower_cli.retrieval.bm25 import load_bm25

                    bm25 = load_bm25(self) if self.current() else None
                    if bm25 is None or not self.current():  # the folder now holds another build
                        raise Replaced(f"{self.path}: rebuilt while it was being read")
                    for file in ("bm25.json", "data.npy", "indices.npy", "indptr.npy"):
                        if (self.path / "bm25" / file).exists():  # (not where it was built for this process only)
                            self.stamps[self.path / "bm25" / file] = file_stamp(self.path / "bm25" / file)
                    self._bm25 = bm25
            return self._bm25

    def nearest(self, queries: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, min(k, count)] of the highest inner products, best first: exact in NumPy (or on a
        GPU, the embeddings copied there once), or FAISS HNSW when the index was built with it (-1: rows the graph
        could not fill)."""
        k = min(k, self.count)
        if self.meta.get("backend") == "faiss":
            index = self.faiss()
            index.hnsw.efSearch = max(int(self.meta.get("faiss", {}).get("ef_search", 128)), k)
            s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            return s, i.astype(np.int64)
        if device != "cpu":
            return self.nearest_on(queries, k, device)
        from twotower_cli.retrieval.topk_numpy import numpy_topk

        try:
            return numpy_topk(queries, self.embeddings, k)
        except FloatingPointError:
            raise self.damaged("embeddings.npy") from None

    def faiss(self):
        with self._lock:
            if self._faiss is None:
                import faiss

                self._faiss = faiss.read_index(str(self.path / "faiss.index"))
            return self._faiss

    def nearest_on(self, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from twotower_cli.retrieval.topk import exact_topk

        with self._lock:
            if self.on_device is None:
                self.on_device = torch.from_numpy(np.ascontiguousarray(self.embeddings)).to(device)
        s, i = exact_topk(torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(device), self.on_device, k)
        s, i = s.cpu().numpy(), i.cpu().numpy()
        if not np.isfinite(s).all():
            raise self.damaged("embeddings.npy")
        return s, i


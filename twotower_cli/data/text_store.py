"""Texts kept on disk instead of in memory: UTF-8 bytes one after the other, and their offsets; any rows are read
back by number, by NumPy and Python alone (no Polars needed to read).

Training reads its unique queries and documents into two stores while it streams the pairs file, so a process
holds the texts of one batch, not of the data set. Rows are read with `os.pread`, not through a memory map: what
is read goes to the OS's page cache (shared, dropped under pressure) instead of the process's resident memory,
where a pass over every document (the IDF, the validation index) would otherwise leave the whole file counted.
Tokenising in worker processes reads from here too, so nothing large is copied into each worker and no worker
touches Polars (whose thread pool does not survive a fork).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class StoreWriter:
    """Append strings to ``folder/name.bin``; `close` writes the offsets and returns the store."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), name
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.folder / f"{name}.bin", "wb")
        self._ends: list[np.ndarray] = []
        self._size = 0

    def add(self, texts) -> None:
        data = [(t or "").encode("utf-8") for t in texts]
        if not data:
            return
        self._fh.write(b"".join(data))
        ends = self._size + np.cumsum([len(b) for b in data], dtype=np.int64)
        self._size = int(ends[-1])
        self._ends.append(ends)

    def close(self) -> "TextStore":
        self._fh.close()
        offsets = np.concatenate([np.zeros(1, np.int64), *self._ends])
        np.save(self.folder / f"{self.name}.offsets.npy", offsets)
        return TextStore(self.folder, self.name)


class TextStore:
    """The strings of a store, indexed like the Polars Series training used to hold: ``len``, ``store[i]`` (a str),
    ``store[a:b]`` and ``gather(idx)`` (a Series), ``to_list``, and `rows` (a list, without Polars)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), name
        self._fd = self._offsets = None
        self._pid = None

    def _open(self):
        if self._fd is None or self._pid != os.getpid():  # opened lazily: in each worker process, after the fork
            self._offsets = np.load(self.folder / f"{self.name}.offsets.npy", mmap_mode="r")
            self._fd = os.open(self.folder / f"{self.name}.bin", os.O_RDONLY)
            self._pid = os.getpid()

    def __len__(self) -> int:
        self._open()
        return len(self._offsets) - 1

    def _read(self, a: int, b: int) -> bytes:
        return os.pread(self._fd, b - a, a) if b > a else b""

    def rows(self, idx) -> list[str]:
        self._open()
        off = self._offsets
        return [self._read(int(off[r]), int(off[r + 1])).decode("utf-8")
                for r in np.asarray(idx, dtype=np.int64).tolist()]

    def range(self, start: int, stop: int) -> list[str]:
        """Rows start..stop-1, read in one call."""
        self._open()
        stop = min(stop, len(self))
        if stop <= start:
            return []
        base = int(self._offsets[start])
        data = self._read(base, int(self._offsets[stop]))
        cuts = (self._offsets[start:stop + 1] - base).tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(cuts[:-1], cuts[1:])]

    def gather(self, idx):
        import polars as pl

        return pl.Series(self.rows(idx), dtype=pl.String)

    def __getitem__(self, key):
        if isinstance(key, slice):
            import polars as pl

            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TextStore slices take a step of 1")
            return pl.Series(self.range(start, stop), dtype=pl.String)
        n = len(self)
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self.rows([i % n])[0]

    def to_list(self) -> list[str]:
        return self.range(0, len(self))

    def __getstate__(self):
        return {"folder": self.folder, "name": self.name}

    def __setstate__(self, state):
        self.folder, self.name = state["folder"], state["name"]
        self._fd = self._offsets = self._pid = None

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

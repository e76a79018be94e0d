"""Texts kept on disk instead of in memory: UTF-8 bytes one after the other, and their offsets; any rows are read
back by number from the memory-mapped files, by NumPy and Python alone (no Polars). Tokenising in worker
processes reads the texts from here, so nothing large is copied into each worker and no worker touches Polars
(whose thread pool does not survive a fork)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_store(texts, folder: Path, name: str) -> "TextStore":
    """Write an iterable of strings (a Polars Series, a list) as ``folder/name.bin`` + ``name.offsets.npy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with open(folder / f"{name}.bin", "wb") as fh:
        for t in texts:
            b = (t or "").encode("utf-8")
            fh.write(b)
            offsets.append(offsets[-1] + len(b))
    np.save(folder / f"{name}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    return TextStore(folder, name)


class TextStore:
    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), name
        self._data = self._offsets = None

    def _open(self):
        if self._data is None:  # opened lazily: in each worker process, after the fork
            self._offsets = np.load(self.folder / f"{self.name}.offsets.npy", mmap_mode="r")
            size = int(self._offsets[-1])
            self._data = np.memmap(self.folder / f"{self.name}.bin", dtype=np.uint8, mode="r") if size else \
                np.zeros(0, np.uint8)

    def __len__(self) -> int:
        self._open()
        return len(self._offsets) - 1

    def rows(self, idx) -> list[str]:
        self._open()
        out = []
        for r in np.asarray(idx, dtype=np.int64).tolist():
            a, b = int(self._offsets[r]), int(self._offsets[r + 1])
            out.append(bytes(self._data[a:b]).decode("utf-8"))
        return out

    def __getstate__(self):
        return {"folder": self.folder, "name": self.name}

    def __setstate__(self, state):
        self.folder, self.name, self._data, self._offsets = state["folder"], state["name"], None, None

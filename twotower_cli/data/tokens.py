"""Token rows of a column of texts, tokenised up front or only when a step needs them.

One process tokenises every unique text once, before training: the fastest way when it trains on all of them.
Under torchrun each process trains on its own slice of every global batch, so it tokenises only those rows, at
the step that needs them (the next step's rows are prepared in a background thread while this one trains).
A process then holds no token matrix of the whole data set (the texts stay where they are: on disk, in a
`TextStore`, when training reads a file), and the tokenising work is divided among the processes. Both ways
give the same token rows, so a run's result does not depend on the choice.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class TokenTable:
    def __init__(self, texts, vocab, max_len: int, eager: bool = True):
        """``texts``: a Polars Series or a `TextStore` (anything with len, slices and ``gather``)."""
        self.vocab, self.max_len = vocab, max_len
        self.device = torch.device("cpu")
        self.texts = texts
        self.tokens = torch.from_numpy(encode_all(texts, vocab, max_len)) if eager else None
        self.rows_tokenised = len(texts) if eager else 0  # what this process has tokenised (tests, benchmarks)
        self._device_table = None

    @property
    def eager(self) -> bool:
        return self.tokens is not None

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.texts), self.max_len)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx) -> torch.Tensor:
        """Token rows [len(idx), max_len] on this table's device; ``idx`` is a slice or an index tensor."""
        if self.tokens is not None:
            return self.tokens[idx.to(self.tokens.device) if isinstance(idx, torch.Tensor) else idx]
        rows = text_list(self.texts, idx)
        self.rows_tokenised += len(rows)
        # The code points travel, the ids are looked up where they arrive: on a GPU that takes the lookup (the
        # costliest part of tokenising on a CPU) off the host. Code points < 0x110000 fit in int32.
        with warnings.catch_warnings():  # a read-only buffer; only read from
            warnings.simplefilter("ignore", UserWarning)
            cps = torch.from_numpy(self.vocab.codepoints_list(rows, self.max_len).view(np.int32))
        return torch.take(self._table(), cps.to(self.device, non_blocking=True).long())

    def _table(self) -> torch.Tensor:
        if self._device_table is None:  # uploaded once per device (``to`` forgets it)
            self._device_table = torch.from_numpy(self.vocab.table()).to(self.device)
        return self._device_table

    def subset(self, idx: torch.Tensor) -> "TokenTable":
        """The rows ``idx`` as a table of their own, tokenised the same way as this one (nothing copied when
        lazy: the texts are gathered, tokenised later)."""
        out = TokenTable.__new__(TokenTable)
        out.vocab, out.max_len, out.device, out.rows_tokenised = self.vocab, self.max_len, self.device, 0
        out._device_table = self._device_table
        out.texts = self.texts.gather(as_numpy(idx))  # a Series of the subset's texts
        out.tokens = None if self.tokens is None else self[idx]
        return out

    def to(self, device) -> "TokenTable":
        self.device = torch.device(device)
        self._device_table = None
        if self.tokens is not None:
            self.tokens = self.tokens.to(self.device)
        return self


def encode_all(texts, vocab, max_len: int, rows: int = 65536) -> np.ndarray:
    """Token rows of every text, encoded a slice at a time (the slice's working copies, not the column's)."""
    out = np.empty((len(texts), max_len), dtype=np.int32)
    for start in range(0, len(texts), rows):
        part = texts[start:start + rows]
        out[start:start + len(part)] = vocab.encode(part, max_len)
    return out


def text_list(texts, idx) -> list[str]:
    """Rows ``idx`` (a slice or indices) of a Polars Series or a `TextStore`, as Python strings."""
    if isinstance(idx, slice):
        return texts[idx].to_list()
    idx = as_numpy(idx)
    return texts.rows(idx) if hasattr(texts, "rows") else texts.gather(idx).to_list()


def as_numpy(idx) -> np.ndarray:
    return idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)

"""Token rows of a column of texts, tokenised up front or only when a step needs them.

One process tokenises every unique text once, before training: the fastest way when it trains on all of them.
Under torchrun each process trains on its own slice of every global batch, so it tokenises only those rows, at
the step that needs them (the next step's rows are prepared in a background thread while this one trains).
A process then holds the texts, not a token matrix of the whole data set, and the tokenising work is divided
among the processes. Both ways give the same token rows, so a run's result does not depend on the choice.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


class TokenTable:
    def __init__(self, texts: pl.Series, vocab, max_len: int, eager: bool = True):
        self.texts, self.vocab, self.max_len = texts, vocab, max_len
        self.device = torch.device("cpu")
        self.tokens = torch.from_numpy(vocab.encode(texts, max_len)) if eager else None
        self.rows_tokenised = len(texts) if eager else 0  # what this process has tokenised (tests, benchmarks)

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
        rows = self.texts[idx] if isinstance(idx, slice) else self.texts.gather(as_numpy(idx))
        self.rows_tokenised += len(rows)
        return torch.from_numpy(self.vocab.encode(rows, self.max_len)).to(self.device, non_blocking=True)

    def subset(self, idx: torch.Tensor) -> "TokenTable":
        """The rows ``idx`` as a table of their own, tokenised the same way as this one (nothing copied when
        lazy: the texts are gathered, tokenised later)."""
        out = TokenTable.__new__(TokenTable)
        out.vocab, out.max_len, out.device, out.rows_tokenised = self.vocab, self.max_len, self.device, 0
        out.texts = self.texts.gather(as_numpy(idx))
        out.tokens = None if self.tokens is None else self[idx]
        return out

    def to(self, device) -> "TokenTable":
        self.device = torch.device(device)
        if self.tokens is not None:
            self.tokens = self.tokens.to(self.device)
        return self


def as_numpy(idx) -> np.ndarray:
    return idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)

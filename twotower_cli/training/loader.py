"""Tokenising on demand in worker processes: a DataLoader whose item is one step's batch (this process's slice),
made by `make_batch` in a worker from texts read off a `TextStore`, pinned, the next batches prefetched.

One background thread (the default on a CPU, where the cores train) is enough when a step is slow; a GPU step is
faster than one host core can tokenise, so on a GPU several workers tokenise ahead. The batches are the same as
up front, step for step: the order, the negatives and the span pairs of an epoch are fixed before it starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from twotower_cli.data.text_store import StoreWriter, TextStore
from twotower_cli.training.batches import make_batch, sorted_member, step_positions


class StoreTable:
    """Token rows read from a TextStore of prepared texts (cut and lowercased): indexed like `TokenTable`, in a
    worker, with NumPy only."""

    def __init__(self, store: TextStore, table: np.ndarray, max_len: int):
        self.store, self.max_len = store, max_len
        # ids as 16-bit integers when they fit (a vocabulary of up to 32,767): half the bytes a batch takes through
        # shared memory to the training process, which widens them where they arrive
        self.table = table.astype(np.int16) if int(table.max()) <= np.iinfo(np.int16).max else table

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        texts = self.store.rows(idx.numpy())
        joined = "".join(t.ljust(self.max_len, "\0") for t in texts)
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).reshape(len(texts), self.max_len)
        return torch.from_numpy(self.table[cps])


@dataclass
class BatchSource:
    """What `make_batch` reads, without Polars objects (a worker gets a copy of this, not of the TrainingSet)."""
    pos_q: torch.Tensor
    pos_d: torch.Tensor
    n_queries: int
    n_documents: int
    pos_keys: torch.Tensor
    span_d: torch.Tensor | None
    span_tokens: torch.Tensor | None
    q_tokens: StoreTable
    d_tokens: StoreTable

    @property
    def n_train(self) -> int:
        return int(self.pos_q.shape[0])

    def is_pair(self, q_ids, d_ids):
        return sorted_member(q_ids * self.n_documents + d_ids, self.pos_keys) & (d_ids >= 0)


class StepBatches(torch.utils.data.Dataset):
    """Item j: (positions, batch) of step ``first + j`` for process ``rank``. The epoch's order, negatives and
    first step live in shared memory, so one set of worker processes serves every epoch: `next_epoch` rewrites
    them between epochs, when no worker is reading."""

    def __init__(self, src: BatchSource, n_order: int, steps, global_batch, rank, batch_size, loss):
        self.src = src
        self.order = torch.zeros(n_order, dtype=torch.long).share_memory_()
        self.negs = torch.zeros(src.n_train, dtype=torch.long).share_memory_()
        self.first = torch.zeros(1, dtype=torch.long).share_memory_()
        self.steps, self.global_batch = steps, global_batch
        self.rank, self.batch_size, self.loss = rank, batch_size, loss

    def next_epoch(self, order: torch.Tensor, negs: torch.Tensor, first: int) -> None:
        self.order.copy_(order.cpu())
        self.negs.copy_(negs.cpu())
        self.first.fill_(first)

    def __len__(self) -> int:
        return self.steps - int(self.first)

    def __getitem__(self, j: int):
        idx = self.order[step_positions(int(self.first) + j, self.steps, self.global_batch, self.rank,
                                        self.batch_size)]
        return idx, make_batch(self.src, idx, self.negs, self.loss)


class Stores:
    """The training set's texts written once, prepared for tokenising (cut and lowercased), to ``folder`` for the
    workers: a worker that read raw texts and prepared each batch's was ~1.15x slower on this CPU."""

    def __init__(self, train_set, folder):
        self.folder = folder
        q, d = train_set.q_tokens, train_set.d_tokens
        self.queries = write_prepared(train_set.queries, q.vocab, q.max_len, folder, "queries")
        self.documents = write_prepared(train_set.documents, d.vocab, d.max_len, folder, "documents")

    def source(self, train_set) -> BatchSource:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        table = train_set.q_tokens.vocab.table()
        return BatchSource(train_set.pos_q.cpu(), train_set.pos_d.cpu(), train_set.n_queries,
                           train_set.n_documents, train_set.pos_keys.cpu(), cpu(train_set.span_d),
                           cpu(train_set.span_tokens),
                           StoreTable(self.queries, table, train_set.q_tokens.max_len),
                           StoreTable(self.documents, table, train_set.d_tokens.max_len))


def write_prepared(texts, vocab, max_len: int, folder, name: str, rows: int = 65536) -> TextStore:
    """The texts cut and lowercased for tokenising, written a slice at a time."""
    w = StoreWriter(folder, name)
    for start in range(0, len(texts), rows):
        w.add(vocab.prepare_texts(texts[start:start + rows], max_len).to_list())
    return w.close()


def worker_count(setting: int, device: torch.device, local_world: int = 1) -> int:
    """-1: automatic. None on a CPU (the cores train; one thread prepares the next step); on a GPU a share of the
    host's cores among the processes of this machine, at most 8."""
    if setting >= 0:
        return setting
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(1, local_world) - 1))


class WorkerBatches:
    """(positions, batch) per step, tokenised in ``workers`` processes, pinned and moved to ``device``.

    The workers start once and live across epochs (no epoch pays for forking them; on an H200 the rate did not
    change: tokenising, not starting, is the limit). Span pairs change the training set itself every epoch: with
    them, workers start anew each epoch."""

    def __init__(self, stores: Stores, train_set, steps, global_batch, rank, batch_size, loss, device, workers: int):
        self.stores, self.train_set, self.device = stores, train_set, device
        self.args = (steps, global_batch, rank, batch_size, loss)
        self.workers = workers
        self.loader = None

    def epoch(self, order: torch.Tensor, negs: torch.Tensor, first: int):
        if self.loader is None or self.train_set.span_d is not None:
            data = StepBatches(self.stores.source(self.train_set), len(order), *self.args)
            self.loader = torch.utils.data.DataLoader(
                data, batch_size=None, shuffle=False, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                prefetch_factor=4, persistent_workers=True, multiprocessing_context="fork")
        self.loader.dataset.next_epoch(order, negs, first)
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        wide = lambda t: move(t).int()  # noqa: E731  (token ids travel as int16)
        for idx, batch in self.loader:
            yield move(idx), type(batch)(move(batch.qi), move(batch.di), move(batch.ni), wide(batch.q_tokens),
                                         wide(batch.d_tokens))

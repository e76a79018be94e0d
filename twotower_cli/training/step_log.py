"""The per-step bookkeeping of the training loop: the running loss, the epoch's pairs and wall time, and timings of
the phases of a step."""

from __future__ import annotations

import time

import torch


class StepLog:
    """The per-step bookkeeping: the running loss kept on the device (no sync per step), the epoch's pairs and wall
    time, and timings of the phases of a step (synchronised on log steps only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.loss, self.n = torch.zeros((), device=device), 0
        self.epoch_t0, self.pairs, self.marks = time.perf_counter(), 0, []

    def start_epoch(self) -> None:
        self.epoch_t0, self.pairs = time.perf_counter(), 0

    def timed(self, batches):
        """``batches``, noting when each step starts waiting for its batch (the data time)."""
        try:
            while True:
                self.marks = [time.perf_counter()]
                try:
                    item = next(batches)
                except StopIteration:
                    return
                yield item
        finally:
            batches.close()

    def mark(self, timed: bool) -> None:
        if timed:
            self.sync()
        self.marks.append(time.perf_counter())

    def flush(self, state: dict) -> None:
        """Move the running loss into the checkpointed state (this syncs the device)."""
        if self.n:
            state["loss_sum"] += float(self.loss)
            state["loss_n"] += self.n
            self.loss, self.n = torch.zeros((), device=self.device), 0

    def timing(self, pairs: int) -> dict:
        t = self.marks
        return {"perf/data_ms": 1e3 * (t[1] - t[0]), "perf/forward_ms": 1e3 * (t[2] - t[1]),
                "perf/backward_ms": 1e3 * (t[3] - t[2]), "perf/optim_ms": 1e3 * (t[4] - t[3]),
                "perf/pairs_per_s": pairs / max(t[4] - t[0], 1e-9)}

    def running_rate(self, world: int) -> float:
        """The epoch so far: pairs done over wall time (what a progress bar should show, not one step's rate)."""
        return world * self.pairs / max(time.perf_counter() - self.epoch_t0, 1e-9)

"""The training loop. `fit` reads top to bottom: epochs, steps, `train_step`, `end_epoch`.

Everything the loop depends on is a pure function of (seed, epoch, step) or is in the checkpoint, so an
interrupted run resumes to the same result. Hooks (progress, messages) are supplied by the caller; the library
never prints.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from twotower_cli.errors import TrainingError, UsageError
from twotower_cli.evaluation.evaluate import evaluate_model
from twotower_cli.model import losses
from twotower_cli.model.artifacts import load_checkpoint, save_checkpoint, save_model
from twotower_cli.training.batches import (Batch, epoch_batches, epoch_order, sample_negatives, span_pairs,
                                            steps_per_epoch)
from twotower_cli.training.optim import grad_norm, lr_at, make_optimizers, set_lr
from twotower_cli.training.step_log import StepLog


MAX_GRAD_NORM = 1.0  # gradient clipping of a transformer's weights, as in sentence-transformers' training


class Hooks:
    """Progress callbacks; the CLI supplies one that draws progress bars (or plain lines outside a terminal)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...
    def step(self, record: dict) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class Outcome:
    interrupted: bool = False
    best_epoch: int = -1
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    global_step: int = 0


@dataclass
class Validation:
    """What end_epoch scores: validation queries over a corpus (all documents, or a sample), and optionally an
    extra evaluation set (``train --eval``)."""
    corpus_ids: torch.Tensor | None = None  # rows of the training documents searched (None: all)
    qrels: list | None = None  # per validation query, relative to corpus_ids when set
    extra: object = None  # with q_tokens, d_tokens, qrels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices; use cuda:0..")
        return dev
    raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto")


def batch_loss(net, batch: Batch, cfg, ddp=None, known=None) -> tuple:
    """Embed one batch and compute its loss. ``net`` is the model or its DistributedDataParallel wrapper; under
    DDP with gather_negatives the InfoNCE loss sees the documents of every process's batch."""
    b = batch.qi.shape[0]
    q, docs = net(batch.q_tokens, batch.d_tokens)
    if cfg.loss == "triplet":
        return losses.triplet(q, docs[:b], docs[b:], cfg.margin)
    d, n = docs[:b], docs[b:]
    if ddp is not None and cfg.gather_negatives:
        from twotower_cli.training.distributed import gather, gather_ids, gather_ragged

        return losses.infonce(q, gather(d), gather_ids(batch.di), gather_ids(batch.qi), gather_ragged(n),
                              gather_ids(batch.ni), cfg.temperature, offset=ddp.rank * b, known=known)
    return losses.infonce(q, d, batch.di, batch.qi, n, batch.ni, cfg.temperature, known=known)


def use_hard_negatives(model, train_set, kind: str, epoch: int, run_dir: Path, device, file_negatives, ddp=None):
    """Each query's negatives = the file's label-0 documents + mined ones (bm25: once; model: from epoch 2).
    Under DDP rank 0 mines (or reads the run folder's cache) and sends the lists to the others."""
    from twotower_cli.training import mining
    from twotower_cli.training.batches import add_negatives

    train_set.neg_ptr, train_set.neg_doc = file_negatives
    if kind == "model" and epoch == 0:
        return  # the first epoch is the first pass
    key = 0 if kind == "bm25" else epoch
    if kind == "bm25":
        mine = lambda: mining.mine_with_bm25(train_set)  # noqa: E731
    else:
        mine = lambda: mining.mine_with_model(model, train_set, device)  # noqa: E731
    if ddp is None or ddp.main:
        q, d = mining.cached(run_dir, key, mine)
    if ddp is not None:
        q, d = ddp.broadcast((q, d) if ddp.main else None)
    add_negatives(train_set, q, d)
    train_set.neg_ptr, train_set.neg_doc = train_set.neg_ptr.to(device), train_set.neg_doc.to(device)


class Loop:
    """The state of one `fit`: model, optimisers, checkpointed counters, and the two things a loop does."""

    def __init__(self, model, train_set, tcfg, run_dir: Path, device, tracker, hooks: Hooks, resume: bool, ddp,
                 validation: Validation):
        self.model, self.train_set, self.cfg, self.run_dir, self.device = model, train_set, tcfg, run_dir, device
        self.tracker, self.hooks, self.ddp, self.validation = tracker, hooks, ddp, validation
        self.world, self.rank = (ddp.world, ddp.rank) if ddp else (1, 0)
        self.main = self.rank == 0
        self.global_batch = tcfg.batch_size * self.world
        # the file's pairs, then span pairs
        n_epoch = train_set.n_train + int(round(tcfg.span_pairs * train_set.n_train))
        self.spe = steps_per_epoch(n_epoch, tcfg.batch_size, self.world)
        self.total = self.spe * tcfg.epochs
        if tcfg.max_steps > 0:
            self.total = min(self.total, tcfg.max_steps)
        self.opts = make_optimizers(model, tcfg.learning_rate, tcfg.weight_decay)
        self.ckpt = run_dir / "checkpoint.safetensors"
        self.state = {"epoch": 0, "step": 0, "global_step": 0, "loss_sum": 0.0, "loss_n": 0, "best_mrr": None,
                   "best_epoch": -1, "best": {}, "history": [], "world_size": self.world}
        if resume and self.ckpt.exists():
            self.state = load_checkpoint(self.ckpt, model, self.opts)
            model.to(device)
            if self.state.get("world_size", 1) != self.world:
                n = self.state.get("world_size", 1)
                raise UsageError(f"{self.ckpt} was written by {n} processes; resume it with the same number "
                                 f"(torchrun --nproc_per_node {n}), not {self.world}")
        self.net = model
        if ddp:
            from twotower_cli.training.distributed import wrap

            self.net = wrap(model, device)
        # bf16 autocast on CUDA only: bf16 matmuls on a CPU are hundreds of times slower
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if tcfg.precision == "bf16" and device.type == "cuda" else nullcontext())
        self.log = StepLog(device)
        if not tcfg.file_negatives:  # in-batch negatives only (and mined ones, with --hard-negatives)
            train_set.neg_ptr, train_set.neg_doc = torch.zeros_like(train_set.neg_ptr), train_set.neg_doc[:0]
        self.file_negatives = (train_set.neg_ptr, train_set.neg_doc)
        self.worker_batches = None
        # on demand: worker processes when a GPU's step is faster than one core tokenises
        if not train_set.d_tokens.eager:
            from twotower_cli.training.loader import Stores, WorkerBatches, worker_count

            workers = worker_count(tcfg.loader_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            if workers:
                import tempfile

                self._texts = tempfile.TemporaryDirectory(  # inside the training texts' folder when on disk
                    prefix=".prepared-", dir=getattr(train_set.documents, "folder", None))
                self.worker_batches = WorkerBatches(Stores(train_set, self._texts.name), train_set, self.spe,
                                                    self.global_batch, self.rank, tcfg.batch_size, tcfg.loss, device,
                                                    workers)
        self.last_checkpoint = time.monotonic()

    @property
    def done(self) -> bool:
        return self.state["global_step"] >= self.total

    def begin_epoch(self, epoch: int):
        """This epoch's negatives, span pairs and order; an iterator of (positions, batch) from the current step."""
        train_set, cfg = self.train_set, self.cfg
        if cfg.hard_negatives != "none":
            use_hard_negatives(self.model, train_set, cfg.hard_negatives, epoch, self.run_dir, self.device,
                               self.file_negatives, self.ddp)
        span_pairs(train_set, train_set.q_tokens.vocab, train_set.q_tokens.max_len, cfg.span_pairs, cfg.seed, epoch)
        order = epoch_order(train_set.n_epoch, cfg.seed, epoch)
        negs = sample_negatives(train_set, cfg.seed, epoch)  # on the CPU: worker processes read it from shared memory
        self.hooks.epoch_start(epoch, cfg.epochs, self.spe, self.state["step"])
        self.log.start_epoch()
        if self.worker_batches is not None:  # on demand, in worker processes that live across epochs
            return self.log.timed(self.worker_batches.epoch(order, negs, self.state["step"]))
        return self.log.timed(epoch_batches(train_set, order, negs.to(self.device), self.state["step"], self.spe,
                                            self.global_batch, self.rank, cfg.batch_size, cfg.loss, self.device,
                                            prefetch=not train_set.d_tokens.eager))

    def train_step(self, idx: torch.Tensor, batch: Batch, epoch: int, i: int) -> dict:
        """One optimiser step on one batch; returns the record that progress and the logs show."""
        state, cfg, log = self.state, self.cfg, self.log
        lr = lr_at(state["global_step"], self.total, cfg.learning_rate, cfg.warmup_fraction)
        if self.model.transformer is not None:  # dropout masks a function of (seed, step): resume is exact
            torch.manual_seed(cfg.seed * 1_000_003 + state["global_step"])
            self.model.transformer.forget()  # the weights change with this step
        set_lr(self.opts, lr)
        log_now = (state["global_step"] + 1) % cfg.log_every == 0 or i == self.spe - 1
        log.mark(log_now)
        with self.autocast:
            loss, stats = batch_loss(self.net, batch, cfg, self.ddp, self.train_set.is_positive)
        log.mark(log_now)
        check_now = log_now or self.device.type == "cpu"  # a sync is free on a CPU: check every step there
        value = float(loss.detach()) if check_now else None
        log.loss += loss.detach().float()
        log.n += 1
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.ddp:  # the tables' sparse gradients: NCCL cannot reduce them, so they are gathered (distributed.py)
            from twotower_cli.training.distributed import reduce_sparse

            reduce_sparse(self.model, self.world)
        log.mark(log_now)
        gnorm = grad_norm(self.model) if log_now else None
        if self.model.transformer is not None:  # a pretrained encoder: one outlier batch must not undo it
            torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), MAX_GRAD_NORM)
        if check_now and not (math.isfinite(value) and (gnorm is None or math.isfinite(gnorm))):
            self.diverged(epoch, f"loss {value}, gradient norm {gnorm}")
        for opt in self.opts.values():
            opt.step()
        log.mark(log_now)
        state["step"], state["global_step"] = i + 1, state["global_step"] + 1
        log.pairs += idx.shape[0]
        record = {"step": state["global_step"], "perf/running_pairs_per_s": log.running_rate(self.world)}
        if log_now:
            log.flush(state)
            pos, neg = float(stats["pos_sim"]), float(stats["neg_sim"])
            record.update({"epoch": epoch + (i + 1) / self.spe, "train/loss": value, "train/pos_sim": pos,
                           "train/neg_sim": neg, "train/sim_gap": pos - neg, "train/grad_norm": gnorm,
                           "train/lr": lr, **log.timing(idx.shape[0])})
            self.tracker.log({k: v for k, v in record.items() if k != "perf/running_pairs_per_s"})
        return record

    def diverged(self, epoch: int, what: str) -> None:
        kept = (f"the last good checkpoint and model in {self.run_dir} are kept" if self.state["best_epoch"] > 0
                else f"no epoch finished, so {self.run_dir} holds no model")
        cause = (f"lower --learning-rate (now {self.cfg.learning_rate:g})" if self.cfg.temperature >= 0.01
                 else f"raise --temperature (now {self.cfg.temperature:g}: logits of 1/temperature overflow)")
        raise TrainingError(f"training diverged at step {self.state['global_step'] + 1} (epoch {epoch + 1}): {what}; "
                            f"{cause} or check the data. {kept[0].upper() + kept[1:]}")

    def checkpoint(self) -> None:
        """Write the resumable state; never one holding NaN weights (the loss is checked first)."""
        self.log.flush(self.state)
        if self.state["loss_n"] and not math.isfinite(self.state["loss_sum"]):
            self.diverged(self.state["epoch"], f"mean loss {self.state['loss_sum']} since the last check")
        if self.main:
            save_checkpoint(self.ckpt, self.model, self.opts, self.state)
        self.last_checkpoint = time.monotonic()

    def checkpoint_due(self) -> bool:
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and time.monotonic() - self.last_checkpoint > 60 * minutes

    def stop_requested(self, should_stop: Callable[[], bool]) -> bool:
        stop = should_stop()
        return self.ddp.any(stop) if self.ddp else stop  # every process stops at the same step

    def end_epoch(self, epoch: int, partial: bool = False) -> None:
        """Validation, the best model so far, the checkpoint. Rank 0 validates and writes; the others wait."""
        state, train_set, v = self.state, self.train_set, self.validation
        self.log.flush(state)
        if state["loss_n"] and not math.isfinite(state["loss_sum"]):
            self.diverged(epoch, f"mean loss {state['loss_sum'] / state['loss_n']} over the epoch")
        train_s = time.perf_counter() - self.log.epoch_t0
        record = {"step": state["global_step"], "epoch": epoch + (state["step"] / self.spe if partial else 1),
                  "epoch/loss": state["loss_sum"] / max(state["loss_n"], 1), "perf/epoch_train_s": train_s,
                  "perf/epoch_pairs_per_s": self.world * self.log.pairs / max(train_s, 1e-9)}
        if self.main:
            if len(train_set.val_q):
                corpus = train_set.d_tokens if v.corpus_ids is None else train_set.d_tokens.subset(v.corpus_ids)
                qrels = train_set.val_qrels if v.corpus_ids is None else v.qrels
                t = time.perf_counter()
                scores = evaluate_model(self.model, train_set.q_tokens[train_set.val_q], corpus, qrels, self.device)
                record.update({f"val/{k}": x for k, x in scores.items()}, **{"perf/val_s": time.perf_counter() - t})
            if v.extra is not None:
                scores = evaluate_model(self.model, v.extra.q_tokens, v.extra.d_tokens, v.extra.qrels, self.device)
                record.update({f"eval/{k}": x for k, x in scores.items()})
            mrr = record.get("val/mrr@10", -record["epoch/loss"])  # no validation split: lowest loss wins
            if state["best_mrr"] is None or mrr > state["best_mrr"]:
                state["best_mrr"], state["best_epoch"] = mrr, epoch + 1
                state["best"] = {k: x for k, x in record.items() if k.startswith(("val/", "eval/"))}
                save_model(self.run_dir, self.model)
            record["best_epoch"] = state["best_epoch"]
            self.tracker.log(record)
            self.hooks.epoch_end(record)
            state["history"].append(record)
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
        self.checkpoint()
        if self.ddp:
            self.ddp.barrier()

    def outcome(self, interrupted: bool) -> Outcome:
        state = self.state
        return Outcome(interrupted, state["best_epoch"], state["best"], state["history"], state["global_step"])


def fit(model, train_set, tcfg, run_dir: Path, device: torch.device, tracker, hooks: Hooks,
        should_stop: Callable[[], bool], resume: bool = False, validation: Validation | None = None,
        ddp=None) -> Outcome:
    """Train ``model`` on ``ts``, validating after every epoch; the best epoch's weights are the run's model.

    Under DDP (``ddp`` set) a global batch is ``batch_size`` x processes positives of one shared permutation;
    process r trains on its r-th slice, and only rank 0 validates and writes."""
    if tcfg.epochs == 0:  # a base model as it is: its weights are the run's model
        if ddp is None or ddp.main:
            save_model(run_dir, model)
        return Outcome(best_epoch=0)
    loop = Loop(model, train_set, tcfg, run_dir, device, tracker, hooks, resume, ddp, validation or Validation())
    model.train()
    for epoch in range(loop.state["epoch"], tcfg.epochs):
        if loop.done:
            break
        batches = loop.begin_epoch(epoch)
        for i in range(loop.state["step"], loop.spe):
            idx, batch = next(batches)
            hooks.step(loop.train_step(idx, batch, epoch, i))
            if loop.stop_requested(should_stop):
                batches.close()
                loop.checkpoint()
                return loop.outcome(True)
            if loop.done:  # --max-steps
                batches.close()
                break
            if loop.checkpoint_due():
                loop.checkpoint()
        loop.end_epoch(epoch, partial=loop.state["step"] < loop.spe)
        if should_stop() and epoch + 1 < tcfg.epochs and not loop.done and not ddp:
            return loop.outcome(True)
    return loop.outcome(False)

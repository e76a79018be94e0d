"""The training loop: one visible loop over epochs and steps, with pure helpers around it.

Everything the loop depends on is a pure function of (seed, epoch, step) or is in the checkpoint, so an
interrupted run resumes to the same result. Hooks (progress, messages) are supplied by the caller; the library
never prints.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from twotower_cli import losses
from twotower_cli.artifacts import load_checkpoint, save_checkpoint, save_model
from twotower_cli.batches import Batch, TrainingSet, epoch_batches, epoch_order, sample_negatives, steps_per_epoch
from twotower_cli.errors import TrainingError, UsageError
from twotower_cli.evaluation import evaluate_model
from twotower_cli.model import TwoTower


class Hooks:
    """Progress callbacks; the CLI supplies one that draws rich progress bars."""

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


def make_optimizers(model: TwoTower, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    opts = {"dense": torch.optim.AdamW(model.dense_parameters(), lr=lr, weight_decay=weight_decay)}
    if model.sparse_parameters():
        opts["sparse"] = torch.optim.SparseAdam(model.sparse_parameters(), lr=lr)
    return opts


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up, then linear decay to zero: a pure function of the step (nothing to checkpoint)."""
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


def grad_norm(model: TwoTower, coalesce: bool = False) -> float:
    """L2 norm of all gradients. ``coalesce`` for sparse gradients summed from several processes (DDP)."""
    sq = 0.0
    for p in model.parameters():
        if p.grad is None:
            continue
        # Every distinct bucket of a table is looked up once per step (once for both towers when they share it),
        # so a sparse gradient's indices are already unique: the norm of its values is exact without coalescing.
        g = (p.grad.coalesce()._values() if coalesce else p.grad._values()) if p.grad.is_sparse else p.grad
        sq += float(g.detach().float().pow(2).sum())
    return math.sqrt(sq)


def batch_loss(net, batch: Batch, cfg, ddp=None) -> tuple:
    """Embed one batch and compute its loss. ``net`` is the model or its DistributedDataParallel wrapper; under
    DDP with gather_negatives the InfoNCE loss sees the documents of every process's batch."""
    b = batch.qi.shape[0]
    q, docs = net(batch.q_tokens, batch.d_tokens)
    if cfg.loss == "triplet":
        return losses.triplet(q, docs[:b], docs[b:], cfg.margin)
    d, n = docs[:b], docs[b:]
    if ddp is not None and cfg.gather_negatives:
        from twotower_cli.distributed import gather, gather_ids, gather_ragged

        return losses.infonce(q, gather(d), gather_ids(batch.di), gather_ids(batch.qi), gather_ragged(n),
                              gather_ids(batch.ni), cfg.temperature, offset=ddp.rank * b)
    return losses.infonce(q, d, batch.di, batch.qi, n, batch.ni, cfg.temperature)


def use_hard_negatives(model, ts, kind: str, epoch: int, run_dir: Path, device, file_negatives, ddp=None):
    """Each query's negatives = the file's label-0 documents + mined ones (bm25: once; model: from epoch 2).
    Under DDP rank 0 mines (or reads the run folder's cache) and sends the lists to the others."""
    from twotower_cli import mining
    from twotower_cli.batches import add_negatives

    ts.neg_ptr, ts.neg_doc = file_negatives
    if kind == "model" and epoch == 0:
        return  # the first epoch is the first pass
    key = 0 if kind == "bm25" else epoch
    mine = (lambda: mining.mine_with_bm25(ts)) if kind == "bm25" else (lambda: mining.mine_with_model(model, ts, device))
    if ddp is None or ddp.main:
        q, d = mining.cached(run_dir, key, mine)
    if ddp is not None:
        q, d = ddp.broadcast((q, d) if ddp.main else None)
    add_negatives(ts, q, d)
    ts.neg_ptr, ts.neg_doc = ts.neg_ptr.to(device), ts.neg_doc.to(device)


def fit(model: TwoTower, ts: TrainingSet, tcfg, run_dir: Path, device: torch.device, tracker,
        hooks: Hooks, should_stop: Callable[[], bool], resume: bool = False, extra_eval=None,
        val_docs: torch.Tensor | None = None, val_qrels: list | None = None, ddp=None) -> Outcome:
    """Train ``model`` on ``ts``; validation searches ``val_docs`` (default: every document).

    Under DDP (``ddp`` set) a global batch is ``batch_size`` x processes positives of one shared permutation;
    process r trains on its r-th slice, and only rank 0 validates and writes."""
    world, rank = (ddp.world, ddp.rank) if ddp else (1, 0)
    main = rank == 0
    global_batch = tcfg.batch_size * world
    # under DDP every process must take the same number of equal steps: the ragged last batch is dropped
    spe = ts.n_train // global_batch if ddp else steps_per_epoch(ts.n_train, tcfg.batch_size)
    total = spe * tcfg.epochs
    opts = make_optimizers(model, tcfg.learning_rate, tcfg.weight_decay)
    ckpt = run_dir / "checkpoint.safetensors"
    st = {"epoch": 0, "step": 0, "global_step": 0, "loss_sum": 0.0, "loss_n": 0, "best_mrr": None,
          "best_epoch": -1, "best": {}, "history": [], "world_size": world}
    if resume and ckpt.exists():
        st = load_checkpoint(ckpt, model, opts)
        model.to(device)
        if st.get("world_size", 1) != world:
            raise UsageError(f"{ckpt} was written by {st.get('world_size', 1)} processes; resume it with the same "
                             f"number (torchrun --nproc_per_node {st.get('world_size', 1)}), not {world}")
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tcfg.precision == "bf16" and device.type == "cuda"
                else nullcontext())  # never on CPU: bf16 matmuls there are hundreds of times slower
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    last_ckpt = time.monotonic()

    def checkpoint():
        if main:
            save_checkpoint(ckpt, model, opts, st)

    def outcome(interrupted: bool) -> Outcome:
        return Outcome(interrupted, st["best_epoch"], st["best"], st["history"], st["global_step"])

    acc = torch.zeros((), device=device)  # running loss sum on the device: no sync per step
    acc_n = 0

    def flush():
        nonlocal acc, acc_n
        if acc_n:
            st["loss_sum"] += float(acc)
            st["loss_n"] += acc_n
            acc, acc_n = torch.zeros((), device=device), 0

    model.train()
    file_negatives = (ts.neg_ptr, ts.neg_doc)
    for epoch in range(st["epoch"], tcfg.epochs):
        if tcfg.hard_negatives != "none":
            use_hard_negatives(model, ts, tcfg.hard_negatives, epoch, run_dir, device, file_negatives, ddp)
        order = epoch_order(ts.n_train, tcfg.seed, epoch)
        negs = sample_negatives(ts, tcfg.seed, epoch).to(device)
        hooks.epoch_start(epoch, tcfg.epochs, spe, st["step"])
        epoch_t0, epoch_pairs = time.perf_counter(), 0
        batches = epoch_batches(ts, order, negs, st["step"], spe, global_batch, rank, tcfg.batch_size, tcfg.loss,
                                device, prefetch=not ts.d_tokens.eager)
        for i in range(st["step"], spe):
            t0 = time.perf_counter()
            idx, batch = next(batches)
            if idx.shape[0] < 2:
                continue
            lr = lr_at(st["global_step"], total, tcfg.learning_rate, tcfg.warmup_fraction)
            for opt in opts.values():
                for g in opt.param_groups:
                    g["lr"] = lr
            log_now = (st["global_step"] + 1) % tcfg.log_every == 0 or i == spe - 1
            if log_now:
                sync()
            t1 = time.perf_counter()
            with autocast:
                loss, stats = batch_loss(net, batch, tcfg, ddp)
            if log_now:
                sync()
            t2 = time.perf_counter()
            check_now = log_now or device.type == "cpu"  # a sync is free on CPU: check every step there
            value = float(loss.detach()) if check_now else None
            acc += loss.detach().float()
            acc_n += 1
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if log_now:
                sync()
            t3 = time.perf_counter()
            gnorm = grad_norm(model, coalesce=ddp is not None) if log_now else None
            if check_now and not (math.isfinite(value) and (gnorm is None or math.isfinite(gnorm))):
                raise TrainingError(f"training diverged at step {st['global_step'] + 1} (epoch {epoch + 1}): "
                                    f"loss {value}, gradient norm {gnorm}; lower --learning-rate (now "
                                    f"{tcfg.learning_rate:g}) or check the data. The last good checkpoint and "
                                    f"model in {run_dir} are kept")
            for opt in opts.values():
                opt.step()
            if log_now:
                sync()
            t4 = time.perf_counter()
            st["step"], st["global_step"] = i + 1, st["global_step"] + 1
            epoch_pairs += idx.shape[0]
            if log_now:
                flush()
                timing = {"perf/data_ms": 1e3 * (t1 - t0), "perf/forward_ms": 1e3 * (t2 - t1),
                          "perf/backward_ms": 1e3 * (t3 - t2), "perf/optim_ms": 1e3 * (t4 - t3),
                          "perf/pairs_per_s": idx.shape[0] / max(t4 - t0, 1e-9)}
                pos, neg = float(stats["pos_sim"]), float(stats["neg_sim"])
                record = {"step": st["global_step"], "epoch": epoch + (i + 1) / spe, "train/loss": value,
                          "train/pos_sim": pos, "train/neg_sim": neg, "train/sim_gap": pos - neg,
                          "train/grad_norm": gnorm, "train/lr": lr, **timing}
                tracker.log(record)
                hooks.step(record)
            else:
                hooks.step({"step": st["global_step"]})
            stop = should_stop()
            if ddp:
                stop = ddp.any(stop)  # every process stops at the same step
            if stop:
                batches.close()
                flush()
                checkpoint()
                return outcome(True)
            if tcfg.checkpoint_minutes > 0 and time.monotonic() - last_ckpt > 60 * tcfg.checkpoint_minutes:
                flush()
                checkpoint()
                last_ckpt = time.monotonic()

        # -- epoch end: validation, best model, checkpoint --------------------------------------------------
        flush()  # (this syncs the device, so the epoch's time below is honest)
        train_s = time.perf_counter() - epoch_t0
        record = {"step": st["global_step"], "epoch": epoch + 1,
                  "epoch/loss": st["loss_sum"] / max(st["loss_n"], 1),
                  "perf/epoch_train_s": train_s, "perf/epoch_pairs_per_s": world * epoch_pairs / max(train_s, 1e-9)}
        if not main:  # rank 0 validates, saves and logs; the others wait for it
            st.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
            ddp.barrier()
            continue
        if len(ts.val_q):
            corpus = ts.d_tokens if val_docs is None else ts.d_tokens.subset(val_docs)
            qrels = ts.val_qrels if val_docs is None else val_qrels
            t = time.perf_counter()
            record.update({f"val/{k}": v for k, v in
                           evaluate_model(model, ts.q_tokens[ts.val_q], corpus, qrels, device).items()})
            record["perf/val_s"] = time.perf_counter() - t
        if extra_eval is not None:
            record.update({f"eval/{k}": v for k, v in
                           evaluate_model(model, extra_eval.q_tokens, extra_eval.d_tokens, extra_eval.qrels,
                                          device).items()})
        mrr = record.get("val/mrr@10", -record["epoch/loss"])  # no validation split: lowest loss wins
        if st["best_mrr"] is None or mrr > st["best_mrr"]:
            st["best_mrr"], st["best_epoch"] = mrr, epoch + 1
            st["best"] = {k: v for k, v in record.items() if k.startswith(("val/", "eval/"))}
            save_model(run_dir, model)
        record["best_epoch"] = st["best_epoch"]
        tracker.log(record)
        hooks.epoch_end(record)
        st["history"].append(record)
        st.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
        checkpoint()
        last_ckpt = time.monotonic()
        if ddp:
            ddp.barrier()
        if should_stop() and epoch + 1 < tcfg.epochs and not ddp:
            return outcome(True)
    return outcome(False)

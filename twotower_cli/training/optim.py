"""Optimisers and the learning-rate schedule: pure functions of the step, so nothing but the optimiser state needs
checkpointing."""

from __future__ import annotations

import math

import torch


def make_optimizers(model, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    """AdamW for the dense parameters; SparseAdam for embedding tables with sparse gradients."""
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


def set_lr(opts: dict[str, torch.optim.Optimizer], lr: float) -> None:
    for opt in opts.values():
        for group in opt.param_groups:
            group["lr"] = lr


def grad_norm(model, coalesce: bool = False) -> float:
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

"""Multi-process training with PyTorch's own engine: torchrun + DistributedDataParallel.

Under torchrun (WORLD_SIZE > 1) every process trains on its slice of each global batch (--batch-size per
process). DDP averages the dense gradients. The n-gram table's gradient is sparse, which NCCL cannot reduce
("Tensors must be CUDA and dense"), so DDP leaves the table out and `reduce_sparse` averages it after backward:
every process all-gathers the rows it touched and their gradients, and all build the same sum. The same code runs
under gloo and NCCL, so the CPU tests exercise what a GPU run does. With --gather-negatives the InfoNCE loss
scores each query against the documents of every process's batch, gathered with an all_gather that carries
gradients back to their owners. Only rank 0 writes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twotower_cli.errors import UsageError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any: all stop at the same step."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def add_up(self, t: torch.Tensor) -> None:
        """``t`` becomes the sum of every process' ``t`` (in place)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> Dist | None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); None when not under torchrun."""
    if not launched():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UsageError("--device cuda under torchrun, but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local, device, backend)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``x`` (same shape on all) keeping the autograd graph: gradients flow back to
    the process that owns each row (torch.distributed.nn's all_gather reduces them on the way back)."""
    import warnings

    import torch.distributed.nn.functional as dnn

    with warnings.catch_warnings():  # torch 2.13 marks it deprecated; its named successor has no autograd path
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dnn.all_gather(x), 0)


def row_counts(x: torch.Tensor) -> list[int]:
    """Every process's number of rows of ``x``."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


def gather_ragged(x: torch.Tensor) -> torch.Tensor:
    """Like ``gather`` for row counts that differ between processes: padded with constants (no gradient path,
    so the padding touches no parameter), gathered, then the real rows kept."""
    sizes = row_counts(x)
    most = max(sizes)
    if most == 0:
        return x
    pad = torch.zeros((most - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    full = gather(torch.cat([x, pad]))
    return torch.cat([full[r * most: r * most + s] for r, s in enumerate(sizes)], 0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """All processes' integer ids (no gradient), ragged sizes allowed."""
    sizes = row_counts(x)
    most = max(sizes)
    padded = torch.cat([x, torch.full((most - x.shape[0],), -1, dtype=x.dtype, device=x.device)])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def wrap(model, device: torch.device):
    """DistributedDataParallel over the dense parameters. The sparse tables (and the constant buffers, never
    broadcast) are left to ``reduce_sparse``."""
    from torch.nn.parallel import DistributedDataParallel

    sparse = {id(p) for p in model.sparse_parameters()}
    ignore = [n for n, p in model.named_parameters() if id(p) in sparse]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (no gradient), ragged row counts allowed, in rank order."""
    sizes = row_counts(x)
    most = max(sizes)
    padded = torch.cat([x, x.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def reduce_sparse(model, world: int) -> None:
    """Average the sparse gradients of the tables across processes: gather every process's (row, gradient) pairs
    and sum them (coalesce) in the same order everywhere, so every process steps its table identically."""
    for p in model.sparse_parameters():
        g = p.grad
        if g is None:  # every process must take part in the collectives: an untouched table sends nothing
            idx = torch.zeros(0, dtype=torch.long, device=p.device)
            val = p.new_zeros((0,) + tuple(p.shape[1:]))
        else:
            g = g.coalesce() if not g.is_coalesced() else g
            idx, val = g._indices()[0], g._values()
        idx, val = all_gather_rows(idx), all_gather_rows(val)
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val / world, p.shape).coalesce()

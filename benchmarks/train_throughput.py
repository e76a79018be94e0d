"""Training throughput: `twotower train`'s pairs/s against the model-only step rate, measured in one run.

Model-only: the same model, batch size and optimizer, stepping on batches drawn at random from the same data
already tokenised in memory (so both sides see the same text lengths); no data pipeline, no logging.
Pipeline: `twotower train DATA --epochs E` as a subprocess; its rate is the last epoch's pairs over that epoch's
wall time (validation excluded), from metrics.jsonl (`perf/epoch_pairs_per_s`).

    python benchmarks/train_throughput.py [--data ../shared/data/debian-packages/train.parquet] [--device cuda]
        [--batch-size 1024] [--encoder ngram]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shares its name with a standard-library module: keep this folder off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twotower_cli.config import load_config  # noqa: E402
from twotower_cli.data.pairs import load_pairs, require_trainable  # noqa: E402
from twotower_cli.data.vocab import Vocab  # noqa: E402
from twotower_cli.model.towers import TwoTower  # noqa: E402
from twotower_cli.training.batches import (
    build,  # noqa: E402
    make_batch,  # noqa: E402
)
from twotower_cli.training.loop import (  # noqa: E402
    batch_loss,
    make_optimizers,
    resolve_device,
    sample_negatives,
)
from twotower_cli.training.pipeline import model_config  # noqa: E402


def model_only(cfg, data: Path, device: torch.device, steps: int) -> float:
    df = require_trainable(load_pairs(data))
    vocab = Vocab.build([df["query"], df["document"]], cfg.vocab.min_freq, cfg.vocab.max_size, cfg.vocab.lowercase)
    train_set = build(df, vocab, cfg.data.max_query_length, cfg.data.max_document_length, 0.0, cfg.train.seed)
    torch.manual_seed(0)
    model = TwoTower(model_config(cfg, vocab)).to(device)
    train_set.to(device)
    opts = make_optimizers(model, cfg.train.learning_rate, 0.0)
    negs = sample_negatives(train_set, 0, 0).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, train_set.n_train, (cfg.train.batch_size,), generator=g).to(device) for _ in range(steps + 5)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.precision == "bf16" and device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, idx in enumerate(batches):
        if i == 5:  # warm-up steps excluded
            sync()
            t0 = time.perf_counter()
        with autocast:
            loss, _ = batch_loss(model, make_batch(train_set, idx, negs, cfg.train.loss), cfg.train)
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts.values():
            o.step()
    sync()
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def anchor(cfg, data: Path, device: torch.device, steps: int) -> float:
    """The plain reference the issue measures against: two hashed-trigram EmbeddingBag tables (dense gradients,
    AdamW), summed and normalised, InfoNCE over the batch; the same tokens, lengths and batch as the model."""
    import torch.nn.functional as F

    df = require_trainable(load_pairs(data))
    vocab = Vocab.build([df["query"], df["document"]], cfg.vocab.min_freq, cfg.vocab.max_size, cfg.vocab.lowercase)
    train_set = build(df, vocab, cfg.data.max_query_length, cfg.data.max_document_length, 0.0, cfg.train.seed)
    train_set.to(device)
    buckets, dim = cfg.model.ngram_buckets, cfg.model.embedding_dim
    tables = [torch.nn.EmbeddingBag(buckets, dim, mode="sum").to(device) for _ in range(2)]
    opt = torch.optim.AdamW([p for t in tables for p in t.parameters()], lr=1e-3)

    def embed(table, ids):
        ids = ids.long()
        tri = (ids[:, :-2] * 1000003 + ids[:, 1:-1]) * 1000003 + ids[:, 2:]
        h = (tri * 2654435761 % (1 << 32)) % buckets
        w = (ids[:, 1:-1] > 0).float()
        return F.normalize(table(h, per_sample_weights=w), dim=-1)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, train_set.n_train, (cfg.train.batch_size,), generator=g).to(device) for _ in range(steps + 5)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, idx in enumerate(batches):
        if i == 5:
            sync()
            t0 = time.perf_counter()
        q = embed(tables[0], train_set.q_tokens[train_set.pos_q[idx]])
        d = embed(tables[1], train_set.d_tokens[train_set.pos_d[idx]])
        loss = F.cross_entropy(q @ d.T / 0.05, torch.arange(idx.shape[0], device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def pipeline(data: Path, args, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "twotower_cli", "train", str(Path(data).resolve()), "--epochs", str(args.epochs), "--runs-dir", tmp,
               "--device", args.device, "--batch-size", str(args.batch_size), "--encoder", args.encoder,
               "--precision", args.precision, "--no-report", "--log-level", "warning",
               *(["--max-steps", str(args.max_steps)] if args.max_steps else []), *extra]
        path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        subprocess.run(cmd, check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": path})
        run = next(p for p in Path(tmp).iterdir() if p.is_dir() and not p.is_symlink())
        rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r["perf/epoch_pairs_per_s"] for r in rec if "perf/epoch_pairs_per_s" in r]
        return epochs[-1]  # the last epoch: the first includes one-off warm-up (allocator, kernels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/debian-packages/train.parquet"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--encoder", default="ngram")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the pipeline run; the last one is measured")
    ap.add_argument("--max-steps", type=int, default=0, help="cap the pipeline runs (0: the epochs decide)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(env={}, overrides={("train", "batch_size"): args.batch_size, ("model", "encoder"): args.encoder,
                                         ("train", "precision"): args.precision})
    ref = model_only(cfg, Path(args.data), device, args.steps)
    plain = anchor(cfg, Path(args.data), device, args.steps)
    full = pipeline(Path(args.data), args, [])
    lazy = pipeline(Path(args.data), args, ["--tokenize", "on-demand"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nTraining throughput ({args.encoder}, batch {args.batch_size}, {args.precision}, {device.type}: {name})")
    print("| measure | pairs/s | ratio |\n|---|---|---|")
    print(f"| a plain hashed-trigram bag (two tables, dense AdamW), same tokens | {plain:,.0f} | {plain / ref:.2f} |")
    print(f"| model-only step loop (tokens in memory) | {ref:,.0f} | 1.00 |")
    print(f"| `twotower train` (epoch, validation excluded) | {full:,.0f} | {full / ref:.2f} |")
    print(f"| `twotower train --tokenize on-demand` (as each torchrun process) | {lazy:,.0f} | {lazy / ref:.2f} |")


if __name__ == "__main__":
    main()

"""Where a training step's time goes: model-only pairs/s and the torch profiler's top operators, for the shared
and the separate n-gram table (the same batches for both).

    python benchmarks/profile_step.py [--data ../shared/data/debian-packages/train.parquet] [--device cuda]
        [--batch-size 1024] [--rows 30000]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from twotower_cli.config import load_config  # noqa: E402
from twotower_cli.data.pairs import load_pairs, require_trainable  # noqa: E402
from twotower_cli.data.vocab import Vocab  # noqa: E402
from twotower_cli.model.towers import TwoTower  # noqa: E402
from twotower_cli.training.batches import build, make_batch  # noqa: E402
from twotower_cli.training.loop import (  # noqa: E402
    batch_loss,
    make_optimizers,
    resolve_device,
    sample_negatives,
)
from twotower_cli.training.pipeline import model_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/debian-packages/train.parquet"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    device = resolve_device(args.device)
    df = require_trainable(load_pairs(Path(args.data))).head(args.rows)
    vocab = Vocab.build([df["query"], df["document"]], 2, 2000, True)
    base = load_config(env={}, overrides={("train", "batch_size"): args.batch_size})
    train_set = build(df, vocab, base.data.max_query_length, base.data.max_document_length, 0.0, 0).to(device)
    negs = sample_negatives(train_set, 0, 0).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(train_set, torch.randint(0, train_set.n_train, (args.batch_size,), generator=g).to(device), negs,
                          "infonce") for _ in range(args.steps + 5)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for shared in (True, False):
        cfg = base.with_overrides({("model", "shared_embeddings"): shared})
        torch.manual_seed(0)
        model = TwoTower(model_config(cfg, vocab)).to(device)
        opts = make_optimizers(model, 1e-2, 0.0)

        def step(batch):
            loss, _ = batch_loss(model, batch, cfg.train)
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts.values():
                o.step()

        for b in batches[:5]:
            step(b)
        sync()
        t0 = time.perf_counter()
        for b in batches[5:]:
            step(b)
        sync()
        rate = args.steps * args.batch_size / (time.perf_counter() - t0)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for b in batches[5:15]:
                step(b)
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== {'shared' if shared else 'separate'} table, batch {args.batch_size}, {device}: {rate:,.0f} pairs/s")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=48))


if __name__ == "__main__":
    main()

"""Training on N x the Debian pairs: pairs/s and peak host memory (RSS) for N = 1, 4, 16, tokenising up front and on
demand, each for a fixed number of optimiser steps (`--max-steps`), in a fresh process.

The N x file repeats the Debian pairs with distinct texts (each copy's queries and documents get a suffix), so the
vocabulary is the same and the number of unique texts grows N-fold. Only training is measured: the process loads
the file, builds the training set, trains `--steps` steps without validation, and reports its own peak RSS
(VmHWM); the default index and the report that `twotower train` writes afterwards are left out.

    python benchmarks/scale.py [--sizes 1 4 16] [--steps 60] [--device cpu] [--batch-size 256]
    python benchmarks/scale.py --sizes 1 180 --tokenize on-demand     # 10M pairs: on demand only
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = ROOT.parent / "shared" / "data" / "debian-packages" / "train.parquet"

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from twotower_cli.config import load_config
from twotower_cli.training.pipeline import prepare, model_config
from twotower_cli.model.towers import TwoTower
from twotower_cli.tracking.metrics_log import NullTracker
from twotower_cli.training.loop import Hooks, fit, resolve_device
from pathlib import Path
cfg = load_config(env={{}}, overrides={{("data", "tokenize"): {tokenize!r}, ("train", "val_fraction"): 0.0,
    ("train", "max_steps"): {steps}, ("train", "batch_size"): {batch}, ("train", "epochs"): 1,
    ("train", "device"): {device!r}, ("train", "checkpoint_minutes"): 0.0, ("train", "log_every"): 10**9,
    ("train", "runs_dir"): {tmp!r}}})
device = resolve_device(cfg.train.device)
t0 = time.perf_counter()
p = prepare(cfg, Path({data!r}), None, None, None)
prep = time.perf_counter() - t0
model = TwoTower(model_config(cfg, p.vocab)).to(device)
ts = p.train_set.to(device) if device.type == "cuda" else p.train_set
model.set_idf(ts.d_tokens, torch.arange(len(ts.documents)))
class Rate(Hooks):
    def step(self, record):
        self.last = record["perf/running_pairs_per_s"]
hooks = Rate()
out = fit(model, ts, cfg.train, Path({tmp!r}), device, NullTracker(), hooks, lambda: False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
p.close()
print(json.dumps({{"pairs_per_s": hooks.last, "peak_mib": int(hwm) / 1024, "prepare_s": prep,
                  "train_pairs": ts.n_train, "documents": len(ts.documents)}}))
"""


def make_file(n: int, folder: Path) -> Path:
    import polars as pl

    path = folder / f"debian_x{n}.parquet"
    if path.exists():
        return path
    df = pl.scan_parquet(DEBIAN)
    parts = [df if k == 0 else df.with_columns(pl.col("query") + f" ~{k}", pl.col("document") + f" ~{k}")
             for k in range(n)]
    tmp = path.with_suffix(".tmp")
    pl.concat(parts).sink_parquet(tmp)  # streamed: a 180x file (10M pairs) is never whole in memory
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenize", choices=["both", "upfront", "on-demand"], default="both",
                    help="on-demand alone for sizes whose token rows do not fit in memory (180: 10M pairs)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        data = make_file(n, args.data_dir)
        for tokenize in ("upfront", "on-demand") if args.tokenize == "both" else (args.tokenize,):
            with tempfile.TemporaryDirectory() as tmp:
                code = CHILD.format(root=str(ROOT), tokenize=tokenize, steps=args.steps, batch=args.batch_size,
                                    device=args.device, data=str(data), tmp=tmp)
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"N={n} {tokenize} failed")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((n, tokenize, r))
            print(f"N={n:2d} {tokenize:9s} {r['pairs_per_s']:,.0f} pairs/s  peak {r['peak_mib']:,.0f} MiB  "
                  f"prepare {r['prepare_s']:.1f} s", flush=True)
    base = {t: r for n, t, r in rows if n == min(args.sizes)}  # (sizes may come in any order)
    up = {n: r for n, t, r in rows if t == "upfront"}
    print(f"\n{args.steps} steps of {args.batch_size} pairs on {args.device} ({platform.machine()}, {os.cpu_count()} "
          "cores)\n")
    print("| N x Debian | train pairs | tokenise | pairs/s | on-demand / up-front | peak MiB | vs N=1 |")
    print("|---|---|---|---|---|---|---|")
    for n, t, r in rows:
        ratio = f"{r['pairs_per_s'] / up[n]['pairs_per_s']:.2f}" if t == "on-demand" and n in up else \
            "1.00" if t == "upfront" else "-"
        print(f"| {n} | {r['train_pairs']:,} | {t} | {r['pairs_per_s']:,.0f} | {ratio} | {r['peak_mib']:,.0f} | "
              f"{r['peak_mib'] / base[t]['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()

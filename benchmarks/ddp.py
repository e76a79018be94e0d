"""torchrun with 2 processes (gloo, CPU) against 1 process on the same data and the same combined batch.

On a 2-core machine no speed-up is expected (both processes share the cores); the point is that it runs and
agrees. On a GPU machine pass --device cuda --nproc N for the multi-GPU rate. Peak memory is the largest
resident set of any one process of the run (the training processes; torchrun's agent is small): under torchrun
each process tokenises only its slices of the batches, so it must not exceed the single process's.

    python benchmarks/ddp.py [--data examples/pairs.parquet] [--batch-size 256] [--nproc 2] [--device cpu]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rate(run_root: Path) -> tuple[float, float]:
    run = next(p for p in run_root.iterdir() if p.is_dir() and not p.is_symlink())
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ep = [r for r in rec if "epoch/loss" in r][-1]
    return ep["perf/epoch_pairs_per_s"], ep.get("val/mrr@10", float("nan"))


def peak_rss_mib(cmd: list[str], env: dict) -> float:
    """Run ``cmd`` in a fresh wrapper process; the largest resident set of any one process it ran (ru_maxrss of
    the waited-for descendants, KiB on Linux)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, env=env, stdout=subprocess.PIPE, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / "examples/pairs.parquet"))
    ap.add_argument("--batch-size", type=int, default=256, help="combined batch")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    common = ["train", str(Path(args.data).resolve()), "--epochs", str(args.epochs), "--device", args.device,
              "--no-report", "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        mem1 = peak_rss_mib([sys.executable, "-m", "twotower_cli", *common, "--batch-size", str(args.batch_size),
                             "--runs-dir", str(one)], env)
        memn = peak_rss_mib([torchrun, "--nproc_per_node", str(args.nproc), "-m", "twotower_cli", *common,
                             "--batch-size", str(args.batch_size // args.nproc), "--runs-dir", str(many)], env)
        r1, m1 = rate(one)
        rn, mn = rate(many)
    print(f"\nDDP ({args.device}, {platform.machine()}, {os.cpu_count()} cores), combined batch {args.batch_size}, "
          f"last of {args.epochs} epochs")
    print(f"data: {args.data}")
    print("| setup | pairs/s | ratio | val/mrr@10 | peak MiB per process | ratio |\n|---|---|---|---|---|---|")
    print(f"| 1 process | {r1:,.0f} | 1.00 | {m1:.4f} | {mem1:,.0f} | 1.00 |")
    print(f"| torchrun, {args.nproc} processes | {rn:,.0f} | {rn / r1:.2f} | {mn:.4f} | {memn:,.0f} | "
          f"{memn / mem1:.2f} |")


if __name__ == "__main__":
    main()

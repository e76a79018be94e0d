"""Peak memory of `twotower index` on a corpus larger than one wants in memory: it reads Parquet a slice at a
time, so its peak RSS should stay near (model + one chunk + bookkeeping), far below the corpus' text.

    python benchmarks/index_memory.py [--docs 1000000] [--run RUN --runs-dir DIR]

Without --run it trains a small model on examples/pairs.parquet first (one epoch).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ru_maxrss survives exec on Linux (a child would report this script's peak): the child reports its own VmHWM
WRAP = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        sys.stderr.write("HWM " + line.split()[1] + "\\n")
sys.exit(code)
"""


def peak_rss_of(module: str, argv: list[str], env) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of ``python -m module argv``."""
    t = time.perf_counter()
    code = WRAP.format(argv=[module] + argv, module=module)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    hwm = [int(x.split()[1]) for x in res.stderr.splitlines() if x.startswith("HWM ")][-1]
    return time.perf_counter() - t, hwm * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--run", default=None)
    ap.add_argument("--runs-dir", default=None)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs_dir or f"{tmp}/runs"
        if not args.run:
            subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(ROOT / "examples/pairs.parquet"),
                            "--epochs", "1", "--runs-dir", runs, "--no-report", "--log-level", "warning"],
                           check=True, env=env)
        base = pl.read_parquet(ROOT / "examples/pairs.parquet")["document"].unique().to_list()
        rng = np.random.default_rng(0)
        picks = rng.integers(0, len(base), args.docs)
        corpus = Path(tmp) / "corpus.parquet"
        docs = pl.Series("document", [f"{base[p]} (variant {i})" for i, p in enumerate(picks.tolist())])
        text_bytes = int(docs.str.len_bytes().sum())
        pl.DataFrame({"doc_id": [f"d{i}" for i in range(args.docs)], "document": docs}).write_parquet(corpus)
        del docs
        argv = ["index", str(corpus), "--runs-dir", runs, "--name", "big", "--id-col", "doc_id"] + \
            (["--run", args.run] if args.run else [])
        seconds, rss = peak_rss_of("twotower_cli", argv, env)
        # baseline: a process that loads torch, polars and the same model (a search of the run's small index)
        _, base_rss = peak_rss_of("twotower_cli", ["search", "package manager", "--runs-dir", runs, "--json"]
                                  + (["--run", args.run] if args.run else []), env)
    print(f"\n`twotower index` of {args.docs:,} documents ({text_bytes / 2**20:,.0f} MiB of text) on "
          f"{platform.machine()}, {os.cpu_count()} cores: {seconds:.0f} s, {args.docs / seconds:,.0f} documents/s")
    print("| measure | MiB |\n|---|---|")
    print(f"| peak RSS of `twotower index` | {rss / 2**20:,.0f} |")
    print(f"| peak RSS of `twotower search` (torch, polars and the same model loaded) | {base_rss / 2**20:,.0f} |")
    print(f"| `index` above that baseline | {(rss - base_rss) / 2**20:,.0f} |")
    print(f"| corpus text (UTF-8) | {text_bytes / 2**20:,.0f} |")
    print(f"| embeddings written ({args.docs:,} x 128 float32) | {args.docs * 128 * 4 / 2**20:,.0f} |")


if __name__ == "__main__":
    main()

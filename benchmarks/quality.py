"""Retrieval quality of the defaults: train with no options but the data, then evaluate the model, BM25 and the
hybrid on the held-out evaluation folder (reporting only: nothing is tuned on it).

    python benchmarks/quality.py [--train ../shared/data/debian-packages/train.parquet]
        [--eval ../shared/data/debian-packages/eval] [--write]   # --write updates benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import sys

# keep this folder (it holds a tokenize.py) off sys.path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twotower_cli.evaluate_run import evaluate_run  # noqa: E402

NAMES = ["mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100"]
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def display(path: str) -> str:
    """A path relative to the checkout's parent folder reads the same on every machine."""
    try:
        return "../" + str(Path(path).resolve().relative_to(ROOT.parent))
    except ValueError:
        return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default=str(ROOT.parent / "shared/data/debian-packages/train.parquet"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/debian-packages/eval"))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--runs-dir", default=None, help="keep the trained run here (default: a temporary folder)")
    ap.add_argument("extra", nargs="*", help="extra `twotower train` options (default: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs_dir:
            tmp = str(Path(args.runs_dir).resolve())
            Path(tmp).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(Path(args.train).resolve()), "--runs-dir",
                        tmp, "--no-report", "--log-level", "warning", *args.extra], check=True, cwd=tmp, env=env)
        minutes = (time.perf_counter() - t) / 60
        run = (Path(tmp) / "latest").resolve()
        rows = evaluate_run(run, Path(args.eval), baseline="bm25", hybrid=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"Train `{Path(args.train).name}` with `twotower train` defaults{' ' + ' '.join(args.extra) if args.extra else ''}"
             f" ({minutes:.1f} min wall, whole process, on {machine}); evaluate on `{display(args.eval)}`.", "",
             "| system | " + " | ".join(NAMES) + " | queries/s | training minutes |",
             "|---|" + "---|" * (len(NAMES) + 2)]
    for r in rows:
        mins = f"{minutes:.1f}" if r["system"].startswith("two-tower") else ("-" if r["system"] == "bm25" else f"{minutes:.1f}")
        name = "two-tower (default)" if r["system"].startswith("two-tower") else r["system"]
        lines.append(f"| {name} | " + " | ".join(f"{r['metrics'][n]:.3f}" for n in NAMES)
                     + f" | {r['queries_per_s']:,.0f} | {mins} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = ROOT / "benchmarks" / "RESULTS.md"
        text = path.read_text()
        block = f"{START}\n{table}\n{END}"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), block, text, flags=re.S) if START in text else \
            text + f"\n## Retrieval quality (`benchmarks/quality.py`)\n\n{block}\n"
        path.write_text(text)


if __name__ == "__main__":
    main()

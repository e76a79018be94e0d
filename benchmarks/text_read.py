"""Reading a text pairs file for training: in slices of whole records (`data.text_slices`, what training does now)
against the whole file at once (`load_pairs`, then numbered in slices: what training did before), for TSV, CSV and
JSON lines made from N x the Debian pairs (`scale.py`'s file). Each reading runs in a fresh process and reports its
seconds and its own peak RSS (VmHWM); the texts are written to a folder as training writes them.

    python benchmarks/text_read.py [--sizes 1 16] [--formats tsv csv jsonl]
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

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from twotower_cli.data.pairs import load_pairs
from twotower_cli.data.stream import number_rows, read_pairs_rows
p, folder = Path({path!r}), Path({folder!r})
t0 = time.perf_counter()
if {how!r} == "sliced":
    rows = read_pairs_rows(p, folder=folder)
else:  # the reading training did before: the whole file, then numbered in slices of 65,536 rows
    pairs = load_pairs(p)
    slices = ((a, pairs.df.slice(a, 65536)) for a in range(0, pairs.df.height, 65536))
    rows = number_rows(p, slices, ("query", "document", "label"), pairs.where, folder, None, normalised=True)
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": seconds, "peak_mib": int(hwm) / 1024, "rows": rows.rows, "used": len(rows.qid)}}))
"""


def make_text(n: int, fmt: str, folder: Path) -> Path:
    import importlib.util

    import polars as pl

    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)  # its N x Parquet file, which the text files are written from
    path = folder / f"debian_x{n}.{fmt}"
    if not path.exists():
        lazy = pl.scan_parquet(scale.make_file(n, folder))
        tmp = folder / f"debian_x{n}.tmp.{fmt}"
        {"csv": lambda: lazy.sink_csv(tmp), "tsv": lambda: lazy.sink_csv(tmp, separator="\t"),
         "jsonl": lambda: lazy.sink_ndjson(tmp)}[fmt]()
        tmp.replace(path)
    return path


def measure(path: Path, how: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(root=str(ROOT), path=str(path), folder=str(Path(tmp) / "texts"), how=how)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{path.name} ({how}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--formats", nargs="+", default=["tsv", "csv", "jsonl"], choices=["tsv", "csv", "jsonl"])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| file | MB | rows | whole: s | whole: peak MiB | sliced: s | sliced: peak MiB | peak, sliced / whole |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for fmt in args.formats:
            path = make_text(n, fmt, args.data_dir)
            whole, sliced = measure(path, "whole"), measure(path, "sliced")
            assert (whole["rows"], whole["used"]) == (sliced["rows"], sliced["used"]), (whole, sliced)
            print(f"| {path.name} | {path.stat().st_size / 1e6:,.0f} | {sliced['rows']:,} | {whole['seconds']:.1f} | "
                  f"{whole['peak_mib']:,.0f} | {sliced['seconds']:.1f} | {sliced['peak_mib']:,.0f} | "
                  f"{sliced['peak_mib'] / whole['peak_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Search speed and memory: twotower's exact top-k against FAISS IndexFlatIP on the same data and threads.

1. 256 queries over N x 128 float32 (default 1,000,000), top-10: twotower exact_topk vs faiss IndexFlatIP.
2. One query over the same matrix.
3. `twotower search "query"` as a whole process against a trained run, vs `python -c "import torch"`.
4. Peak RSS of a process searching a memory-mapped N x 128 index, against the matrix's size.
5. FAISS HNSW (`index --backend faiss`) recall@10 against exact search on a 200k subset.

    python benchmarks/search.py [--n 1000000] [--runs-dir runs]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shares its name with a standard-library module: keep this folder off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twotower_cli.retrieval.topk import exact_topk  # noqa: E402


def best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def process_time(cmd: list[str], repeat: int = 3, cwd=None) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=cwd)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


RSS_CHILD = """
import resource, sys, numpy as np, torch
sys.path.insert(0, {root!r})
from twotower_cli.retrieval.topk import exact_topk
emb = np.load({path!r}, mmap_mode="r")
q = torch.nn.functional.normalize(torch.randn(256, emb.shape[1]), dim=1)
exact_topk(q, emb, 10)
print(hwm())
"""

# ru_maxrss survives exec on Linux (a child would report its parent's peak): read this process's own high-water mark
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--runs-dir", default=None, help="a runs folder with a trained run for the process timing")
    ap.add_argument("--cold-only", action="store_true", help="only the cold-process comparison (needs --runs-dir)")
    args = ap.parse_args()
    if args.cold_only:
        cold_search(args.runs_dir)
        return
    import faiss

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((256, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    rows = []
    f256 = best_of(lambda: flat.search(q, 10))
    o256 = best_of(lambda: exact_topk(qt, xt, 10))
    _, fi = flat.search(q, 10)
    _, oi = exact_topk(qt, xt, 10)
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fi, oi.numpy())])
    rows.append((f"256 queries, {args.n:,} x {args.dim}, top-10", f256, o256, f"results agree {agree:.3f}"))
    f1 = best_of(lambda: flat.search(q[:1], 10), 7)
    o1 = best_of(lambda: exact_topk(qt[:1], xt, 10), 7)
    rows.append(("1 query, same index", f1, o1, ""))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.npy"
        np.save(path, x)
        out = subprocess.run([sys.executable, "-c", HWM + RSS_CHILD.format(root=str(ROOT), path=str(path))],
                             check=True, capture_output=True, text=True).stdout
        rss = int(out.strip().splitlines()[-1])
    base_rss = int(subprocess.run([sys.executable, "-c", HWM + "import numpy, torch\nprint(hwm())"], check=True,
                                  capture_output=True, text=True).stdout.strip())
    print(f"\nSearch ({platform.machine()}, {os.cpu_count()} cores, {threads} torch/faiss threads)")
    print("| case | faiss IndexFlatIP (s) | twotower exact (s) | ratio (twotower/faiss) | note |\n|---|---|---|---|---|")
    for name, f, o, note in rows:
        print(f"| {name} | {f:.4f} | {o:.4f} | {o / f:.2f} | {note} |")
    mat = x.nbytes
    print(f"\nPeak RSS searching a memory-mapped {args.n:,} x {args.dim} index: {rss / 2**20:,.0f} MiB; "
          f"matrix {mat / 2**20:,.0f} MiB; python+torch alone {base_rss / 2**20:,.0f} MiB; "
          f"(RSS - baseline) / matrix = {(rss - base_rss) / mat:.2f}")

    sub = min(args.n, 200_000)
    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    t = time.perf_counter()
    hnsw.add(x[:sub])
    build_s = time.perf_counter() - t
    hnsw.hnsw.efSearch = 128
    _, hi = hnsw.search(q, 10)
    _, ei = exact_topk(qt, xt[:sub], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hi, ei.numpy())])
    th = best_of(lambda: hnsw.search(q, 10))
    te = best_of(lambda: exact_topk(qt, xt[:sub], 10))
    print(f"\nFAISS HNSW32 (efSearch 128) on {sub:,} x {args.dim}: recall@10 vs exact {recall:.3f}; build "
          f"{build_s:.1f} s; 256 queries {th:.4f} s vs exact {te:.4f} s")

    if args.runs_dir:  # HNSW on real embeddings: the run's default index, queried with real queries
        import polars as pl

        from twotower_cli.model.artifacts import load_model
        from twotower_cli.retrieval.index import load_index

        run = (Path(args.runs_dir) / "latest").resolve()
        model, vocab, _ = load_model(run)
        emb = np.ascontiguousarray(load_index(run).embeddings, dtype=np.float32)
        qs = pl.read_parquet(ROOT.parent / "shared/data/debian-packages/eval/queries.parquet")["query"].head(256)
        with torch.no_grad():
            qe = model.encode_queries(torch.from_numpy(vocab.encode(qs, model.cfg.max_query_length))).numpy()
        real = faiss.IndexHNSWFlat(emb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        real.hnsw.efConstruction = 80
        real.add(emb)
        real.hnsw.efSearch = 128
        _, hi = real.search(qe, 10)
        _, ei = exact_topk(torch.from_numpy(qe), emb, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hi, ei.numpy())])
        print(f"FAISS HNSW32 (efSearch 128) on the Debian index ({emb.shape[0]:,} x {emb.shape[1]}, real model "
              f"embeddings, 256 eval queries): recall@10 vs exact {recall:.3f}")
        cold_search(args.runs_dir)


def cold_search(runs_dir: str, rounds: int = 7) -> None:
    """`twotower search` as a fresh process against `python -c "import torch"`, measured in alternation (so a
    busy machine slows both alike); medians. The run's default search (hybrid for most runs) and --mode dense."""
    cmds = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "twotower search \"GNU C compiler\" (default search)":
                [sys.executable, "-m", "twotower_cli", "search", "GNU C compiler", "--runs-dir", runs_dir, "--json"],
            "twotower search \"GNU C compiler\" --mode dense":
                [sys.executable, "-m", "twotower_cli", "search", "GNU C compiler", "--runs-dir", runs_dir, "--json",
                 "--mode", "dense"]}
    times = {k: [] for k in cmds}
    for name, cmd in cmds.items():  # warm the file cache once
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(rounds):
        for name, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["python -c 'import torch'"])
    print("\n| process | median seconds | ratio to import torch |\n|---|---|---|")
    for name, samples in times.items():
        print(f"| `{name}` | {statistics.median(samples):.2f} | {statistics.median(samples) / base:.2f} |")


if __name__ == "__main__":
    main()

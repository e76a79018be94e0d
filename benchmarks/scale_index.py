"""Index layouts against each other on one corpus: size on disk per document, build time and peak memory, search
latency (one query, warm: p50/p99; a cold `twotower search` process), queries per second for a batch, MRR@10, and
top-10 agreement with an exact brute force (every document scored by the search's definition) on a subsample.

    python benchmarks/scale_index.py RUN_DIR EVAL_DIR [--layouts full:float32,compact:float16,compact:float32]
                                     [--queries 1000] [--subsample 300] [--evaluate] [--reference INDEX]

EVAL_DIR may be the MS MARCO-sized stand-in of `benchmarks/standin.py` (a curve: one stand-in per size).

RUN_DIR: a trained run (the default n-gram model); EVAL_DIR: queries.parquet, corpus.parquet (doc_id, document),
qrels.parquet, as `twotower evaluate` reads. Each layout is indexed into the run as `scale-<layout>-<dtype>` by a
fresh `twotower index` process (its wall time and peak RSS measured), then searched in this process.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {"embeddings": ("embeddings.npy",), "lexical": ("lexical.", "postings."), "bm25": ("bm25/",),
          "texts": ("texts.", "ids.", "documents/")}


def sizes(folder: Path, count: int) -> dict[str, float]:
    """Bytes per document of each group of files."""
    out = dict.fromkeys(GROUPS, 0.0)
    for p in folder.rglob("*"):
        if p.is_file() and p.name != "meta.json":
            rel = str(p.relative_to(folder))
            group = next(g for g, prefixes in GROUPS.items() if rel.startswith(prefixes))
            out[group] += p.stat().st_size / count
    out["total"] = sum(out.values())
    return out


def build(run: Path, corpus: Path, name: str, layout: str, dtype: str) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of a fresh `twotower index` process."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "twotower_cli", "index", str(corpus), "--runs-dir", str(run.parent),
                    "--run", run.name, "--id-col", "doc_id", "--name", name, "--layout", layout, "--dtype", dtype],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t, max(peak, before) / 2**20


def cold_search(run: Path, name: str, query: str, times: int = 3) -> float:
    """The median wall time of a fresh `twotower search` process (its files in the page cache)."""
    seconds = []
    for _ in range(times):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "twotower_cli", "search", query, "--runs-dir", str(run.parent),
                        "--run", run.name, "--index", name, "--json"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds.append(time.perf_counter() - t)
    return float(np.median(seconds))


def brute_force(model, index, queries: list[str], k: int = 10) -> list[list[str]]:
    """The exact top k: every document scored (learned half + exact lexical rows), from a full-layout index's rows
    or a compact index's postings (every list read, none left for later)."""
    dim = index.meta["lexical"]["dim"]
    compact = index.meta.get("layout") == "compact"
    q, rows = model.encode_queries(queries), model.query_lexical(queries)
    table = np.zeros(index.meta["lexical"]["buckets"], np.float32)
    out = []
    for j in range(len(queries)):
        s = np.empty(index.count, dtype=np.float32)
        for a in range(0, index.count, 1 << 20):  # (the learned half a slice at a time: bounded memory)
            part = index.embeddings[a:a + (1 << 20)]
            s[a:a + part.shape[0]] = np.asarray(part if compact else part[:, dim:], dtype=np.float32) @ q[j, dim:]
        if compact:
            lo, hi = int(rows.indptr[j]), int(rows.indptr[j + 1])
            found, values = index.lexical.scores(rows.buckets[lo:hi], rows.weights[lo:hi], index.count)
            s[found] += values
        else:
            s += index.lexical.dots(rows, j, np.arange(index.count), table)
        top = np.argpartition(-s, k)[:k] if index.count > k else np.arange(index.count)
        cut = s[top].min()
        tied = np.flatnonzero(s >= cut)  # (every row tied with the k-th: the lower row wins, as the search does)
        out.append(index.ids[tied[np.lexsort((tied, -s[tied]))][:k].tolist()])
    return out


def evaluate_seconds(run: Path, eval_dir: Path, name: str) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of a fresh `twotower evaluate --index` process over every query."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "twotower_cli", "evaluate", str(eval_dir), "--runs-dir", str(run.parent),
                    "--run", run.name, "--index", name, "--json"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t, max(peak, before) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--layouts", default="full:float32,compact:float16,compact:float32")
    ap.add_argument("--queries", type=int, default=1000, help="queries timed one by one and as a batch")
    ap.add_argument("--subsample", type=int, default=300, help="queries checked against the brute force")
    ap.add_argument("--jsonl", type=Path)
    ap.add_argument("--reference", default="",
                    help="the index the brute force scores (default: scale-full-float32 when --layouts has it, else "
                         "the first layout's, its postings read whole)")
    ap.add_argument("--reuse", action="store_true",
                    help="search the scale-<layout>-<dtype> indexes an earlier run built (no build figures)")
    ap.add_argument("--mrr-queries", type=int, default=0, help="queries MRR@10 is measured on (default: all)")
    ap.add_argument("--evaluate", action="store_true",
                    help="also time `twotower evaluate --index` over every query (a fresh process)")
    args = ap.parse_args()

    import twotower_cli
    from twotower_cli.evaluation.eval_sets import load_eval
    from twotower_cli.evaluation.metrics import retrieval_metrics

    run = args.run.resolve()
    ev = load_eval(args.eval_dir, texts=False)
    queries = ev.queries.to_list()
    corpus = args.eval_dir / "corpus.parquet"
    position = {d: i for i, d in enumerate(ev.doc_ids)}
    exact = None
    rows = []
    for spec in args.layouts.split(","):
        layout, dtype = spec.split(":")
        name = f"scale-{layout}-{dtype}"
        seconds, peak = build(run, corpus, name, layout, dtype) if not args.reuse else (float("nan"), float("nan"))
        model = twotower_cli.load(run, index=name)
        model.search(queries[:1], k=10, mode="dense")  # opened, and its pages read once
        if exact is None:
            full = "scale-full-float32" in [f"scale-{x.replace(':', '-')}" for x in args.layouts.split(",")]
            reference = twotower_cli.load(run, index=args.reference or ("scale-full-float32" if full else name))
            exact = brute_force(reference, reference.index, queries[:args.subsample])
        one = []
        for q in queries[:args.queries]:
            t = time.perf_counter()
            model.search([q], k=10)
            one.append(time.perf_counter() - t)
        t = time.perf_counter()
        hits = model.search(queries[:args.queries], k=10)
        batch = time.perf_counter() - t
        some = args.mrr_queries or len(queries)
        every = model.search(queries[:some], k=100)
        ranked = np.array([[position[h.id] for h in hs] + [-1] * (100 - len(hs)) for hs in every])
        mrr = retrieval_metrics(ranked, ev.qrels[:some])["mrr@10"]
        dense = model.search(queries[:args.subsample], k=10, mode="dense")
        agree = float(np.mean([[h.id for h in a] == b for a, b in zip(dense, exact)]))
        overlap = float(np.mean([len({h.id for h in a} & set(b)) / max(1, len(b)) for a, b in zip(dense, exact)]))
        ev_s, ev_gib = evaluate_seconds(run, args.eval_dir, name) if args.evaluate else (None, None)
        row = {"layout": layout, "dtype": dtype, "documents": model.index.count, **sizes(model.index.path,
               model.index.count), "build_s": seconds, "peak_gib": peak, "p50_ms": 1e3 * float(np.median(one)),
               "p99_ms": 1e3 * float(np.percentile(one, 99)), "batch_qps": len(hits) / batch,
               "cold_s": cold_search(run, name, queries[0]), "mrr@10": mrr, "top10_exact": agree, "top10_overlap": overlap,
               "evaluate_s": ev_s, "evaluate_gib": ev_gib, "queries": len(queries),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(f"| layout | documents | bytes/doc (embeddings + lexical + BM25 + texts) | build s | peak GiB | p50 ms | "
          f"p99 ms | batch q/s | cold search s | evaluate s (GiB) | MRR@10 | top 10 = exact / overlap "
          f"({args.subsample} queries) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ev = f"{r['evaluate_s']:.0f} ({r['evaluate_gib']:.2f})" if r["evaluate_s"] is not None else "-"
        print(f"| {r['layout']} {r['dtype']} | {r['documents']:,} | {r['total']:,.0f} ({r['embeddings']:,.0f} + "
              f"{r['lexical']:,.0f} + {r['bm25']:,.0f} + {r['texts']:,.0f}) | {r['build_s']:.1f} | "
              f"{r['peak_gib']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['batch_qps']:.0f} | "
              f"{r['cold_s']:.2f} | {ev} | {r['mrr@10']:.4f} | {r['top10_exact']:.3f} / {r['top10_overlap']:.4f} |")


if __name__ == "__main__":
    main()

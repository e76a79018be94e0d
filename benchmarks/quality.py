"""Retrieval quality of the defaults on every corpus: train with no options but the data, then score the dense
model, BM25, the default search (the hybrid as chosen on validation) and an untrained character-trigram TF-IDF.

    python benchmarks/quality.py [CORPUS ...] [--dev] [--write] [--train-args "--epochs 4 ..."]

CORPUS is a folder of benchmarks/out/corpora (built by benchmarks/corpora.py) or `debian` (../shared/data).
--dev   tunes without touching the evaluation folders: 10% of each training file's queries (100 to 1,000) are held
        out and searched over all of that file's documents; the model trains on the rest.
--write updates the table in benchmarks/RESULTS.md (final table: never with --dev).
Needs scikit-learn for the TF-IDF baseline (pip install scikit-learn); everything else is the tool's own code.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "benchmarks" / "out" / "corpora"
DEBIAN = ROOT.parent / "shared" / "data" / "debian-packages"
ORDER = ["debian", "debian-1k", "debian-3k", "debian-10k", "foldoc", "jargon", "info", "pydoc"]
NAMES = ["mrr@10", "ndcg@10", "recall@10"]
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def folders(name: str) -> tuple[Path, Path]:
    base = DEBIAN if name == "debian" else CORPORA / name
    if not (base / "train.parquet").exists():
        sys.exit(f"{base}: no train.parquet; build it with python benchmarks/corpora.py {name}")
    return base / "train.parquet", base / "eval"


def dev_split(name: str, train: Path) -> tuple[Path, Path]:
    """Hold out 10% of the training file's queries (100..1,000) as a development evaluation folder."""
    out = CORPORA / "_dev" / name
    if (out / "eval" / "qrels.parquet").exists():
        return out / "train.parquet", out / "eval"
    df = pl.read_parquet(train, columns=["query", "document", "label"])
    pos = df.filter(pl.col("label") == 1)
    queries = pos["query"].unique().sort()
    n = int(min(1000, max(100, round(0.1 * len(queries)))))
    held = queries[np.random.default_rng(7).permutation(len(queries))[:n]]
    dev = pos.filter(pl.col("query").is_in(held.implode()))
    docs = df["document"].unique().sort()
    rest = df.filter(~pl.col("query").is_in(held.implode()) & ~pl.col("document").is_in(dev["document"].implode()))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    rest.write_parquet(out / "train.parquet")
    ids = pl.DataFrame({"doc_id": [f"d{i}" for i in range(len(docs))], "document": docs})
    ids.write_parquet(out / "eval" / "corpus.parquet")
    qs = pl.DataFrame({"query": held}).with_columns(query_id=pl.format("q{}", pl.int_range(pl.len())))
    qs.select("query_id", "query").write_parquet(out / "eval" / "queries.parquet")
    dev.join(qs, on="query").join(ids, on="document").select("query_id", "doc_id").write_parquet(
        out / "eval" / "qrels.parquet")
    return out / "train.parquet", out / "eval"


def tfidf_row(eval_dir: Path) -> dict:
    """Character-trigram TF-IDF (scikit-learn, no training): cosine over the whole corpus."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from twotower_cli.evaluation.eval_sets import load_eval
    from twotower_cli.evaluation.metrics import retrieval_metrics

    ev = load_eval(eval_dir)
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True, lowercase=True)
    d = vec.fit_transform(ev.documents.to_list())
    q = vec.transform(ev.queries.to_list())
    ranked = []
    for s in range(0, q.shape[0], 256):
        scores = (q[s:s + 256] @ d.T).toarray()
        top = np.argpartition(-scores, min(100, scores.shape[1] - 1), axis=1)[:, :100]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        ranked.append(np.take_along_axis(top, order, 1))
    return {"system": "char-trigram TF-IDF", "metrics": retrieval_metrics(np.concatenate(ranked), ev.qrels)}


def measure(name: str, dev: bool, train_args: list[str], keep: Path | None, reuse: Path | None = None) -> list[dict]:
    from twotower_cli.evaluation.evaluate import evaluate_run

    train, eval_dir = folders(name)
    if dev:
        train, eval_dir = dev_split(name, train)
    if reuse is not None:  # score runs trained earlier (kept with --keep): no training, the stored minutes
        run = (reuse / name / "latest").resolve()
        info = json.loads((run / "run.json").read_text())
        minutes = info.get("train_minutes")
        rows = evaluate_run(run, eval_dir, baseline="bm25")
        rows.append(tfidf_row(eval_dir))
        for r in rows:
            r.update(corpus=name, minutes=minutes if not r["system"].startswith(("bm25", "char")) else None)
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        runs = keep / name if keep else Path(tmp)
        runs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(train.resolve()), "--runs-dir", str(runs),
                        "--no-report", "--log-level", "warning", *train_args], check=True, cwd=tmp, env=env)
        minutes = (time.perf_counter() - t) / 60
        run = (runs / "latest").resolve()
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "train_minutes": minutes}, indent=2))  # for --reuse
        rows = evaluate_run(run, eval_dir, baseline="bm25")
        chosen = json.loads((run / "run.json").read_text()).get("search", {})
    rows.append(tfidf_row(eval_dir))
    for r in rows:
        r.update(corpus=name, minutes=minutes if not r["system"].startswith(("bm25", "char")) else None,
                 chosen=chosen)
    return rows


def label(row: dict) -> str:
    system = row["system"]
    name = "model" if system.startswith("two-tower") else system
    return f"**{name}** (default search)" if row.get("default") else name


def table(rows: list[dict]) -> str:
    lines = ["| corpus | system | " + " | ".join(NAMES) + " | training minutes |", "|---|---|" + "---|" * (len(NAMES) + 1)]
    for r in rows:
        mins = f"{r['minutes']:.1f}" if r.get("minutes") is not None else "-"
        lines.append(f"| {r['corpus']} | {label(r)} | "
                     + " | ".join(f"{r['metrics'][n]:.3f}" for n in NAMES) + f" | {mins} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpora", nargs="*", default=ORDER)
    ap.add_argument("--dev", action="store_true", help="development split of each training file (for tuning)")
    ap.add_argument("--train-args", default="", help="extra `twotower train` options, quoted (default: none)")
    ap.add_argument("--write", action="store_true", help="update the table in benchmarks/RESULTS.md")
    ap.add_argument("--keep", type=Path, help="keep the trained runs under this folder")
    ap.add_argument("--jsonl", type=Path, help="append every row as JSON to this file")
    ap.add_argument("--reuse", type=Path, help="score the runs kept under this folder by an earlier --keep; no training")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    extra = shlex.split(args.train_args)
    rows = []
    for name in args.corpora:
        got = measure(name, args.dev, extra, args.keep, args.reuse)
        rows += got
        print(table(got).split("\n", 2)[2], flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                for r in got:
                    fh.write(json.dumps({**r, "dev": args.dev, "train_args": args.train_args}) + "\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    text = (f"`twotower train` with defaults{' ' + args.train_args if args.train_args else ''} on each corpus's "
            f"{'development split' if args.dev else 'train.parquet'}, scored on its "
            f"{'held-out development queries' if args.dev else 'eval/ folder'} ({machine}).\n\n" + table(rows))
    print("\n" + text)
    if args.write and not args.dev:
        path = ROOT / "benchmarks" / "RESULTS.md"
        block = f"{START}\n{text}\n{END}"
        old = path.read_text()
        path.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: block, old, flags=re.S))


if __name__ == "__main__":
    main()

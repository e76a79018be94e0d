"""Retrieval quality of the defaults on every corpus: train with no options but the data, then score the model
alone, BM25, the default search (as chosen on validation) and an untrained character-trigram TF-IDF, beside the
figure the run itself reported (its test queries, held out from every choice).

    python benchmarks/quality.py [CORPUS ...] [--dev] [--write] [--train-args "--epochs 4 ..."]
                                 [--systems ngram,base-zero,base] [--base-model FOLDER] [--checks]

CORPUS is a folder of benchmarks/out/corpora (built by benchmarks/corpora.py) or `debian` (../shared/data).
--systems  ngram: the default model; base-zero: --base-model as it is (--epochs 0); base: --base-model with its
           defaults (the folder: --base-model, else all-MiniLM-L6-v2 from benchmarks/minilm.py)
--checks   the search against itself and its definition, on the eval corpus indexed into the run: the top 10 at
           k = 10, 200 and 1,000 (identical?), and MRR@10 against a brute force over every document
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


SYSTEM_ARGS = {"ngram": [], "base-zero": ["--epochs", "0"], "base": []}


def measure(name: str, dev: bool, train_args: list[str], keep: Path | None, reuse: Path | None = None,
            system: str = "ngram", base: Path | None = None, checks: bool = False) -> list[dict]:
    from twotower_cli.evaluation.evaluate import evaluate_run

    train, eval_dir = folders(name)
    if dev:
        train, eval_dir = dev_split(name, train)
    args = SYSTEM_ARGS[system] + (["--base-model", str(base)] if system != "ngram" else []) + train_args
    with tempfile.TemporaryDirectory() as tmp:
        runs = (keep / name / system) if keep else Path(tmp)
        if reuse is not None:  # score runs trained earlier (kept with --keep): no training, the stored minutes
            run = (reuse / name / system / "latest").resolve()
            minutes = json.loads((run / "run.json").read_text()).get("train_minutes")
        else:
            runs.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(train.resolve()), "--runs-dir",
                            str(runs), "--no-report", "--log-level", "warning", *args], check=True, cwd=tmp, env=env)
            minutes = (time.perf_counter() - t) / 60
            run = (runs / "latest").resolve()
            info = json.loads((run / "run.json").read_text())
            (run / "run.json").write_text(json.dumps({**info, "train_minutes": minutes}, indent=2))  # for --reuse
        record = json.loads((run / "run.json").read_text())
        rows = evaluate_run(run, eval_dir, baseline="bm25" if system == "ngram" else None)
        extra = search_checks(run, eval_dir) if checks else {}
    if system == "ngram":
        rows.append(tfidf_row(eval_dir))
    for r in rows:
        label = r["system"]
        if system != "ngram" and label.startswith("two-tower"):
            r["system"] = "base model, zero-shot" if system == "base-zero" else "--base-model, fine-tuned"
        elif system != "ngram":
            r["system"] = f"{'zero-shot' if system == 'base-zero' else 'fine-tuned'}: {label}"
        reported = None
        if label.startswith("two-tower"):
            reported = record.get("test", {}).get("test/mrr@10")
        elif r.get("default"):
            reported = record.get("test", {}).get("test/search/mrr@10")
        r.update(corpus=name, minutes=minutes if not label.startswith(("bm25", "char")) else None,
                 chosen=record.get("search", {}), reported=reported, checks=extra if r.get("default") else {})
    return rows


def search_checks(run: Path, eval_dir: Path, n: int = 300) -> dict:
    """The eval corpus indexed into the run; on its first ``n`` queries, the top 10 at k = 10, 200 and 1,000, and the
    default search's MRR@10 against its definition computed over every document (`brute_force`)."""
    import twotower_cli
    from twotower_cli.evaluation.eval_sets import load_eval
    from twotower_cli.evaluation.metrics import retrieval_metrics

    ev = load_eval(eval_dir)
    api = twotower_cli.load(run)
    api.index_documents(ev.documents.to_list(), name="quality-eval", ids=[str(i) for i in range(len(ev.documents))])
    api.use_index("quality-eval")
    queries, qrels = ev.queries.to_list()[:n], ev.qrels[:n]
    top = {k: [[h.id for h in q[:10]] for q in api.search(queries, k=k)] for k in (10, 200, 1000)}
    same = all(a == b == c for a, b, c in zip(top[10], top[200], top[1000]))
    shipped = [[int(i) for i in q] + [-1] * (10 - len(q)) for q in top[10]]
    brute = brute_force(api, queries)
    mrr = [retrieval_metrics(r, qrels, ("mrr@10",))["mrr@10"] for r in (shipped, brute)]
    return {"top10_same_for_every_k": bool(same), "queries": len(queries), "mrr@10": mrr[0], "brute_force": mrr[1]}


def brute_force(api, queries: list[str], depth: int = 100) -> list[list[int]]:
    """The run's default search as defined, over every document: the learned half's dot product plus the exact
    lexical one, fused with BM25 (each side normalised over its own top ``depth``, 0 below it) at the chosen weight."""
    index, cfg, plan = api.index, api.config, api.plan
    docs = index.all_documents()
    q_rows = api.query_lexical(queries)
    emb = np.asarray(index.embeddings, dtype=np.float32)
    d_rows = index.lexical
    table = np.zeros(cfg.ngram_buckets, dtype=np.float32)
    out = []
    compact = index.meta.get("layout") == "compact"  # (the learned half only, the lexical rows inverted)
    for j, (q, qe) in enumerate(zip(queries, api.encode_queries(queries))):
        n = cfg.lexical_dim
        if compact:
            lo, hi = int(q_rows.indptr[j]), int(q_rows.indptr[j + 1])
            rows, values = d_rows.scores(q_rows.buckets[lo:hi], q_rows.weights[lo:hi], len(docs))
            lexical = np.zeros(len(docs), dtype=np.float32)
            lexical[rows] = values
            dense = (emb @ qe[n:] + lexical).astype(np.float64)
        else:
            dense = (emb[:, n:] @ qe[n:] + (d_rows.dots(q_rows, j, np.arange(len(docs)), table) if d_rows is not None
                                            else emb[:, :n] @ qe[:n])).astype(np.float64)
        if plan.mode == "dense":
            out.append(np.lexsort((np.arange(dense.size), -dense))[:10].tolist())
            continue
        lex = index.bm25().scores(q).astype(np.float64)
        if plan.mode == "bm25":
            out.append(np.lexsort((np.arange(lex.size), -lex))[:10].tolist())
            continue
        sides = []
        for s in (dense, lex):
            top = np.lexsort((np.arange(s.size), -s))[:depth]
            norm = np.zeros(s.size)
            lo, hi = s[top].min(), s[top].max()
            norm[top] = (s[top] - lo) / (hi - lo) if hi > lo else 0.0
            sides.append((norm, top))
        fused = plan.hybrid_weight * sides[0][0] + (1 - plan.hybrid_weight) * sides[1][0]
        union = np.union1d(sides[0][1], sides[1][1])
        out.append(union[np.lexsort((union, -fused[union]))][:10].tolist())
    return [r + [-1] * (10 - len(r)) for r in out]


def label(row: dict) -> str:
    system = row["system"]
    name = "model" if system.startswith("two-tower") else system
    return f"**{name}** (default search)" if row.get("default") else name


def table(rows: list[dict]) -> str:
    lines = ["| corpus | system | " + " | ".join(NAMES) + " | reported test mrr@10 | training minutes |",
             "|---|---|" + "---|" * (len(NAMES) + 2)]
    for r in rows:
        mins = f"{r['minutes']:.1f}" if r.get("minutes") is not None else "-"
        rep = f"{r['reported']:.3f}" if r.get("reported") is not None else "-"
        lines.append(f"| {r['corpus']} | {label(r)} | "
                     + " | ".join(f"{r['metrics'][n]:.3f}" for n in NAMES) + f" | {rep} | {mins} |")
    checks = [r for r in rows if r.get("checks")]
    if checks:
        lines += ["", "| corpus | queries | top 10 the same at k = 10, 200, 1,000 | default search mrr@10 | "
                      "brute force mrr@10 |", "|---|---|---|---|---|"]
        for r in checks:
            c = r["checks"]
            lines.append(f"| {r['corpus']} | {c['queries']} | {'yes' if c['top10_same_for_every_k'] else 'NO'} | "
                         f"{c['mrr@10']:.4f} | {c['brute_force']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpora", nargs="*", default=ORDER)
    ap.add_argument("--dev", action="store_true", help="development split of each training file (for tuning)")
    ap.add_argument("--train-args", default="", help="extra `twotower train` options, quoted (default: none)")
    ap.add_argument("--systems", default="ngram", help="comma-separated: ngram, base-zero, base")
    ap.add_argument("--base-model", type=Path, help="the base model's folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--checks", action="store_true", help="top 10 across k, and a brute force (ngram runs)")
    ap.add_argument("--write", action="store_true", help="update the table in benchmarks/RESULTS.md")
    ap.add_argument("--keep", type=Path, help="keep the trained runs under this folder")
    ap.add_argument("--jsonl", type=Path, help="append every row as JSON to this file")
    ap.add_argument("--reuse", type=Path, help="score the runs kept under this folder by an earlier --keep; no training")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    extra = shlex.split(args.train_args)
    systems = args.systems.split(",")
    base = args.base_model
    if base is None and any(s != "ngram" for s in systems):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from minilm import minilm_folder

        base = minilm_folder(ROOT / "benchmarks" / "out" / "minilm")
    rows = []
    for name in args.corpora:
        for system in systems:
            got = measure(name, args.dev, extra, args.keep, args.reuse, system, base,
                          args.checks and system == "ngram")
            rows += got
            print(table(got).split("\n", 2)[2], flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    for r in got:
                        fh.write(json.dumps({**r, "dev": args.dev, "train_args": args.train_args,
                                             "system_kind": system}) + "\n")
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

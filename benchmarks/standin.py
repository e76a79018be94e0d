"""An MS MARCO-sized stand-in for `benchmarks/scale_index.py`: passages of MS MARCO's length (about 60 words) cut
from real text on this machine, with held-out queries whose relevant passage is among them.

    python benchmarks/standin.py --passages 8800000 [--out benchmarks/out/standin-8800000] [--seed 13]

Text: the training documents of the Debian set (../shared/data/debian-packages) and of the corpora that
`benchmarks/corpora.py` builds from what Debian and Python packages ship (foldoc, jargon, info manuals, pydoc);
never man pages or WordNet, which an outside check keeps. That is about 6.5 million words, so most passages are
windows over it at random places and of random lengths (log-normal, median 50 words, 8 to 200): the same text
repeated with variation, as the issue allows. MS MARCO's own vocabulary is wider, so its posting lists are
shorter than these: what this stand-in measures of the lexical side is on the slow side.

Queries: every held-out query of those sets (eval/queries.parquet: Debian 2,000, foldoc 1,000, info 1,000,
jargon 300, pydoc 1,000), each with its relevant document cut to a passage (its first words, the same length
law) placed among the windows at a random row; the windows come from training documents only, so no window
holds a held-out query's document. Written in the layout `twotower evaluate` reads:
  corpus.parquet [doc_id, document], queries.parquet [query_id, query], qrels.parquet [query_id, doc_id]
Under benchmarks/out/ (kept out of git).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"debian": ROOT.parent / "shared" / "data" / "debian-packages",
           **{name: ROOT / "benchmarks" / "out" / "corpora" / name for name in ("foldoc", "jargon", "info", "pydoc")}}
ROWS = 1 << 20  # passages written per Parquet row group


def lengths(rng, n: int) -> np.ndarray:
    """Passage lengths in words: log-normal, median 50, clipped to 8..200 (MS MARCO passages: mean about 56)."""
    return np.clip(np.rint(rng.lognormal(np.log(50), 0.45, n)), 8, 200).astype(np.int64)


def sources() -> tuple[list[str], list[pl.DataFrame]]:
    """The training documents' words (one stream), and each set's held-out queries with their documents."""
    words: list[str] = []
    held = []
    for name, folder in SOURCES.items():
        if not (folder / "train.parquet").is_file():
            raise SystemExit(f"{folder / 'train.parquet'}: missing; build the corpora first: "
                             "python benchmarks/corpora.py")
        docs = pl.read_parquet(folder / "train.parquet", columns=["document", "label"]).filter(pl.col("label") == 1)
        for text in docs["document"].unique().sort().to_list():
            words.extend(text.split())
        ev = folder / "eval"
        pairs = (pl.read_parquet(ev / "queries.parquet").join(pl.read_parquet(ev / "qrels.parquet"), on="query_id")
                 .join(pl.read_parquet(ev / "corpus.parquet"), on="doc_id")
                 .select(pl.lit(name).alias("source"), "query", "document"))
        held.append(pairs.unique("query", keep="first", maintain_order=True))
    return words, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=8_800_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    out = args.out or ROOT / "benchmarks" / "out" / f"standin-{args.passages}"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    words, held = sources()
    queries = pl.concat(held)
    n, m = args.passages, len(queries)
    if n < m:
        raise SystemExit(f"--passages {n:,}: fewer than the {m:,} held-out queries' passages")
    relevant = [" ".join(doc.split()[:length]) for doc, length in zip(queries["document"].to_list(),
                                                                       lengths(rng, m).tolist())]
    where = np.sort(rng.choice(n, m, replace=False))  # the rows of the relevant passages
    qs = pl.DataFrame({"query_id": [f"q{i}" for i in range(m)], "query": queries["query"],
                       "source": queries["source"]})
    qs.select("query_id", "query").write_parquet(out / "queries.parquet")
    pl.DataFrame({"query_id": qs["query_id"], "doc_id": [f"p{r}" for r in where.tolist()]}).write_parquet(
        out / "qrels.parquet")
    parts = out / ".parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    for start in range(0, n, ROWS):
        stop = min(n, start + ROWS)
        size = lengths(rng, stop - start)
        begin = rng.integers(0, len(words) - size)
        texts = [" ".join(words[b:b + s]) for b, s in zip(begin.tolist(), size.tolist())]
        lo, hi = np.searchsorted(where, [start, stop])
        for r, i in zip(where[lo:hi].tolist(), range(lo, hi)):
            texts[r - start] = relevant[i]
        pl.DataFrame({"doc_id": [f"p{r}" for r in range(start, stop)], "document": texts}).write_parquet(
            parts / f"{start:012d}.parquet")
        print(f"{stop:,} of {n:,} passages ({time.perf_counter() - t0:.0f} s)", flush=True)
    pl.scan_parquet(sorted(parts.glob("*.parquet"))).sink_parquet(out / "corpus.parquet", row_group_size=ROWS)
    shutil.rmtree(parts)
    print(f"{out}: {n:,} passages from {len(words):,} words of text, {m:,} held-out queries "
          f"({', '.join(f'{k} {v}' for k, v in qs.group_by('source').len().sort('source').iter_rows())})")


if __name__ == "__main__":
    main()

"""Encoding documents into fixed-length id arrays: the vectorised encoder against a per-character Python loop.

    python benchmarks/tokenize.py [--data ../shared/data/debian-packages/train.parquet] [--max-len 512]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shares its name with a standard-library module: keep this folder off sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twotower_cli.data.vocab import PAD, UNK, Vocab  # noqa: E402


def loop_encode(vocab: Vocab, texts: list[str], max_len: int) -> np.ndarray:
    stoi = {c: i + 2 for i, c in enumerate(vocab.chars)}
    out = np.zeros((len(texts), max_len), dtype=np.int32)
    for r, text in enumerate(texts):
        text = text.lower() if vocab.lowercase else text
        for j, ch in enumerate(text[:max_len]):
            out[r, j] = stoi.get(ch, UNK)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/debian-packages/train.parquet"))
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args()
    docs = pl.read_parquet(args.data, columns=["document"])["document"].unique().sort()
    vocab = Vocab.build([docs], min_freq=2)
    t = time.perf_counter()
    fast = vocab.encode(docs, args.max_len)
    fast_s = time.perf_counter() - t
    texts = docs.to_list()
    t = time.perf_counter()
    slow = loop_encode(vocab, texts, args.max_len)
    slow_s = time.perf_counter() - t
    assert (fast == slow).all(), "the two encoders disagree"
    chars = int((fast != PAD).sum())
    print(f"\nEncoding {len(docs):,} unique Debian documents to {args.max_len} ids ({chars:,} characters)")
    print("| encoder | seconds | documents/s | characters/s | speed-up |\n|---|---|---|---|---|")
    print(f"| per-character Python loop | {slow_s:.2f} | {len(docs) / slow_s:,.0f} | {chars / slow_s:,.0f} | 1.0x |")
    print(f"| vectorised (Polars pad + UTF-32 + lookup) | {fast_s:.2f} | {len(docs) / fast_s:,.0f} | "
          f"{chars / fast_s:,.0f} | {slow_s / fast_s:.1f}x |")


if __name__ == "__main__":
    main()

"""What each setting may hold. Every value is checked when the configuration loads, from whichever source it
came (config.toml, environment, flag), so a bad number is one line naming the setting, never a failure later."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a run or index name: one plain folder name


def at_least(lo: float, hi: float = math.inf) -> Callable[[Any], str | None]:
    def check(v):
        return None if lo <= v <= hi else (f"at least {lo:g}" if hi == math.inf else f"between {lo:g} and {hi:g}")
    return check


def above(lo: float, hi: float = math.inf) -> Callable[[Any], str | None]:
    def check(v):
        return None if lo < v <= hi else (f"above {lo:g}" if hi == math.inf else f"above {lo:g} and at most {hi:g}")
    return check


def below_one(v) -> str | None:
    return None if 0 <= v < 1 else "at least 0 and below 1"


def between_zero_and_one(v) -> str | None:
    return None if 0 < v < 1 else "above 0 and below 1"


def one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(v):
        return None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed)
    return check


def name_or_empty(v) -> str | None:
    if v == "" or NAME.fullmatch(v):
        return None
    return "a plain name (letters, digits, '.', '_', '-'; no '/', '..' or control characters)"


def plain_name(v) -> str | None:
    return None if NAME.fullmatch(v) else name_or_empty("/")


def widths(v) -> str | None:
    parts = [p.strip() for p in str(v).split(",")]
    ok = parts and all(p.isdigit() and 1 <= int(p) <= 63 for p in parts)
    return None if ok else "comma-separated convolution widths from 1 to 63, like 3,5"


def device(v) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "cpu, cuda, cuda:N or auto"


RULES: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("data", "max_query_length"): at_least(1, 100_000),
    ("data", "max_document_length"): at_least(1, 1_000_000),
    ("data", "lexical_document_length"): at_least(0, 1_000_000),
    ("data", "tokenize"): one_of("auto", "upfront", "on-demand"),
    ("vocab", "min_freq"): at_least(1),
    ("vocab", "max_size"): at_least(3, 1_114_112),
    ("model", "encoder"): one_of("ngram", "cnn", "mean"),
    ("model", "embedding_dim"): at_least(1, 65536),
    ("model", "hidden_dim"): at_least(1, 65536),
    ("model", "ngram_buckets"): at_least(16, 2**30),
    ("model", "cnn_widths"): widths,
    ("model", "lexical_dim"): at_least(0, 65536),
    ("model", "lexical_weight"): between_zero_and_one,  # each half is divided by its weight when scored
    ("model", "length_power"): at_least(0, 1),
    ("model", "idf_power"): at_least(0, 1),
    ("model", "word_share"): at_least(0, 1),
    ("model", "lead_characters"): at_least(0, 1_000_000),
    ("model", "max_query_tokens"): at_least(1, 8192),
    ("model", "max_document_tokens"): at_least(1, 8192),
    ("train", "epochs"): at_least(0, 100_000),  # 0: a base model as it is (zero-shot); refused without one
    ("train", "batch_size"): at_least(2, 10_000_000),  # a pair needs another in its batch to learn from
    ("train", "learning_rate"): above(0, 10),
    ("train", "warmup_fraction"): at_least(0, 1),
    ("train", "weight_decay"): at_least(0, 10),
    ("train", "loss"): one_of("infonce", "triplet"),
    ("train", "temperature"): above(0, 100),
    ("train", "margin"): at_least(0, 2),
    ("train", "seed"): at_least(0, 2**31 - 1),
    ("train", "val_fraction"): below_one,
    ("train", "val_corpus_size"): at_least(0),
    ("train", "val_max_queries"): at_least(0),
    ("train", "val_min_queries"): at_least(0),
    ("train", "test_fraction"): below_one,
    ("train", "device"): device,
    ("train", "precision"): one_of("fp32", "bf16"),
    ("train", "run_name"): name_or_empty,
    ("train", "max_steps"): at_least(0),
    ("train", "loader_workers"): at_least(-1, 64),
    ("train", "log_every"): at_least(1),
    ("train", "checkpoint_minutes"): at_least(0),
    ("train", "hard_negatives"): one_of("none", "bm25", "model"),
    ("train", "span_pairs"): at_least(0, 100),
    ("train", "log_level"): one_of("debug", "info", "warning", "error"),
    ("search", "top_k"): at_least(1, 100_000),
    ("search", "index"): plain_name,
    ("search", "mode"): one_of("auto", "dense", "hybrid", "bm25"),
    ("search", "hybrid_weight"): at_least(0, 1),
    ("wandb", "mode"): one_of("", "online", "offline", "disabled"),
    ("wandb", "init_timeout"): above(0, 3600),
}


def problem(section: str, key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for this setting (None: nothing). Floats must be finite everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    rule = RULES.get((section, key))
    return rule(value) if rule else None

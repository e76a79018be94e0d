"""An index's meta.json: its own checksum, and the types and values search relies on, checked when it is opened
so that an edited or damaged entry is one line naming the file (never an internal error in the middle of a
search)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from twotower_cli.errors import ArtifactError

DTYPES = ("float32", "float16")
BACKENDS = ("exact", "faiss")


def meta_digest(meta: dict) -> str:
    """The sha256 of meta.json's entries but its own (``meta_sha256``), as JSON with sorted keys."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def is_count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def damaged(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what}; the file was altered or damaged: rebuild the index")


def check_meta(path: Path, meta: dict) -> None:
    """Raise one ArtifactError naming ``path`` when meta.json was altered (format 3 and later carry their own
    sha256) or holds what search cannot use."""
    if meta.get("format_version", 0) >= 3 and meta.get("meta_sha256") != meta_digest(meta):
        raise damaged(path, "does not match its own checksum (meta_sha256)")
    if not is_count(meta.get("count")) or not is_count(meta.get("dim"), 1):
        raise damaged(path, f"count {meta.get('count')!r} and dim {meta.get('dim')!r} must be whole numbers")
    if meta.get("dtype") not in DTYPES or meta.get("backend", "exact") not in BACKENDS:
        raise damaged(path, f"dtype {meta.get('dtype')!r} or backend {meta.get('backend')!r} is not one twotower "
                            "writes")
    faiss = meta.get("faiss", {})
    if not isinstance(faiss, dict) or not is_count(faiss.get("ef_search", 128), 1):
        raise damaged(path, "its 'faiss' entry is damaged")
    lex = meta.get("lexical")
    if lex is None:
        return
    weight = lex.get("weight") if isinstance(lex, dict) else None
    weight_ok = weight is None or (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                   and math.isfinite(weight) and 0 <= weight <= 1)
    if not isinstance(lex, dict) or not is_count(lex.get("dim"), 1) or not is_count(lex.get("buckets"), 1) \
            or lex["dim"] > meta["dim"] or not weight_ok:
        raise damaged(path, "its 'lexical' entry is damaged")


def check_lexical_settings(path: Path, meta: dict, model: dict) -> None:
    """The exact lexical rows were built with the model's settings (``model``: config.json's model section; the
    fingerprint covers them): checked once the index is known to come from this model."""
    lex = meta.get("lexical")
    if not lex:
        return
    built = {"dim": model.get("lexical_dim"), "buckets": model.get("ngram_buckets"),
             "weight": model.get("lexical_weight")}
    differs = [k for k, v in built.items() if k in lex and v is not None and lex[k] != v]
    if differs:
        raise damaged(path, f"its lexical {', '.join(differs)} differ from the model's settings in config.json")

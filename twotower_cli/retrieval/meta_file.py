"""An index's meta.json: its own checksum, and the types and values search relies on, checked when it is opened
so that an edited or damaged entry is one line naming the file (never an internal error in the middle of a
search)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from twotower_cli.errors import ArtifactError

DTYPES = ("float32", "float16")
BACKENDS = ("exact", "faiss")
# a file named in files_sha256: inside the index folder, at most one folder down, no hidden or parent parts
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
STRINGS = ("texts.bin", "texts.offsets.npy", "ids.bin", "ids.offsets.npy")
LEXICAL_PARTS = ("indptr", "buckets", "weights")
POSTINGS_PARTS = ("indptr", "docs", "weights")  # a compact index's (`postings.py`)
LAYOUTS = ("full", "compact")


def meta_digest(meta: dict) -> str:
    """The sha256 of meta.json's entries but its own (``meta_sha256``), as JSON with sorted keys."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def is_count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def with_checksums(meta: dict) -> bool:
    """Whether the index was written with checksums of its own and of its files (format 3, or a meta_sha256
    entry: a format number edited down does not turn the checks off)."""
    version = meta.get("format_version", 0)
    return "meta_sha256" in meta or (is_count(version) and version >= 3)


def file_digests(meta: dict) -> dict[str, str]:
    """files_sha256's entries that name a file inside the index (what `check_meta` requires of all of them)."""
    files = meta.get("files_sha256")
    return {k: v for k, v in files.items() if isinstance(k, str) and FILE_NAME.fullmatch(k) and isinstance(v, str)} \
        if isinstance(files, dict) else {}


def damaged(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what}; the file was altered or damaged: rebuild the index")


def check_meta(path: Path, meta: dict) -> None:
    """Raise one ArtifactError naming ``path`` when meta.json was altered (format 3 and later carry their own
    sha256) or holds what search cannot use."""
    if not is_count(meta.get("format_version", 0)):
        raise damaged(path, f"format_version {meta.get('format_version')!r} is not a whole number")
    if with_checksums(meta) and meta.get("meta_sha256") != meta_digest(meta):
        raise damaged(path, "does not match its own checksum (meta_sha256)")
    files = meta.get("files_sha256", {})
    if not isinstance(files, dict) or len(file_digests(meta)) != len(files) \
            or not isinstance(meta.get("sha256", ""), str):
        raise damaged(path, "its checksums are damaged (files_sha256 names a file outside the index, or a digest is "
                            "not text)")
    if with_checksums(meta) or "files_sha256" in meta:  # every index that lists checksums lists its strings'
        folder = path.parent
        required = [*STRINGS, *(str(p.relative_to(folder)) for p in sorted(folder.glob("documents/*.parquet"))),
                    *(f for f in ("bm25/bm25.json", "faiss.index") if (folder / f).exists())] \
            if with_checksums(meta) else list(STRINGS)
        missing = [f for f in required if f not in files] + ([] if meta.get("sha256") else ["embeddings.npy"])
        if missing:
            raise damaged(path, f"its checksums are missing ({', '.join(missing)})")
    if not is_count(meta.get("count")) or not is_count(meta.get("dim"), 1):
        raise damaged(path, f"count {meta.get('count')!r} and dim {meta.get('dim')!r} must be whole numbers")
    if meta.get("dtype") not in DTYPES or meta.get("backend", "exact") not in BACKENDS:
        raise damaged(path, f"dtype {meta.get('dtype')!r} or backend {meta.get('backend')!r} is not one twotower "
                            "writes")
    if meta.get("layout", "full") not in LAYOUTS or (meta.get("layout") == "compact" and (
            meta.get("backend", "exact") != "exact" or "lexical" not in meta)):
        raise damaged(path, f"layout {meta.get('layout')!r} is not one twotower writes with its backend and rows")
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
            or (lex["dim"] > meta["dim"] and meta.get("layout") != "compact") or not weight_ok:
        raise damaged(path, "its 'lexical' entry is damaged")
    digests = lex.get("sha256")
    if (digests is not None or with_checksums(meta)) and not (
            isinstance(digests, dict) and all(isinstance(digests.get(k), str) for k in (
                POSTINGS_PARTS if meta.get("layout") == "compact" else LEXICAL_PARTS))):
        raise damaged(path, "the exact lexical rows' checksums are missing or damaged")


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

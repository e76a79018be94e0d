"""`twotower verify`: every file of a run against what was recorded when it was written.

What is checked when:
- every load (search, serve, the API): the model's settings and vocabulary against its fingerprint; the weights
  themselves once per file (a marker records the file's size, times and inode once they matched); an index's
  shapes and offsets; its embeddings, lexical rows, document files and BM25 against their sha256 when they are
  small enough to read at every load (64 MiB each); a non-finite score or undecodable text when it is met.
- `index` and `train`: the model in full before anything is embedded (the torch model is loaded from its files).
- `twotower verify`: all of it, whatever the size, for every index of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twotower_cli.errors import TwotowerError


@dataclass
class Check:
    what: str  # the file or part checked
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return {"what": self.what, "ok": self.ok, "detail": self.detail}


def verify_run(run_dir: Path) -> list[Check]:
    """Every check of the run folder ``run_dir``, in order: the run record, the model, then each index."""
    run_dir = Path(run_dir)
    checks = [attempt("run.json", lambda: run_record(run_dir)), attempt("model", lambda: model(run_dir))]
    folder = run_dir / "index"
    for index in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []:
        checks += index_checks(run_dir, index.name)
    return checks


def attempt(what: str, check) -> Check:
    try:
        return Check(what, True, check())
    except TwotowerError as exc:
        return Check(what, False, str(exc))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as exc:
        return Check(what, False, str(exc) if str(exc).startswith("/") else f"cannot be read ({type(exc).__name__}: "
                                                                           f"{exc})")


def run_record(run_dir: Path) -> str:
    from twotower_cli.retrieval.search import stored_plan
    from twotower_cli.runs import read_json

    run = read_json(run_dir / "run.json", "run record")
    plan = stored_plan(run_dir)
    state = "complete" if run.get("complete") else "not complete (training did not finish)"
    return f"{state}; default search {plan.mode}" + (f" at dense weight {plan.hybrid_weight:g}"
                                                     if plan.mode == "hybrid" else "")


def model(run_dir: Path) -> str:
    """The fingerprint recomputed from every weight, the settings and the vocabulary (without torch for the
    n-gram model)."""
    from twotower_cli.data.vocab import Vocab
    from twotower_cli.model.config import ModelConfig
    from twotower_cli.model.files import (altered, fingerprint, fingerprint_version, mapped_tensors, model_fingerprint,
                                          numpy_weights_digest, read_config)

    cfg = ModelConfig(**read_config(run_dir)["model"])
    vocab = Vocab.load(run_dir / "vocab.json")
    path = run_dir / "model.safetensors"
    tensors = mapped_tensors(path)
    if cfg.encoder == "transformer":
        encoder = mapped_tensors(run_dir / "encoder" / "model.safetensors")
        tensors.update({f"transformer.model.{k}": v for k, v in encoder.items()})
    digest = model_fingerprint(numpy_weights_digest(tensors), cfg, vocab.to_json(), fingerprint_version(path))
    if digest != fingerprint(run_dir):
        raise altered(run_dir)
    return f"{cfg.encoder} model, {len(tensors)} tensors: matches its fingerprint"


def index_checks(run_dir: Path, name: str) -> list[Check]:
    """Every file of one index on its own (a damaged file does not hide the others), then the index opened as
    search opens it (shapes, offsets, the model that built it)."""
    from twotower_cli.retrieval.index import index_dir, load_index
    from twotower_cli.retrieval.meta_file import file_digests

    what, folder = f"index/{name}", index_dir(run_dir, name)
    meta = {}
    out = [attempt(f"{what}/meta.json", lambda: describe_meta(folder / "meta.json", meta))]
    if not meta:
        return out
    out.append(attempt(f"{what}/embeddings.npy", lambda: embeddings(folder, meta)))
    for file, expected in file_digests(meta).items():  # (only names inside the index: meta.json may be damaged)
        if file.startswith("bm25/") and not (folder / "bm25").exists():
            continue  # (built again from the texts on first use)
        out.append(attempt(f"{what}/{file}", lambda f=file, e=expected: matches(folder / f, e)))
    lexical = meta.get("lexical")
    if isinstance(lexical, dict) and isinstance(lexical.get("sha256"), dict) and meta.get("layout") == "compact":
        out.append(attempt(f"{what}/postings.*.npy", lambda: postings(folder, meta)))
    elif isinstance(lexical, dict) and isinstance(lexical.get("sha256"), dict):
        out.append(attempt(f"{what}/lexical.*.npy", lambda: lexical_rows(folder, lexical["sha256"])))
    if (folder / "bm25").is_dir():
        out.append(attempt(f"{what}/bm25", lambda: bm25(folder / "bm25")))
    for kind in ("texts", "ids"):
        if (folder / f"{kind}.bin").exists():
            out.append(attempt(f"{what}/{kind}.bin", lambda k=kind: decoded_file(folder, k)))
    out.append(attempt(f"{what} (opened)", lambda: opened(load_index(run_dir, name))))
    return out


def describe_meta(path: Path, keep: dict) -> str:
    from twotower_cli.retrieval.meta_file import check_meta
    from twotower_cli.runs import read_json

    meta = read_json(path, "index metadata")
    keep.update(meta)  # (the other files are checked even when meta.json is damaged)
    check_meta(path, meta)
    return f"format {meta.get('format_version')}, {meta.get('count', 0):,} documents, built {meta.get('created')}"


def matches(path: Path, expected: str) -> str:
    from twotower_cli.retrieval.index import file_digest

    found = file_digest(path)
    if found is None:
        raise ValueError(f"{path}: missing; rebuild the index")
    if found != expected:
        raise ValueError(f"{path}: does not match its checksum in meta.json; rebuild the index")
    return "matches its checksum"


def embeddings(folder: Path, meta: dict) -> str:
    import hashlib

    path = folder / "embeddings.npy"
    emb = np.load(path, mmap_mode="r")
    if emb.shape != (meta.get("count"), meta.get("dim")):
        raise ValueError(f"{path}: shape {emb.shape} where meta.json says {meta.get('count')}x{meta.get('dim')}")
    if meta.get("sha256") and hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path}: does not match its checksum in meta.json; rebuild the index")
    if emb.size and not np.isfinite(emb).all():
        raise ValueError(f"{path}: holds non-finite values; rebuild the index")
    return f"{emb.shape[0]:,} x {emb.shape[1]} {emb.dtype}, " + ("matches its checksum, " if meta.get("sha256")
                                                                  else "no checksum recorded, ") + "finite"


def lexical_rows(folder: Path, digests: dict) -> str:
    from twotower_cli.model.sparse_rows import FILES, digest

    found = {part: digest(np.load(folder / f"lexical.{part}.npy", mmap_mode="r")) for part in FILES}
    if found != digests:
        bad = [part for part in FILES if found[part] != digests.get(part)]
        raise ValueError(f"{folder}/lexical.{bad[0]}.npy: does not match its checksum in meta.json; rebuild the index")
    return "the exact lexical rows match their checksums"


def postings(folder: Path, meta: dict) -> str:
    from twotower_cli.retrieval.postings import FILES, PREFIX, Postings

    lexical = meta["lexical"]
    for part in FILES:
        matches(folder / f"{PREFIX}.{part}.npy", lexical["sha256"].get(part, ""))
    lists = Postings.load(folder, int(meta.get("count", 0)), lexical.get("buckets"), lexical.get("row_bits", 32),
                          lexical.get("weight_scale"))
    if lists.weights.size and not np.isfinite(lists.weights).all():
        raise ValueError(f"{folder / (PREFIX + '.weights.npy')}: holds non-finite values; rebuild the index")
    if not lists.in_range(int(meta.get("count", 0))):
        raise ValueError(f"{folder / (PREFIX + '.docs.npy')}: holds rows past the index's documents; rebuild it")
    return "the exact lexical rows (inverted) match their checksums"


def bm25(folder: Path) -> str:
    """BM25's arrays against the checksums of its bm25.json (all three), its scores finite."""
    from twotower_cli.retrieval.bm25 import ARRAYS
    from twotower_cli.retrieval.index import file_digest

    from twotower_cli.runs import read_json

    meta = read_json(folder / "bm25.json", "BM25 metadata")
    digests = meta.get("sha256")
    if isinstance(digests, dict) or "sha256" in meta:
        for name in ARRAYS:
            if not isinstance(digests, dict) or file_digest(folder / f"{name}.npy") != digests.get(name):
                raise ValueError(f"{folder / (name + '.npy')}: does not match its checksum in bm25.json; rebuild "
                                 "the index")
    data = np.load(folder / "data.npy", mmap_mode="r")
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"{folder / 'data.npy'}: holds non-finite scores; rebuild the index")
    return f"{meta.get('num_docs', 0):,} documents, {len(meta.get('vocab', {})):,} terms"


def decoded_file(folder: Path, kind: str) -> str:
    from twotower_cli.retrieval.snapshot import Strings

    return decoded(Strings(folder, kind))


def opened(index) -> str:
    return f"opens as one build of {index.count:,} documents"


def decoded(strings) -> str:
    for start in range(0, len(strings), 65536):
        strings.range(start, start + 65536)
    return f"{len(strings):,} entries, each valid UTF-8"

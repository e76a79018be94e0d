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

import json
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
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Check(what, False, f"cannot be read ({type(exc).__name__}: {exc})")


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
    from twotower_cli.retrieval.index import file_digest, load_index

    what = f"index/{name}"
    try:
        index = load_index(run_dir, name)
    except TwotowerError as exc:
        return [Check(what, False, str(exc))]
    folder, meta, out = index.path, index.meta, []

    def digest_of(file: str, expected) -> Check:
        if not expected:
            return Check(f"{what}/{file}", True, "no checksum recorded (an index built before checksums: rebuild "
                                                 "it to have every file checked)")
        ok = file_digest(folder / file) == expected
        return Check(f"{what}/{file}", ok, "matches its checksum" if ok else
                     f"{folder / file}: does not match its checksum in meta.json; rebuild the index")

    embeddings = np.asarray(index.embeddings)
    import hashlib

    ok = meta.get("sha256") in (None, hashlib.sha256(np.ascontiguousarray(embeddings).tobytes()).hexdigest())
    finite = bool(np.isfinite(embeddings).all()) if embeddings.size else True
    out.append(Check(f"{what}/embeddings.npy", ok and finite,
                     f"{meta['count']:,} x {meta['dim']} {meta['dtype']}, matches its checksum, finite" if ok and finite
                     else f"{folder / 'embeddings.npy'}: " + ("does not match its checksum" if not ok else
                                                               "holds non-finite values") + "; rebuild the index"))
    for file, expected in (meta.get("files_sha256") or {}).items():
        out.append(digest_of(file, expected))
    for strings in (index.texts, index.ids):  # every entry is text (also where no checksum was recorded)
        if strings is not None:
            out.append(attempt(f"{what}/{strings.path.name}", lambda s=strings: decoded(s)))
    lexical = meta.get("lexical") or {}
    if lexical.get("sha256"):  # (these checksums are of the arrays, not the files)
        from twotower_cli.model.sparse_rows import FILES, digest

        found = {part: digest(np.load(folder / f"lexical.{part}.npy", mmap_mode="r")) for part in FILES}
        ok = found == lexical["sha256"]
        out.append(Check(f"{what}/lexical.*.npy", ok, "the exact lexical rows match their checksums" if ok else
                         f"{folder}: the exact lexical rows do not match their checksums; rebuild the index"))
    if (folder / "bm25" / "bm25.json").is_file():
        bm25 = json.loads((folder / "bm25" / "bm25.json").read_text())
        for part, expected in (bm25.get("sha256") or {}).items():
            out.append(digest_of(f"bm25/{part}.npy", expected))
        data = np.load(folder / "bm25" / "data.npy", mmap_mode="r")
        if not np.isfinite(data).all():
            out.append(Check(f"{what}/bm25/data.npy", False, f"{folder / 'bm25' / 'data.npy'}: holds non-finite "
                                                             "scores; rebuild the index"))
    return out


def decoded(strings) -> str:
    for start in range(0, len(strings), 65536):
        strings.range(start, start + 65536)
    return f"{len(strings):,} entries, each valid UTF-8"

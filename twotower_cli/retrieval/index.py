"""Embedding indexes: `runs/<id>/index/<name>/` = embeddings.npy (memory-mappable) + the documents + meta.json.

Documents are kept twice: `documents/*.parquet` (ids and texts, for any tool) and `texts.bin`/`ids.bin` with their
offsets (`*.offsets.npy`), which a search reads a few rows of without Polars. An index is written into a temporary
folder and renamed into place (`build.py`); `meta.json`, written last, records the model's fingerprint (searching
with another model is refused), the count, the dimension and a checksum of the embeddings.

Reading needs no torch and never needs write access. A writer killed between moving the old index aside and the
new one in leaves no `<name>` folder: the next reader or writer recovers it (`recover`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from twotower_cli.config_checks import NAME
from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.model.files import fingerprint, load_npy, read_config
from twotower_cli.retrieval.meta_file import LEXICAL_PARTS, POSTINGS_PARTS, check_lexical_settings, check_meta
from twotower_cli.retrieval.snapshot import Index, Strings
from twotower_cli.runs import is_locked, read_json, stamp_or_none

INDEX_FORMAT = 3  # 3: every file's sha256 in meta.json (2: texts.bin/ids.bin and the embeddings' sha256; 1: Parquet)
# the compact layout: the learned half and the exact lexical rows inverted (`compact.py`); 5: their rows and weights
# in 2 bytes each (4: 4 bytes each, still read)
COMPACT_FORMAT = 5


def index_dir(run_dir: Path, name: str) -> Path:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"index name {name!r} must be a plain folder name: letters, digits, '.', '_', '-', "
                         "beginning with a letter or digit")
    return Path(run_dir) / "index" / name


def lock_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "index" / f".{name}.lock"


def is_complete_index(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "embeddings.npy").is_file()


def recover(run_dir: Path, name: str) -> Path:
    """The folder of ``index/<name>``. When it is missing because a writer was killed mid-swap, the newest complete
    copy is moved back (the new index if it was complete, else the old one); in a read-only run, or while another
    writer holds the index's lock, that copy is used where it is."""
    final = index_dir(run_dir, name)
    parent = final.parent
    if final.exists() or not parent.is_dir() or is_locked(lock_path(run_dir, name)):
        return final
    candidates = [p for p in leftovers(parent, name) if is_complete_index(p)]
    if not candidates:
        return final
    # a complete new index (tmp) is what the killed writer was about to publish; else the previous one (old)
    best = max(candidates, key=lambda p: (".tmp-" in p.name, (p / "meta.json").stat().st_mtime))
    try:
        os.replace(best, final)
        return final
    except OSError:
        return best


def leftovers(parent: Path, name: str) -> list[Path]:
    """The folders a writer of index ``name`` leaves when killed (`.NAME.tmp-PID`, `.NAME.old-PID`), and no other
    index's: names may hold dots, and `.a.b.tmp-1` belongs to index `a.b`, not to `a`."""
    import re

    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-\d+")
    return [p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()] \
        if parent.is_dir() else []


def read_strings(folder: Path, name: str, rows: list[int], offsets=None) -> list[str]:
    """Rows of a strings file being written (`build.py`), by its offsets."""
    with open(folder / f"{name}.bin", "rb") as fh:
        out = []
        for r in rows:
            start, end = int(offsets[r]), int(offsets[r + 1])
            fh.seek(start)
            out.append(fh.read(end - start).decode("utf-8"))
        return out


def load_index(run_dir: Path, name: str = "default", check_model: bool = True, model: str | None = None) -> Index:
    """The index ``name`` of a run, every file from one build: a rebuild that lands while it is opened is noticed
    (meta.json changed, or a file vanished) and the new build is opened instead. ``model``: the fingerprint of the
    towers that will search it (default: the one in the run's model.safetensors)."""
    for attempt in range(5):
        folder = recover(run_dir, name)
        if not folder.is_dir():
            if attempt < 4 and is_locked(lock_path(run_dir, name)):  # a writer is between its two renames
                time.sleep(0.05 * (attempt + 1))
                continue
            parent = Path(run_dir) / "index"
            have = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if parent.is_dir() else []
            raise ArtifactError(f"no index '{name}' in {run_dir} (have: {', '.join(have) or 'none'}); "
                                f"build one with: twotower index CORPUS --name {name}")
        before = stamp_or_none(folder / "meta.json")
        try:
            index = open_index(run_dir, folder, name, check_model, model)
        except ArtifactError:
            if stamp_or_none(folder / "meta.json") == before and not is_locked(lock_path(run_dir, name)):
                raise  # the build it read is damaged (or incomplete), not being replaced
            time.sleep(0.05 * (attempt + 1))
            continue
        if stamp_or_none(folder / "meta.json") == before:  # no rebuild landed while its files were opened
            return index
    raise ArtifactError(f"{index_dir(run_dir, name)}: the index kept changing while it was read (is it being "
                        "rebuilt in a loop?); retry when it is written")


def open_index(run_dir: Path, folder: Path, name: str, check_model: bool, model: str | None = None) -> Index:
    meta_path = folder / "meta.json"
    stamps = {meta_path: stamp_or_none(meta_path)}
    meta = read_json(meta_path, "index metadata")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{meta_path}: format_version is {version!r}, not a number; rebuild the index")
    if version > COMPACT_FORMAT:
        raise ArtifactError(f"{meta_path}: index format {version} is newer than this twotower understands; "
                            "upgrade twotower")
    check_meta(meta_path, meta)
    if check_model:
        from twotower_cli.retrieval.verify import model as verify_model

        try:
            if meta.get("model_fingerprint") != (model or fingerprint(run_dir)):
                raise ArtifactError(f"{folder}: index was built by another model (fingerprint differs from "
                                    f"{Path(run_dir) / 'model.safetensors'}); rebuild it with: twotower index "
                                    f"CORPUS --run {Path(run_dir).name} --name {name}")
            check_lexical_settings(meta_path, meta, read_config(run_dir)["model"])
        except ArtifactError:
            verify_model(run_dir)  # an altered model file or config.json is named as such, not blamed on the index
            raise
    path = folder / "embeddings.npy"
    try:
        emb = load_npy(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; rebuild the index") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: corrupt or truncated ({exc or type(exc).__name__}); rebuild the index") from None
    if emb.ndim != 2 or emb.shape != (meta.get("count"), meta.get("dim")) or str(emb.dtype) != meta.get("dtype"):
        raise ArtifactError(f"{path}: shape {emb.shape} {emb.dtype} does not match meta.json "
                            f"({meta.get('count')}x{meta.get('dim')} {meta.get('dtype')}); rebuild the index")
    check_documents(folder, meta)
    verify_checksum(path, emb, meta)
    texts = ids = None
    if version >= 2 or (folder / "texts.bin").exists():
        try:
            texts, ids = Strings(folder, "texts"), Strings(folder, "ids")
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{folder}: its document files cannot be read ({exc}); rebuild the index") from None
        verify_files(folder, meta)
    if meta.get("backend") == "faiss" and not (folder / "faiss.index").is_file():
        raise ArtifactError(f"{folder / 'faiss.index'}: missing, but meta.json says the index uses FAISS; "
                            "rebuild the index")
    lexical = load_lexical(folder, meta)
    for file in ["embeddings.npy", "faiss.index", *(f"lexical.{part}.npy" for part in LEXICAL_PARTS),
                 *(f"postings.{part}.npy" for part in POSTINGS_PARTS),
                 *(f"{kind}{end}" for kind in ("texts", "ids") for end in (".bin", ".offsets.npy")),
                 *(f"documents/{p.name}" for p in sorted((folder / "documents").glob("*.parquet")))]:
        if (folder / file).exists():
            stamps[folder / file] = stamp_or_none(folder / file)
    return Index(folder, meta, emb, lexical, texts, ids, stamps=stamps)


def verify_files(folder: Path, meta: dict) -> None:
    """Compare the index's files with the checksums written when they were built (the smallest first, up to
    ``VERIFY_UP_TO`` bytes in all; `twotower verify` checks any size). That an index written with checksums has
    them all is `meta_file.check_meta`'s to say."""
    digests = meta.get("files_sha256")
    if not isinstance(digests, dict):
        return
    if not (folder / "bm25").exists():  # BM25 removed is built again from the texts on first use, the same
        digests = {f: d for f, d in digests.items() if not f.startswith("bm25/")}
    sizes = {f: (folder / f).stat().st_size if (folder / f).exists() else 0 for f in digests}
    budget = VERIFY_UP_TO
    for name in sorted(digests, key=lambda f: (sizes[f], f)):  # the smallest first, as many as the budget allows
        budget -= sizes[name]
        if budget < 0:
            break
        if file_digest(folder / name) != digests[name]:
            raise ArtifactError(f"{folder / name}: does not match the checksum in meta.json; the file was altered or "
                                "damaged: rebuild the index")


def file_digest(path: Path) -> str | None:
    """The sha256 of a regular file; None when it is missing, "" when it is something else (a folder, a device or
    a pipe: never read, /dev/zero has no end), which matches no checksum."""
    import hashlib
    import stat

    h = hashlib.sha256()
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return ""
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return ""
    return h.hexdigest()


def load_lexical(folder: Path, meta: dict):
    if "lexical" not in meta:
        return None
    from twotower_cli.model.sparse_rows import SparseRows

    lex = meta["lexical"]
    compact = meta.get("layout") == "compact"
    if not isinstance(lex, dict) or not all(isinstance(lex.get(k), int) and not isinstance(lex.get(k), bool)
                                            for k in ("dim", "buckets")) or not 0 < lex["dim"] \
            or (lex["dim"] > meta.get("dim", 0) and not compact):
        raise ArtifactError(f"{folder / 'meta.json'}: its 'lexical' entry is damaged; rebuild the index")
    if compact:
        return load_postings(folder, meta, lex)
    try:
        return SparseRows.load(folder, int(meta["count"]), buckets=lex["buckets"], digests=lex.get("sha256"),
                               verify_up_to=VERIFY_UP_TO)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{exc.filename}: missing, but meta.json says the index has exact lexical rows; "
                            "rebuild the index") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{folder}: the exact lexical rows are damaged ({exc}); rebuild the index") from None


def load_postings(folder: Path, meta: dict, lex: dict):
    """A compact index's inverted lexical rows; small files checked against their sha256 (as `verify_files`)."""
    from twotower_cli.retrieval.postings import FILES, PREFIX, Postings

    try:
        postings = Postings.load(folder, int(meta["count"]), lex["buckets"], lex.get("row_bits", 32),
                                 lex.get("weight_scale"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{exc.filename}: missing, but meta.json says the index has exact lexical rows; "
                            "rebuild the index") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{folder}: the exact lexical rows are damaged ({exc}); rebuild the index") from None
    digests = lex.get("sha256") or {}
    if sum(getattr(postings, name).nbytes for name in FILES) <= VERIFY_UP_TO:
        for name in FILES:
            path = folder / f"{PREFIX}.{name}.npy"
            if digests.get(name) is not None and file_digest(path) != digests[name]:
                raise ArtifactError(f"{path}: does not match the checksum in meta.json; the file was altered or "
                                    "damaged: rebuild the index")
        if (np.diff(postings.indptr) < 0).any() or not postings.in_range(int(meta["count"])) \
                or not np.isfinite(postings.weights).all():
            raise ArtifactError(f"{folder}: the exact lexical rows are out of range; rebuild the index")
    return postings


def check_documents(folder: Path, meta: dict) -> None:
    """The documents must cover every row of the embeddings (read from offsets or Parquet footers, not texts)."""
    count = meta.get("count")
    if meta.get("format_version", 1) >= 2 or (folder / "texts.bin").exists():
        for name in ("texts", "ids"):
            try:
                offsets = load_npy(folder / f"{name}.offsets.npy")
            except (OSError, ValueError, EOFError):
                raise ArtifactError(f"{folder / (name + '.offsets.npy')}: missing or damaged; rebuild the "
                                    "index") from None
            try:
                size = (folder / f"{name}.bin").stat().st_size
            except OSError:
                raise ArtifactError(f"{folder / (name + '.bin')}: missing; rebuild the index") from None
            if offsets.shape != (count + 1,):
                raise ArtifactError(f"{folder / (name + '.offsets.npy')}: gives {offsets.shape[0] - 1} entries for "
                                    f"{count} embeddings; rebuild the index")
            if int(offsets[-1]) != size:
                raise ArtifactError(f"{folder / (name + '.bin')}: {size:,} bytes where its offsets say "
                                    f"{int(offsets[-1]):,} (truncated or altered); rebuild the index")
        return
    parts = sorted((folder / "documents").glob("part-*.parquet"))
    if not parts:
        raise ArtifactError(f"{folder / 'documents'}: no document files; rebuild the index")
    import polars as pl

    try:
        rows = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in parts)
    except Exception:
        raise ArtifactError(f"{folder / 'documents'}: a document file is damaged; rebuild the index") from None
    if rows != count:
        raise ArtifactError(f"{folder / 'documents'}: holds {rows} documents for {count} embeddings; rebuild the index")


VERIFY_UP_TO = 64 << 20  # embeddings files up to this size are checked against meta.json's sha256 at every load


def verify_checksum(path: Path, emb: np.ndarray, meta: dict) -> None:
    """Compare small embeddings files with the checksum written when they were built (larger ones are checked
    for shape only: reading gigabytes for every search would cost more than the search)."""
    digest = meta.get("sha256")
    if not digest or emb.nbytes > VERIFY_UP_TO:
        return
    import hashlib

    if hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest() != digest:
        raise ArtifactError(f"{path}: embeddings do not match the checksum in meta.json; the file was altered or "
                            "damaged: rebuild the index")


def remove_index(run_dir: Path, name: str) -> None:
    shutil.rmtree(index_dir(run_dir, name), ignore_errors=True)

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twotower_cli.config_checks import NAME
from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.model.files import fingerprint
from twotower_cli.runs import is_locked, read_json

INDEX_FORMAT = 2  # 2: texts.bin/ids.bin beside the Parquet parts, a checksum in meta.json (1 is still read)


def index_dir(run_dir: Path, name: str) -> Path:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"index name {name!r} must be a plain folder name (letters, digits, '.', '_', '-')")
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
    candidates = [p for p in parent.glob(f".{name}.*") if p.is_dir() and is_complete_index(p)]
    if not candidates:
        return final
    # a complete new index (tmp) is what the killed writer was about to publish; else the previous one (old)
    best = max(candidates, key=lambda p: (".tmp-" in p.name, (p / "meta.json").stat().st_mtime))
    try:
        os.replace(best, final)
        return final
    except OSError:
        return best


@dataclass
class Index:
    path: Path
    meta: dict
    embeddings: np.ndarray
    on_device: object = None  # the embeddings copied once to a GPU (``search(..., device="cuda")``)
    lexical: object = None  # the documents' exact lexical rows (`lexical.SparseRows`), for models that have them

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def documents(self, rows: list[int]) -> list[dict]:
        """Id and text of the given rows, read without loading the rest."""
        if (self.path / "texts.bin").exists():
            texts, ids = read_strings(self.path, "texts", rows), read_strings(self.path, "ids", rows)
            return [{"row": r, "id": i, "document": t} for r, i, t in zip(rows, ids, texts)]
        import polars as pl  # format 1 indexes: the Parquet parts only

        p = self.path / "documents"
        try:
            frame = (pl.scan_parquet(p / "*.parquet").with_row_index("row").filter(pl.col("row").is_in(rows))
                     .collect())
        except Exception as exc:
            raise ArtifactError(f"{p}: cannot read ({str(exc).splitlines()[0]}); rebuild with twotower index") from None
        by_row = {r["row"]: r for r in frame.to_dicts()}
        missing = [r for r in rows if r not in by_row]
        if missing:
            raise ArtifactError(f"{p}: has no document for row {missing[0]} of the embeddings; rebuild the index")
        return [by_row[r] for r in rows]

    def search(self, queries: np.ndarray, k: int, device: str = "cpu",
               query_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, min(k, count)], best first; exact in NumPy (or on a GPU, the embeddings copied there
        once), or FAISS HNSW when built with it. With the queries' exact lexical rows (``query_rows``) and an index
        that has the documents', the best ``RERANK`` rows are re-scored with them (`lexical.rescore`)."""
        k = min(k, self.count)
        if query_rows is not None and self.lexical is not None:
            from twotower_cli.retrieval.lexical import RERANK, candidates, first_pass, rescore

            lex = self.meta["lexical"]
            _, rows = self.dense_search(first_pass(queries, lex["dim"], lex.get("weight")), max(k, RERANK), device)
            rows = candidates(rows, len(queries))
            try:
                return rescore(queries, query_rows, self.embeddings, self.lexical, rows, lex["dim"], k,
                               lex["buckets"])
            except FloatingPointError as exc:
                raise ArtifactError(f"{self.path / str(exc)}: holds non-finite values (NaN or infinity); rebuild "
                                    f"the index: twotower index CORPUS --name {self.path.name}") from None
        return self.dense_search(queries, k, device)

    def dense_search(self, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.count)
        if device != "cpu" and self.meta.get("backend") != "faiss":
            return self.search_on(queries, k, device)
        if self.meta.get("backend") == "faiss":
            import faiss

            index = faiss.read_index(str(self.path / "faiss.index"))
            index.hnsw.efSearch = max(int(self.meta.get("faiss", {}).get("ef_search", 128)), k)
            s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
            return s, i.astype(np.int64)  # rows the graph could not fill are -1
        from twotower_cli.retrieval.topk_numpy import numpy_topk

        try:
            return numpy_topk(queries, self.embeddings, k)
        except FloatingPointError as exc:
            raise ArtifactError(f"{self.path / 'embeddings.npy'}: {exc} (NaN or infinity); rebuild the index: "
                                f"twotower index CORPUS --name {self.path.name}") from None


    def search_on(self, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from twotower_cli.retrieval.topk import exact_topk

        if self.on_device is None:
            self.on_device = torch.from_numpy(np.ascontiguousarray(self.embeddings)).to(device)
        s, i = exact_topk(torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(device), self.on_device, k)
        s, i = s.cpu().numpy(), i.cpu().numpy()
        if not np.isfinite(s).all():
            raise ArtifactError(f"{self.path / 'embeddings.npy'}: holds non-finite values (NaN or infinity); "
                                f"rebuild the index: twotower index CORPUS --name {self.path.name}")
        return s, i


def read_strings(folder: Path, name: str, rows: list[int], offsets=None) -> list[str]:
    """Rows of a strings file (`texts.bin`, `ids.bin`), by its offsets (read from disk unless given)."""
    if offsets is None:
        offsets = np.load(folder / f"{name}.offsets.npy", mmap_mode="r")
    with open(folder / f"{name}.bin", "rb") as fh:
        out = []
        for r in rows:
            start, end = int(offsets[r]), int(offsets[r + 1])
            fh.seek(start)
            out.append(fh.read(end - start).decode("utf-8"))
        return out


def load_index(run_dir: Path, name: str = "default", check_model: bool = True) -> Index:
    folder = recover(run_dir, name)
    if not folder.is_dir():
        parent = Path(run_dir) / "index"
        have = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if parent.is_dir() else []
        raise ArtifactError(f"no index '{name}' in {run_dir} (have: {', '.join(have) or 'none'}); "
                            f"build one with: twotower index CORPUS --name {name}")
    meta = read_json(folder / "meta.json", "index metadata")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{folder / 'meta.json'}: format_version is {version!r}, not a number; rebuild the index")
    if version > INDEX_FORMAT:
        raise ArtifactError(f"{folder / 'meta.json'}: index format {version} is newer than this twotower "
                            "understands; upgrade twotower")
    if check_model and meta.get("model_fingerprint") != fingerprint(run_dir):
        raise ArtifactError(f"{folder}: index was built by another model (fingerprint differs from "
                            f"{Path(run_dir) / 'model.safetensors'}); rebuild it with: twotower index CORPUS "
                            f"--run {Path(run_dir).name} --name {name}")
    path = folder / "embeddings.npy"
    try:
        emb = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; rebuild the index") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: corrupt or truncated ({exc or type(exc).__name__}); rebuild the index") from None
    if emb.ndim != 2 or emb.shape != (meta.get("count"), meta.get("dim")) or str(emb.dtype) != meta.get("dtype"):
        raise ArtifactError(f"{path}: shape {emb.shape} {emb.dtype} does not match meta.json "
                            f"({meta.get('count')}x{meta.get('dim')} {meta.get('dtype')}); rebuild the index")
    check_documents(folder, meta)
    verify_checksum(path, emb, meta)
    if meta.get("backend") == "faiss" and not (folder / "faiss.index").is_file():
        raise ArtifactError(f"{folder / 'faiss.index'}: missing, but meta.json says the index uses FAISS; "
                            "rebuild the index")
    return Index(folder, meta, emb, lexical=load_lexical(folder, meta))


def load_lexical(folder: Path, meta: dict):
    if "lexical" not in meta:
        return None
    from twotower_cli.model.sparse_rows import SparseRows

    lex = meta["lexical"]
    if not isinstance(lex, dict) or not all(isinstance(lex.get(k), int) and not isinstance(lex.get(k), bool)
                                            for k in ("dim", "buckets")) or not 0 < lex["dim"] <= meta.get("dim", 0):
        raise ArtifactError(f"{folder / 'meta.json'}: its 'lexical' entry is damaged; rebuild the index")
    try:
        return SparseRows.load(folder, int(meta["count"]), buckets=lex["buckets"], digests=lex.get("sha256"),
                               verify_up_to=VERIFY_UP_TO)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{exc.filename}: missing, but meta.json says the index has exact lexical rows; "
                            "rebuild the index") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{folder}: the exact lexical rows are damaged ({exc}); rebuild the index") from None


def check_documents(folder: Path, meta: dict) -> None:
    """The documents must cover every row of the embeddings (read from offsets or Parquet footers, not texts)."""
    count = meta.get("count")
    if meta.get("format_version", 1) >= 2 or (folder / "texts.bin").exists():
        for name in ("texts", "ids"):
            try:
                offsets = np.load(folder / f"{name}.offsets.npy", mmap_mode="r")
                size = (folder / f"{name}.bin").stat().st_size
            except (OSError, ValueError, EOFError):
                raise ArtifactError(f"{folder / (name + '.bin')}: missing or damaged; rebuild the index") from None
            if offsets.shape != (count + 1,) or int(offsets[-1]) != size:
                raise ArtifactError(f"{folder / (name + '.bin')}: holds {offsets.shape[0] - 1} entries for {count} "
                                    "embeddings (or is truncated); rebuild the index")
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

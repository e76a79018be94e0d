"""Embedding indexes: `runs/<id>/index/<name>/` = embeddings.npy (memory-mappable) + documents/*.parquet + meta.json.

`documents/` holds Parquet parts (one per chunk written). An index is written into a temporary folder and renamed into place, so a killed `index` never leaves a half
index that `search` would use. `meta.json` records the fingerprint of the model that made it; searching with
another model is refused.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from twotower_cli.errors import ArtifactError, UsageError
from twotower_cli.model.artifacts import fingerprint
from twotower_cli.retrieval.topk import exact_topk
from twotower_cli.runs import atomic_write_json, read_json

INDEX_FORMAT = 1


def index_dir(run_dir: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"index name {name!r} must be a plain folder name")
    return Path(run_dir) / "index" / name


@torch.no_grad()
def build_index(run_dir: Path, model, vocab, chunks, name: str = "default", device="cpu", dtype: str = "float32",
                backend: str = "exact", batch_size: int = 2048, progress=None, total: int | None = None) -> Path:
    """Embed ``chunks`` (an iterable of (documents Series, ids list or None)) into ``index/<name>/``.

    Only one chunk of text is in memory at a time: embeddings are appended to a raw file and documents to one
    Parquet part per chunk. Identical documents (by 64-bit hash) are stored once. The folder is assembled under
    a temporary name and renamed into place at the end."""
    if dtype not in ("float32", "float16"):
        raise UsageError(f"--dtype {dtype!r}: use float32 or float16")
    final = index_dir(run_dir, name)
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "documents").mkdir(parents=True)
    dim, max_len = model.cfg.output_dim, model.cfg.max_document_length
    seen = np.zeros(0, dtype=np.uint64)
    n = offset = 0
    was = model.training
    model.eval()
    with open(tmp / "embeddings.raw", "wb") as raw:
        for part, (docs, ids) in enumerate(chunks):
            docs = docs.fill_null("").cast(pl.String)
            ids = ids if ids is not None else [str(offset + i) for i in range(len(docs))]
            offset += len(docs)
            h = docs.hash(seed=0).to_numpy()
            _, first = np.unique(h, return_index=True)
            keep = np.zeros(len(docs), dtype=bool)
            keep[first] = True
            keep &= ~np.isin(h, seen)
            seen = np.concatenate([seen, h[keep]])
            frame = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String), "document": docs}).filter(pl.Series(keep))
            for s in range(0, frame.height, batch_size):
                chunk = frame["document"].slice(s, batch_size)
                tokens = torch.from_numpy(vocab.encode(chunk, max_len)).to(device)
                raw.write(model.encode_documents(tokens).float().cpu().numpy().astype(dtype).tobytes())
            frame.write_parquet(tmp / "documents" / f"part-{part:05d}.parquet")
            n += frame.height
            if progress:
                progress(offset, total)
    model.train(was)
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError("the corpus has no documents to index")
    write_npy(tmp / "embeddings.npy", tmp / "embeddings.raw", (n, dim), dtype)
    meta = {"format_version": INDEX_FORMAT, "model_fingerprint": fingerprint(run_dir), "dim": dim, "count": n,
            "dtype": dtype, "backend": backend, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if backend == "faiss":
        meta["faiss"] = build_faiss(tmp, n, dim)
    atomic_write_json(tmp / "meta.json", meta)
    old = final.parent / f".{name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_npy(path: Path, raw: Path, shape: tuple[int, int], dtype: str) -> None:
    """Turn the raw embeddings into a standard (memory-mappable) .npy file, streaming, then drop the raw file."""
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                   "shape": shape})
        with open(raw, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 24)
        out.flush()
        os.fsync(out.fileno())
    raw.unlink()


def build_faiss(folder: Path, n: int, dim: int) -> dict:
    try:
        import faiss
    except ImportError:
        raise UsageError("--backend faiss needs faiss-cpu: pip install 'twotower-cli[faiss]'") from None
    x = np.load(folder / "embeddings.npy").astype(np.float32)
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(x)
    faiss.write_index(index, str(folder / "faiss.index"))
    return {"type": "HNSW32", "ef_search": 128}


@dataclass
class Index:
    path: Path
    meta: dict
    embeddings: np.ndarray

    def documents(self, rows: list[int]) -> list[dict]:
        """Id and text of the given rows, read from Parquet without loading the rest."""
        p = self.path / "documents"
        try:
            frame = (pl.scan_parquet(p / "*.parquet").with_row_index("row").filter(pl.col("row").is_in(rows))
                     .collect())
        except Exception as exc:
            raise ArtifactError(f"{p}: cannot read ({str(exc).splitlines()[0]}); rebuild with twotower index") from None
        by_row = {r["row"]: r for r in frame.to_dicts()}
        return [by_row[r] for r in rows]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.meta.get("backend") == "faiss":
            import faiss

            index = faiss.read_index(str(self.path / "faiss.index"))
            index.hnsw.efSearch = max(self.meta["faiss"]["ef_search"], k)
            s, i = index.search(queries.cpu().numpy().astype(np.float32), k)
            return torch.from_numpy(s), torch.from_numpy(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memmap: torch warns that it is not writable
            return exact_topk(queries.float(), self.embeddings, k)


def load_index(run_dir: Path, name: str = "default", check_model: bool = True) -> Index:
    folder = index_dir(run_dir, name)
    if not folder.is_dir():
        have = sorted(p.name for p in (Path(run_dir) / "index").glob("[!.]*")) if (Path(run_dir) / "index").is_dir() else []
        raise ArtifactError(f"no index '{name}' in {run_dir} (have: {', '.join(have) or 'none'}); "
                            f"build one with: twotower index CORPUS --name {name}")
    meta = read_json(folder / "meta.json", "index metadata")
    if meta.get("format_version", 0) > INDEX_FORMAT:
        raise ArtifactError(f"{folder / 'meta.json'}: index format {meta['format_version']} is newer than this "
                            "twotower understands; upgrade twotower")
    if check_model and meta.get("model_fingerprint") != fingerprint(run_dir):
        raise ArtifactError(f"{folder}: index was built by another model (fingerprint differs from "
                            f"{Path(run_dir) / 'model.safetensors'}); rebuild it with: twotower index CORPUS "
                            f"--run {Path(run_dir).name} --name {name}")
    path = folder / "embeddings.npy"
    try:
        emb = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; rebuild the index") from None
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: corrupt or truncated ({exc}); rebuild the index") from None
    if emb.ndim != 2 or emb.shape != (meta.get("count"), meta.get("dim")) or str(emb.dtype) != meta.get("dtype"):
        raise ArtifactError(f"{path}: shape {emb.shape} {emb.dtype} does not match meta.json "
                            f"({meta.get('count')}x{meta.get('dim')} {meta.get('dtype')}); rebuild the index")
    if not list((folder / "documents").glob("part-*.parquet")):
        raise ArtifactError(f"{folder / 'documents'}: no document files; rebuild the index")
    return Index(folder, meta, emb)

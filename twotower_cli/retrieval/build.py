"""Building an index (`index.py` reads them): embed a corpus chunk by chunk into a temporary folder, then swap it in.

Only one chunk of text is in memory at a time: embeddings are appended to `embeddings.npy` (its header written
last), documents to one Parquet part per chunk and to `texts.bin`/`ids.bin`. Identical documents are stored once
(texts compared, not only their 64-bit hashes). Embeddings that are not finite are refused. The writer holds the
index's lock, removes what killed writers left, checks free disk space first, and names the file a full disk stopped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from twotower_cli.errors import TrainingError, UsageError
from twotower_cli.model.encode import document_tokens, lexical_rows
from twotower_cli.model.files import fingerprint
from twotower_cli.model.sparse_rows import digest as array_digest
from twotower_cli.retrieval.index import COMPACT_FORMAT, INDEX_FORMAT, index_dir, leftovers, lock_path, read_strings, \
    recover
from twotower_cli.retrieval.meta_file import LAYOUTS, meta_digest
from twotower_cli.runs import Lock, atomic_write_json, check_free_space, disk_full, fsync_folder

HEADER = 128  # bytes reserved for the .npy header, written once the row count is known


def npy_header(shape: tuple[int, int], dtype: str) -> bytes:
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    body = text.encode("latin1")
    pad = HEADER - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("shape too large for the reserved header")
    return b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class Strings:
    """An append-only file of UTF-8 strings and their offsets (rows can be read back by number)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.fh = open(folder / f"{name}.bin", "wb")
        self.offsets = [0]
        self.sha = hashlib.sha256()

    def add(self, values: list[str]) -> None:
        for v in values:
            b = v.encode("utf-8")
            self.fh.write(b)
            self.sha.update(b)
            self.offsets.append(self.offsets[-1] + len(b))

    def close(self) -> dict[str, str]:
        """Closes the file, writes the offsets; returns both files' sha256."""
        self.fh.close()
        offsets = np.asarray(self.offsets, dtype=np.int64)
        np.save(self.folder / f"{self.name}.offsets.npy", offsets)
        from twotower_cli.retrieval.index import file_digest

        return {f"{self.name}.bin": self.sha.hexdigest(),
                f"{self.name}.offsets.npy": file_digest(self.folder / f"{self.name}.offsets.npy")}


@torch.no_grad()
def build_index(run_dir: Path, model, vocab, chunks, name: str = "default", device="cpu", dtype: str = "float32",
                backend: str = "exact", batch_size: int = 2048, progress=None, total: int | None = None,
                precomputed=None, bm25: bool = False, layout: str = "auto") -> Path:
    """Embed ``chunks`` (an iterable of (documents Series, ids list or None)) into ``index/<name>/``.
    ``precomputed(i, docs)``: the embeddings and lexical rows of every row of chunk ``i``, computed elsewhere (by the
    processes of a sharded build, `sharded.py`); what is stored is the same as when computed here. ``bm25``: the
    BM25 side too (written before the index is swapped in, so that no reader sees the index without it).
    ``layout`` "compact": the learned half only and the exact lexical rows inverted (`compact.py`); "auto": compact
    where it can be (`layout_for`)."""
    if dtype not in ("float32", "float16"):
        raise UsageError(f"--dtype {dtype!r}: use float32 or float16")
    layout = layout_for(model.cfg, layout, backend)
    final = index_dir(run_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with Lock(lock_path(run_dir, name), f"index '{name}' of {Path(run_dir).name}"):
        recover(run_dir, name)
        for left in leftovers(final.parent, name):  # what killed writers of this index left (recover took its due)
            shutil.rmtree(left, ignore_errors=True)
        tmp = final.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            n, dim, digest, nnz, files, shared_ids = write_folder(tmp, model, vocab, chunks, device, dtype,
                                                                  batch_size, progress, total, precomputed, layout)
            meta = {"format_version": INDEX_FORMAT if layout == "full" else COMPACT_FORMAT,
                    "model_fingerprint": fingerprint(run_dir), "dim": dim, "count": n, "dtype": dtype,
                    "backend": backend, "sha256": digest, "files_sha256": files, "shared_ids": shared_ids,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if nnz is not None:
                nnz, digests, stored = nnz
                meta["lexical"] = {"dim": model.cfg.lexical_dim, "buckets": model.cfg.ngram_buckets, "nnz": nnz,
                                   "weight": model.cfg.lexical_weight, "sha256": digests, **stored}
            if layout == "compact":
                meta["layout"] = "compact"
            if backend == "faiss":
                meta["faiss"] = build_faiss(tmp, n, dim)
            if bm25:
                from twotower_cli.retrieval.bm25 import BM25
                from twotower_cli.retrieval.snapshot import Strings as StringsFile

                BM25.build(StringsFile(tmp, "texts"), tmp / "bm25")
            meta["files_sha256"].update(other_files(tmp))
            meta["meta_sha256"] = meta_digest(meta)
            atomic_write_json(tmp / "meta.json", meta)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise disk_full(Path(exc.filename or tmp), exc) from None
            raise
        old = final.parent / f".{name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)  # a kill between the two renames is undone by recover()
        fsync_folder(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    return final


def other_files(folder: Path) -> dict[str, str]:
    """The sha256 of an index's files besides the embeddings, lexical rows and strings (their checksums are
    computed as they are written): the Parquet parts, a FAISS graph, and bm25.json (which holds its arrays')."""
    from twotower_cli.retrieval.index import file_digest

    found = [*sorted((folder / "documents").glob("part-*.parquet")), folder / "bm25" / "bm25.json",
             folder / "faiss.index"]
    return {str(p.relative_to(folder)): file_digest(p) for p in found if p.is_file()}


def layout_for(cfg, layout: str, backend: str) -> str:
    """The layout an index is written in: "auto" is compact (a third of the full layout's size, the same ranking)
    unless the model has no exact lexical half or the backend is FAISS (which searches the full embeddings)."""
    if layout == "auto":
        return "compact" if getattr(cfg, "lexical_exact", False) and backend == "exact" else "full"
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: use auto, {' or '.join(LAYOUTS)}")
    if layout == "compact" and not getattr(cfg, "lexical_exact", False):
        raise UsageError("--layout compact needs a model with the exact lexical half (model.lexical_exact, the "
                         "default since format 3): use --layout full for this run")
    if layout == "compact" and backend != "exact":
        raise UsageError("--layout compact scores every document exactly: use it with --backend exact")
    return layout


def write_folder(tmp: Path, model, vocab, chunks, device, dtype: str, batch_size: int, progress, total,
                 precomputed=None, layout: str = "full"):
    """Writes the index's files into ``tmp``; returns the count, the dimension, the embeddings' sha256, the lexical
    rows' (entries, sha256) or None, the document files' sha256 and how many documents kept an id given before."""
    (tmp / "documents").mkdir(parents=True)
    compact = layout == "compact"
    dim = model.cfg.embedding_dim if compact else model.cfg.output_dim
    if total:
        check_free_space(tmp / "embeddings.npy", HEADER + int(total) * dim * np.dtype(dtype).itemsize)
    was = model.training
    model.eval()
    texts, ids_out = Strings(tmp, "texts"), Strings(tmp, "ids")
    lexical = (PostingsFiles(tmp, model.cfg.ngram_buckets) if compact else LexicalWriter(tmp)) \
        if getattr(model.cfg, "lexical_exact", False) else None
    try:
        with open(tmp / "embeddings.npy", "wb") as raw:
            n, digest, shared_ids = write_chunks(raw, tmp, model, vocab, chunks, device, dtype, batch_size, progress,
                                                 total, precomputed, texts, ids_out, lexical,
                                                 model.cfg.lexical_dim if compact else 0)
        files = {**texts.close(), **ids_out.close()}
        return n, dim, digest, lexical.close() if lexical is not None else None, files, shared_ids
    finally:
        for fh in [texts.fh, ids_out.fh] + (list(lexical.files.values()) if lexical is not None else []):
            fh.close()  # (closed already unless something failed)
        model.train(was)


def write_chunks(raw, tmp: Path, model, vocab, chunks, device, dtype: str, batch_size: int, progress, total,
                 precomputed, texts: Strings, ids_out: Strings, lexical, skip: int = 0) -> tuple[int, str, int]:
    """Embeddings appended to ``raw`` (its header written last; their first ``skip`` columns left out), documents to
    their files; identical documents once.
    Also counts the documents whose id an earlier (different) document has (by the ids' 64-bit hashes)."""
    max_len = model.cfg.max_document_length
    seen_h, seen_row, seen_ids = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, np.uint64)
    n = offset = shared_ids = 0
    digest = hashlib.sha256()
    raw.write(b"\0" * HEADER)
    for part, (docs, ids) in enumerate(chunks):
        docs = docs.fill_null("").cast(pl.String)
        ids = ids if ids is not None else [str(offset + i) for i in range(len(docs))]
        offset += len(docs)
        frame = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String), "document": docs,
                              "row": np.arange(len(docs), dtype=np.int64)})
        pre = precomputed(part, docs) if precomputed is not None else None
        frame = frame.filter(pl.col("document").is_first_distinct())  # exact texts, not hashes
        h = frame["document"].hash(seed=0).to_numpy()
        repeat = np.isin(h, seen_h)
        if repeat.any():  # a hash seen in an earlier chunk: the same text only if one of its texts is equal
            texts.fh.flush()
            same = np.zeros(len(h), dtype=bool)
            docs_now = frame["document"].to_list()
            for i in np.flatnonzero(repeat).tolist():
                lo, hi = np.searchsorted(seen_h, h[i], "left"), np.searchsorted(seen_h, h[i], "right")
                earlier = read_strings(tmp, "texts", seen_row[lo:hi].tolist(), texts.offsets)
                same[i] = docs_now[i] in earlier
            frame, h = frame.filter(pl.Series(~same)), h[~same]
        for s in range(0, frame.height, batch_size):
            if pre is not None:  # rows of the chunk as read (the kept ones), computed by a sharded build
                keep = frame["row"].slice(s, batch_size).to_numpy()
                emb, rows = pre[0][keep], pre[1].take(keep) if lexical is not None else None
            else:
                emb, rows = embed_batch(model, vocab, frame["document"].slice(s, batch_size), max_len, device,
                                        lexical is not None, n + s)
            data = np.ascontiguousarray(emb[:, skip:], dtype=dtype).tobytes()
            digest.update(data)
            raw.write(data)
            if lexical is not None:
                lexical.add(rows)
        frame = frame.drop("row")
        id_h = frame["id"].hash(seed=0).to_numpy()
        shared_ids += int(len(id_h) - len(np.unique(id_h)) + np.isin(np.unique(id_h), seen_ids).sum())
        seen_ids = np.union1d(seen_ids, id_h)
        frame.write_parquet(tmp / "documents" / f"part-{part:05d}.parquet")
        texts.add(frame["document"].to_list())
        ids_out.add(frame["id"].to_list())
        order = np.argsort(np.concatenate([seen_h, h]), kind="stable")
        seen_h = np.concatenate([seen_h, h])[order]
        seen_row = np.concatenate([seen_row, np.arange(n, n + frame.height)])[order]
        n += frame.height
        if progress:
            progress(offset, total)
    if n == 0:
        raise UsageError("the corpus has no documents to index")
    raw.seek(0)
    raw.write(npy_header((n, model.cfg.output_dim - skip), dtype))
    raw.flush()
    os.fsync(raw.fileno())
    return n, digest.hexdigest(), shared_ids


def embed_batch(model, vocab, docs, max_len: int, device, lexical: bool, first: int = 0):
    """Embeddings (float32 NumPy) and, with ``lexical``, the exact lexical rows of a Series of documents."""
    tokens = torch.from_numpy(vocab.encode(docs, max_len)).to(device)
    emb = model.encode_documents(tokens).float()
    if not bool(torch.isfinite(emb).all()):
        raise TrainingError(f"the model gives non-finite embeddings (NaN or infinity) for documents "
                            f"{first + 1}..{first + len(docs)}; its weights are damaged: retrain")
    if not lexical:
        return emb.cpu().numpy(), None
    if model.cfg.lexical_length != max_len:  # the exact lexical half reads more of a document (no parameters)
        tokens = document_tokens(vocab, docs, model.cfg.lexical_length).to(device)
    return emb.cpu().numpy(), lexical_rows(model, tokens, "document", device)


class LexicalWriter:
    """The documents' exact lexical rows, appended batch by batch to `lexical.buckets.npy` and
    `lexical.weights.npy` (headers written last, as for the embeddings); the row offsets are kept in memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {name: open(folder / f"lexical.{name}.npy", "wb") for name in ("buckets", "weights")}
        for fh in self.files.values():
            fh.write(b"\0" * HEADER)
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0
        self.hashes = {name: hashlib.sha256() for name in self.files}

    def add(self, rows) -> None:
        for name, values in (("buckets", rows.buckets.astype(np.int32)), ("weights", rows.weights.astype(np.float32))):
            data = np.ascontiguousarray(values).tobytes()
            self.files[name].write(data)
            self.hashes[name].update(data)
        self.indptr.append(rows.indptr[1:] + self.nnz)
        self.nnz += int(rows.indptr[-1])

    def close(self) -> tuple[int, dict]:
        """Writes the headers and the row offsets; returns the entry count and the three files' sha256."""
        for name, fh in self.files.items():
            fh.seek(0)
            fh.write(npy_header((self.nnz,), "int32" if name == "buckets" else "float32"))
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        indptr = np.concatenate(self.indptr)
        np.save(self.folder / "lexical.indptr.npy", indptr)
        return self.nnz, {"indptr": array_digest(indptr),
                          **{name: h.hexdigest() for name, h in self.hashes.items()}}, {}


class PostingsFiles:
    """The documents' exact lexical rows inverted (`postings.py`), with `LexicalWriter`'s interface."""

    def __init__(self, folder: Path, buckets: int):
        from twotower_cli.retrieval.postings import PostingsWriter

        self.folder, self.writer = folder, PostingsWriter(folder, buckets)
        self.files = {"docs": self.writer.run_docs, "weights": self.writer.run_weights}

    def add(self, rows) -> None:
        self.writer.add(rows.indptr, rows.buckets, rows.weights)

    def close(self) -> tuple[int, dict]:
        from twotower_cli.retrieval.index import file_digest
        from twotower_cli.retrieval.postings import FILES, PREFIX

        from twotower_cli.retrieval.postings import ROW_BITS

        nnz = self.writer.close()
        return nnz, {name: file_digest(self.folder / f"{PREFIX}.{name}.npy") for name in FILES}, \
            {"row_bits": ROW_BITS, "weight_scale": self.writer.scale}


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


def faiss_available() -> None:
    """Check before any work that --backend faiss can run."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("--backend faiss needs faiss-cpu: pip install 'twotower-cli[faiss]'") from None


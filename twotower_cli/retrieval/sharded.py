"""Indexing under torchrun: the corpus's chunks are dealt to the processes in turn (chunk i to rank i % world),
each process embeds its chunks on its own device and saves them (NumPy files, no pickles) in a folder beside the
index; then rank 0 builds the index from the saved chunks exactly as one process would have (the same order, the
same de-duplication, written aside and renamed in one step). The run folder must be on a filesystem every process
sees (one machine, or a shared one)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from twotower_cli.errors import DataError, TrainingError
from twotower_cli.retrieval.build import build_index, embed_batch
from twotower_cli.retrieval.index import index_dir
from twotower_cli.runs import atomic_write_json, read_json, scratch_dir


def build_sharded(run_dir: Path, model, vocab, make_chunks, name: str, d, dtype: str = "float32",
                  backend: str = "exact", batch_size: int = 2048, progress=None, total: int | None = None,
                  bm25: bool = False, layout: str = "auto"):
    """``make_chunks()`` gives a fresh iterator of (documents, ids) chunks (each process reads the corpus; rank 0
    reads it twice). Returns the index folder on rank 0, None on the others."""
    final = index_dir(run_dir, name)
    token = d.broadcast(f"{os.getpid()}-{time.time_ns()}")  # one folder name for every process
    folder, lock = final.parent / f".{name}.shards-{token}", None
    if d.main:  # rank 0 holds the folder's lock while it lives: a build whose lock is free was killed
        folder, lock = scratch_dir(final.parent, f".{name}.shards-", token)
    try:
        d.barrier()
        return embed_then_assemble(run_dir, model, vocab, make_chunks, name, d, folder, dtype, backend, batch_size,
                                   progress, total, bm25, layout)
    except BaseException:
        if d.main:  # an interrupt (every process gets it from torchrun) or an error: the shards are not kept
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def embed_then_assemble(run_dir, model, vocab, make_chunks, name, d, folder, dtype, backend, batch_size, progress,
                        total, bm25: bool, layout: str = "auto"):
    lexical = bool(getattr(model.cfg, "lexical_exact", False))
    error, done = None, 0
    try:
        with torch.no_grad():
            model.eval()
            for i, (docs, _) in enumerate(make_chunks()):
                if i % d.world == d.rank:
                    embed_chunk(model, vocab, docs, folder, i, d.device, lexical, batch_size)
                done += len(docs)
                if progress and d.main:
                    progress(done, total)
    except Exception as exc:  # every process must learn of it, or the others wait at the barrier forever
        error = exc
    failed = d.any(error is not None)
    try:
        if failed:
            if error is not None:
                raise error
            raise TrainingError("another indexing process failed (its message is above); nothing was written")
        if not d.main:
            return None

        def load(i: int, docs):
            info = read_json(folder / f"chunk-{i:06d}.json")
            if info != {"rows": len(docs), "texts": texts_digest(docs)}:
                raise DataError(f"chunk {i + 1} of the corpus is not what was embedded: the file changed while it "
                                "was being indexed; index it again")
            emb = np.load(folder / f"chunk-{i:06d}.embeddings.npy")
            if not lexical:
                return emb, None
            from twotower_cli.model.sparse_rows import SparseRows

            return emb, SparseRows.load(folder, emb.shape[0], f"chunk-{i:06d}.lexical")

        return build_index(run_dir, model, vocab, make_chunks(), name, device="cpu", dtype=dtype, backend=backend,
                           batch_size=batch_size, total=total, precomputed=load, bm25=bm25, layout=layout)
    finally:
        d.barrier()  # nobody leaves (and the folder goes) before rank 0 has built the index
        if d.main:
            shutil.rmtree(folder, ignore_errors=True)


def texts_digest(docs) -> str:
    return hashlib.sha256(docs.fill_null("").cast(pl.String).hash(seed=0).to_numpy().tobytes()).hexdigest()


def embed_chunk(model, vocab, docs, folder: Path, i: int, device, lexical: bool, batch_size: int) -> None:
    """Every row of chunk ``i`` as read (de-duplication is rank 0's, when it assembles), saved under ``folder``."""
    from twotower_cli.model.sparse_rows import SparseRows

    embs, rows = [], []
    for s in range(0, len(docs), batch_size):
        e, r = embed_batch(model, vocab, docs.slice(s, batch_size), model.cfg.max_document_length, device, lexical, s)
        embs.append(e)
        rows.append(r)
    atomic_write_json(folder / f"chunk-{i:06d}.json", {"rows": len(docs), "texts": texts_digest(docs)})
    tmp = folder / f".chunk-{i:06d}.embeddings.npy"
    np.save(tmp, np.concatenate(embs) if embs else np.zeros((0, model.cfg.output_dim), np.float32))
    if lexical:
        SparseRows.concat(rows).save(folder, f"chunk-{i:06d}.lexical")
    os.replace(tmp, folder / f"chunk-{i:06d}.embeddings.npy")

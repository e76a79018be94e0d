"""Reading a pairs file for training a slice of rows at a time, so that memory is bounded by the slice, not the file.

Each slice is normalised like `load_pairs` reads it, rows with an empty query or document are dropped, and every
query and document gets an integer id: texts are numbered in the order they first appear in the file, and each
distinct text is written once to a `TextStore` on disk. What stays in memory is integers: three per row (query
id, document id, label) and three per distinct text (two 64-bit hashes and its id, to recognise it again).

Parquet files are streamed (Polars reads row groups in slices); text formats (TSV, CSV, JSON lines) are read in
slices of whole records by `data.text_slices`, each parsed as the whole file would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from twotower_cli.data.pairs import (
    bad_labels,
    check_file,
    file_format,
    first_line,
    label_error,
    missing_column_error,
    no_positives_error,
    pairs_frame,
    parquet_schema,
    usable_rows,
)
from twotower_cli.data.text_slices import TextSlices
from twotower_cli.data.text_store import StoreWriter
from twotower_cli.data.vocab import MAX_CODEPOINT, codepoint_counts, prepare
from twotower_cli.errors import DataError

CHUNK_ROWS = 65536
SEEDS = (0x74776F, 0x746F77)  # two independent 64-bit hashes of a text: equal texts share both
EXAMPLES = 10


@dataclass
class PairRows:
    """A pairs file as training reads it: its distinct texts (ids = positions) and, per usable row, ids and label."""
    path: Path
    queries: object  # TextStore (or a Polars Series in memory): query text of each query id
    documents: object
    qid: np.ndarray  # int64 [rows used]
    did: np.ndarray  # int64
    label: np.ndarray  # int8, 1 or 0
    rows: int  # rows in the file
    dropped: int = 0  # rows without a query or document text
    examples: list = field(default_factory=list)  # the first usable rows, as dicts
    char_counts: np.ndarray | None = None  # code point counts of the used texts (lowercased as the vocabulary is)


class ListWriter:
    """`StoreWriter`'s interface, in memory: small data and tests need no folder."""

    def __init__(self):
        self.texts: list[str] = []

    def add(self, texts) -> None:
        self.texts.extend(texts)

    def close(self) -> pl.Series:
        return pl.Series(self.texts, dtype=pl.String)


class Numbering:
    """Ids for texts in order of first appearance; each new text is handed to ``writer`` once.

    Texts are recognised by two 64-bit hashes (Polars', the same in every process of one installation, so the
    processes of a torchrun job agree on every id). Known hashes live in arrays sorted by the first."""

    def __init__(self, writer):
        self.writer, self.n = writer, 0
        self.h1 = np.zeros(0, np.uint64)
        self.h2 = np.zeros(0, np.uint64)
        self.ids = np.zeros(0, np.int64)

    def __call__(self, texts: pl.Series) -> np.ndarray:
        key = np.empty(len(texts), dtype=[("a", "<u8"), ("b", "<u8")])
        key["a"], key["b"] = texts.hash(SEEDS[0]).to_numpy(), texts.hash(SEEDS[1]).to_numpy()
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        found = self.known(uniq["a"], uniq["b"])
        new = np.flatnonzero(found < 0)  # ascending in (a, b)
        by_appearance = new[np.argsort(first[new], kind="stable")]
        found[by_appearance] = self.n + np.arange(len(new))
        self.writer.add(texts.gather(first[by_appearance]).to_list())
        self.n += len(new)
        at = np.searchsorted(self.h1, uniq["a"][new])
        self.h1 = np.insert(self.h1, at, uniq["a"][new])
        self.h2 = np.insert(self.h2, at, uniq["b"][new])
        self.ids = np.insert(self.ids, at, found[new])
        return found[inverse.reshape(-1)]

    def known(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The id of each (a, b) seen before, else -1."""
        lo, hi = np.searchsorted(self.h1, a, "left"), np.searchsorted(self.h1, a, "right")
        out = np.full(len(a), -1, np.int64)
        one = np.flatnonzero(hi - lo == 1)
        hit = one[self.h2[lo[one]] == b[one]]
        out[hit] = self.ids[lo[hit]]
        for j in np.flatnonzero(hi - lo > 1):  # texts sharing a first hash: compare the second one by one
            m = np.flatnonzero(self.h2[lo[j]:hi[j]] == b[j])
            if m.size:
                out[j] = self.ids[lo[j] + m[0]]
        return out


def parquet_slices(p: Path, cols: tuple[str, str, str], rows: int):
    """(offset, frame) slices of a Parquet file's wanted columns; the file's problems as DataError."""
    schema = parquet_schema(p)
    for col in cols[:2]:
        if col not in schema:
            raise missing_column_error(p, col, schema)
    offset = 0
    try:
        for frame in pl.scan_parquet(p).select([c for c in cols if c in schema]).collect_batches(chunk_size=rows):
            yield offset, frame
            offset += frame.height
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read Parquet data ({first_line(exc)})") from None


def read_pairs_rows(path, cols: tuple[str, str, str] = ("query", "document", "label"), folder: Path | None = None,
                    lowercase: bool | None = None, rows: int = CHUNK_ROWS) -> PairRows:
    """Read a pairs file for training. ``folder``: where the distinct texts are written (None: kept in memory).
    ``lowercase``: count characters for a vocabulary (None: don't count)."""
    p = check_file(path)
    if file_format(p) == "parquet":
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        return number_rows(p, parquet_slices(p, cols, rows), cols, lambda r: f"row {r + 1}", folder, lowercase,
                           normalised=False)
    text = TextSlices(p, file_format(p), list(cols))
    where = (lambda r: f"line {r + text.line_offset}") if text.line_offset else (lambda r: f"row {r + 1}")
    return number_rows(p, text, cols, where, folder, lowercase, normalised=False)


def rows_in_memory(df: pl.DataFrame, lowercase: bool | None = None) -> PairRows:
    """`read_pairs_rows` for a frame already read (query, document, label columns, normalised)."""
    return number_rows(Path("<frame>"), [(0, df)], ("query", "document", "label"), lambda r: f"row {r + 1}", None,
                       lowercase, normalised=True)


def number_rows(p: Path, slices, cols, where, folder, lowercase, normalised: bool) -> PairRows:
    writers = (StoreWriter(folder, "queries"), StoreWriter(folder, "documents")) if folder else \
        (ListWriter(), ListWriter())
    number_q, number_d = Numbering(writers[0]), Numbering(writers[1])
    counts = np.zeros(MAX_CODEPOINT + 1, np.int64) if lowercase is not None else None
    qids, dids, labels, examples = [], [], [], []
    total = dropped = n_bad = 0
    first_bad = None
    for offset, frame in slices:
        total += frame.height
        if normalised:
            df = frame
        else:
            df, raw = pairs_frame(frame, p, *cols)
            if raw is not None:
                k, bad = bad_labels(df["label"], raw, 1)
                if k and first_bad is None:
                    first_bad = (offset + bad[0][0], bad[0][1])
                n_bad += k
        if n_bad:  # the rest is only counted, for the message
            continue
        usable = df.filter(usable_rows())
        dropped += df.height - usable.height
        if not usable.height:
            continue
        if counts is not None:
            for col in ("query", "document"):
                counts += codepoint_counts(prepare(usable[col], lowercase))
        qids.append(number_q(usable["query"]))
        dids.append(number_d(usable["document"]))
        labels.append(usable["label"].to_numpy().astype(np.int8))
        examples.extend(usable.head(EXAMPLES - len(examples)).to_dicts())
    if n_bad:
        raise label_error(p, n_bad, where(first_bad[0]), first_bad[1])
    if total == 0:
        raise DataError(f"{p}: no rows")
    label = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    if not (label == 1).any():
        raise no_positives_error(p)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return PairRows(p, writers[0].close(), writers[1].close(), cat(qids), cat(dids), label, total, dropped,
                    examples, counts)


def sorted_numbering(rows: PairRows) -> PairRows:
    """Renumber texts in sorted order (held in memory): how runs saved before first-appearance numbering
    numbered them, so that such a run resumes on the same split and order."""
    out = {}
    for name, ids in (("queries", rows.qid), ("documents", rows.did)):
        texts = pl.Series(getattr(rows, name).to_list(), dtype=pl.String)
        order = texts.arg_sort().to_numpy()
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        out[name] = (texts.gather(order), rank[ids].astype(np.int64))
    return PairRows(rows.path, out["queries"][0], out["documents"][0], out["queries"][1], out["documents"][1],
                    rows.label, rows.rows, rows.dropped, rows.examples, rows.char_counts)

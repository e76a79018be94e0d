"""A text pairs file (TSV, CSV, JSON lines) read for training in slices of whole records, so that memory holds a
slice, not the file: read whole, a TSV took its text, a string per line and a frame at once.

Each slice is parsed by the reader that parses a whole file (`data.pairs`), with the file's first line in front of
it (the header, or for a TSV without one the line that sets the number of fields), so a slice's columns, types and
messages are those of the file read whole; the line numbers in messages are the file's.

A record ends at a line break outside double quotes. In JSON lines and the plain TSV (no quoting) every line break
ends one. In CSV and quoted TSV a quoted field may hold line breaks: a slice ends only at a break after an even
number of quote characters (a quoted field's own quotes are doubled, so the count is even between fields).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from twotower_cli.data.pairs import (
    TEXT_FORMATS,
    decode,
    first_line,
    missing_column_error,
    read_tsv,
    tsv_quotes,
)
from twotower_cli.errors import DataError

SLICE_BYTES = 32 << 20
HEAD_BYTES = 1 << 20  # read first, to find the header and whether fields are quoted


def record_end(data: bytes, quoted: bool) -> int:
    """Where the last whole record of ``data`` ends (0: none yet); ``data`` starts at a record."""
    if not quoted:
        return data.rfind(b"\n") + 1
    a = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero(a == 10)
    outside = breaks[np.searchsorted(np.flatnonzero(a == 34), breaks) % 2 == 0]
    return int(outside[-1]) + 1 if len(outside) else 0


def byte_slices(p: Path, quoted: bool, size: int):
    """(the file's number of its first line, bytes) of consecutive slices of whole records, about ``size`` each."""
    with open(p, "rb") as f:
        line, rest = 1, b""
        while True:
            block = f.read(size)
            data = rest + block if rest else block
            if not block:
                if data:
                    yield line, data
                return
            cut = record_end(data, quoted)
            if cut:
                yield line, data[:cut]
                line += data.count(b"\n", 0, cut)
            rest = data[cut:]


class TextSlices:
    """(row offset, frame as read) for each slice of a text pairs file; ``line_offset``: a row's line is its index
    plus this (0 for JSON lines, whose messages name rows)."""

    def __init__(self, p: Path, fmt: str, wanted: list[str], size: int | None = None):
        self.p, self.fmt, self.wanted, self.size = p, fmt, wanted, size or SLICE_BYTES
        self.sep = TEXT_FORMATS.get(p.suffix.lower(), "\t")
        with open(p, "rb") as f:  # whole lines: 1,000 of them (what `tsv_quotes` looks at) or about HEAD_BYTES
            raw, n = [], 0
            for ln in f:
                raw.append(ln)
                n += len(ln)
                if len(raw) >= 1000 or n >= HEAD_BYTES:
                    break
        head = decode(p, b"".join(raw))
        lines = head.split("\n")
        if not head.strip("\n"):
            sep = repr(self.sep)
            raise DataError(f"{p}: file is empty" + ("" if fmt == "jsonl" else
                                                      f"; expected rows of query{sep}document{sep}label"))
        self.first = lines[0]
        names = [f.strip('"') for f in self.first.split(self.sep)]
        self.header = fmt == "csv" or (fmt == "tsv" and wanted[0] in names and wanted[1] in names)
        if self.header:
            dup = sorted({c for c in names if names.count(c) > 1})
            if dup:
                raise DataError(f"{p}: the header names column '{dup[0]}' twice; rename one of them")
        self.quoted = fmt == "csv" or (fmt == "tsv" and tsv_quotes(lines))
        self.line_offset = 0 if fmt == "jsonl" else 2 if self.header else 1
        self.columns: list[str] | None = None

    def __iter__(self):
        rows = 0
        for line, data in byte_slices(self.p, self.quoted, self.size):
            frame = self.parse(decode(self.p, data, line), line)
            frame = self.same_columns(frame, rows)
            yield rows, frame
            rows += frame.height

    def parse(self, text: str, line: int) -> pl.DataFrame:
        p = self.p
        if self.fmt == "jsonl":
            try:
                return pl.read_ndjson(text.encode(), infer_schema_length=None)
            except Exception as exc:
                raise DataError(f"{p}: cannot parse as JSON lines ({first_line(exc)}); one JSON object per "
                                "line") from None
        if line > 1:  # the file's first line in front: the header, or the line that sets a TSV's width
            text = self.first + "\n" + text
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        if self.fmt == "csv":
            if len(lines) < 2:  # CSV always starts with a header
                raise DataError(f"{p}: has a header but no rows")
            try:
                return pl.read_csv(text.encode(), infer_schema=False, raise_if_empty=True)
            except (pl.exceptions.PolarsError, ValueError) as exc:
                raise DataError(f"{p}: cannot parse as CSV ({first_line(exc)})") from None
        first = [f.strip('"') for f in lines[0].split("\t")]
        df, _ = read_tsv(p, text, lines, first, self.header, self.wanted, self.quoted, line - (line > 1))
        return df if self.header or line == 1 else df.slice(1)  # without a header the first line is a row

    def same_columns(self, frame: pl.DataFrame, rows: int) -> pl.DataFrame:
        """The first slice's wanted columns in every slice (JSON lines may drop a key: its values are missing)."""
        have = [c for c in self.wanted if c in frame.columns]
        if self.columns is None:
            for col in self.wanted[:2]:
                if col not in frame.columns:
                    raise missing_column_error(self.p, col, frame.columns)
            self.columns = have
            return frame.select(have)
        extra = [c for c in have if c not in self.columns]
        if extra:
            raise DataError(f"{self.p}: column '{extra[0]}' first appears after row {rows}; give every row the "
                            "same keys (or none of them that one)")
        return frame.with_columns([pl.lit(None, pl.String).alias(c) for c in self.columns if c not in have]) \
            .select(self.columns)

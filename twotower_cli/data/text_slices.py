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
    fields,
    has_header,
    missing_column_error,
    parse_csv,
    parse_jsonl,
    read_quoted_tsv,
    read_tsv,
    tsv_quotes,
)
from twotower_cli.errors import DataError

SLICE_BYTES = 32 << 20
BOM = b"\xef\xbb\xbf"
HEAD_LINES = 1000  # read first: the header, and whether a TSV quotes fields (`tsv_quotes` looks at as many)


def record_ends(data: bytes, quoted: bool) -> np.ndarray:
    """Where each whole record of ``data`` ends (the position after its line break); ``data`` starts at a
    record."""
    a = np.frombuffer(data, np.uint8)
    breaks = np.flatnonzero(a == 10)
    if quoted:
        breaks = breaks[np.searchsorted(np.flatnonzero(a == 34), breaks) % 2 == 0]
    return breaks + 1


def record_end(data: bytes, quoted: bool) -> int:
    """Where the last whole record of ``data`` ends (0: none yet)."""
    if not quoted:
        return data.rfind(b"\n") + 1
    ends = record_ends(data, quoted)
    return int(ends[-1]) if len(ends) else 0


def byte_slices(p: Path, quoted: bool, size: int, first: int = 0):
    """(the file's number of its first line, bytes) of consecutive slices of whole records, about ``size`` each.
    The first slice goes past byte ``first`` (the end of the header: a slice is never the header alone)."""
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
            if cut > (first if line == 1 else 0):
                yield line, data[:cut]
                line += data.count(b"\n", 0, cut)
                data = data[cut:]
            rest = data


class TextSlices:
    """(row offset, frame as read) for each slice of a text pairs file; ``line_offset``: a row's line is its index
    plus this (0 for JSON lines, whose messages name rows).

    Where the slices may still differ from the whole file: the first problem in the file's order is the one
    reported (the whole file reported a UTF-8 error anywhere before any other); JSON lines' types are inferred per
    slice (a column of 1 and 2.5 reads "1" and "2.5", not "1.0" and "2.5"; a slice whose values of a column are all
    lists or objects is an error where the whole file, mixing them with text, read them as text)."""

    def __init__(self, p: Path, fmt: str, wanted: list[str], size: int | None = None, header: bool | None = None):
        """``wanted``: the columns kept (the first two required), unless `keep` names them before reading: then
        every slice has those (nulls where a JSON-lines slice lacks one);
        ``header``: whether a TSV has a header line (None: when its first line names the first two wanted)."""
        self.p, self.fmt, self.wanted, self.size = p, fmt, wanted, size or SLICE_BYTES
        self.sep = TEXT_FORMATS.get(p.suffix.lower(), "\t")
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        with open(p, "rb") as f:
            raw = b"".join(ln for _, ln in zip(range(HEAD_LINES), f))
        head = decode(p, raw)
        if not head and fmt != "jsonl":  # a byte-order mark alone
            raise DataError(f"{p}: file is empty; expected rows of query{self.sep!r}document{self.sep!r}label")
        lines = head.split("\n")
        named = fmt != "jsonl" and (has_header(p, fields(lines[0], self.sep), wanted) if header is None else header)
        self.header = fmt == "csv" or (fmt == "tsv" and named)
        self.quoted = fmt == "csv" or (fmt == "tsv" and tsv_quotes(lines))
        # the first record: put in front of every later slice (a header, or the row that sets a TSV's width)
        ends = record_ends(raw, self.quoted)
        k = 0
        if fmt == "csv":  # Polars skips the empty lines before a CSV's header: its first record is the header
            while k + 1 < len(ends) and not raw[ends[k - 1] if k else 0:ends[k]].lstrip(BOM).strip(b"\r\n"):
                k += 1
        start = int(ends[k - 1]) if k else 0
        self.first_end = int(ends[k]) if len(ends) else len(raw)
        self.first = decode(p, raw[start:self.first_end], k + 1).removesuffix("\n")
        self.line_offset = 0 if fmt == "jsonl" else 2 if self.header else 1
        self.columns: list[str] | None = None
        self.fixed = False  # columns set by the caller
        self.plain = False  # a quoted TSV some slice of which does not parse with quoting: read a line a row

    def keep(self, columns: list[str]) -> None:
        """Every slice read from now on has exactly these columns."""
        self.columns, self.fixed = columns, True

    def slices(self):
        return byte_slices(self.p, self.quoted, self.size, self.first_end if self.header else 0)

    def quotes_hold(self) -> bool:
        """Whether every slice of a quoted TSV parses with quoting. The whole file is read a line a row when it
        does not, so it is checked first (Polars parses a 32 MB slice in well under a second)."""
        for line, data in self.slices():
            if read_quoted_tsv(self.with_first(decode(self.p, data, line), line)[0], self.header, self.wanted) is None:
                return False
        return True

    def with_first(self, text: str, line: int) -> tuple[str, int]:
        """A slice's text with the file's first record in front (the header, or the row that sets a TSV's width),
        and that record's number of lines (0 for the first slice, which starts with it)."""
        if line == 1:
            return text, 0
        return self.first + "\n" + text, self.first.count("\n") + 1

    def __iter__(self):
        for rows, frame in self.parsed():
            yield rows, self.same_columns(frame, rows)

    def parsed(self):
        """(row offset, frame) of each slice with the columns it has (a JSON-lines slice: its keys)."""
        if self.fmt == "tsv" and self.quoted:  # (an unclosed quote makes a slice of what follows it, at any size)
            self.plain = not self.quotes_hold()
        rows = 0
        for line, data in self.slices():
            text = decode(self.p, data, line)
            if self.fmt == "jsonl" and not text.strip():  # blank lines only: no rows (as in the whole file)
                continue
            frame = self.parse(text, line)
            yield rows, frame
            rows += frame.height

    def parse(self, text: str, line: int) -> pl.DataFrame:
        if self.fmt == "jsonl":
            return parse_jsonl(self.p, text)
        text, ahead = self.with_first(text, line)
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        if self.fmt == "csv":
            return parse_csv(self.p, text, lines)
        if self.quoted and not self.plain:  # `quotes_hold`: every slice parses with quoting
            df = read_quoted_tsv(text, self.header, self.wanted)
        else:
            df, _ = read_tsv(self.p, text, lines, fields(lines[0], "\t"), self.header, self.wanted, False,
                             line - ahead if ahead else 1)
        return df if self.header or not ahead else df.slice(1)  # without a header the first record is a row

    def same_columns(self, frame: pl.DataFrame, rows: int) -> pl.DataFrame:
        """The first slice's wanted columns in every slice (JSON lines may drop a key: its values are missing)."""
        have = [c for c in self.wanted if c in frame.columns]
        if self.fixed:
            return frame.with_columns([pl.lit(None, pl.String).alias(c) for c in self.columns
                                       if c not in frame.columns]).select(self.columns)
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

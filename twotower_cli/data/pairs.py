"""Reading pairs files (TSV, CSV, Parquet, JSONL) into one Polars frame: query, document, label.

Every reader ends in the same shape, so every command sees the same data. Text is NFKC-normalised.
Problems the user can fix raise DataError naming the file (and line or column).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from twotower_cli.errors import DataError

TEXT_FORMATS = {".tsv": "\t", ".tab": "\t", ".txt": "\t", ".csv": ","}
PARQUET = {".parquet", ".pq"}
JSONL = {".jsonl", ".ndjson"}
TRUE_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}


@dataclass
class Pairs:
    """The loaded pairs. ``label`` is Int8 (1/0), null where the file's value was not a valid label."""

    df: pl.DataFrame
    path: Path
    has_label: bool
    line_offset: int = 0  # add to a 0-based row index to get the file's line number (0 for Parquet/JSONL)
    bad_labels: list[tuple[int, str]] = field(default_factory=list)  # (row, raw value), first few
    n_bad_labels: int = 0

    def where(self, row: int) -> str:
        return f"line {row + self.line_offset}" if self.line_offset else f"row {row + 1}"


def check_file(path: str | os.PathLike, expected: str = "a pairs file (.tsv, .csv, .parquet, .jsonl)") -> Path:
    """Fail with a clear message for paths that cannot be read as a file (``expected``: what a folder is not)."""
    import stat

    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DataError(f"{p}: dangling symbolic link (its target {os.readlink(p)} does not exist)")
    if not p.exists():
        raise DataError(f"{p}: file not found; check the path")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected {expected}")
    if not stat.S_ISREG(p.stat().st_mode):
        raise DataError(f"{p}: is not a regular file (a pipe, a device or a socket); save the data to a file first")
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: permission denied; make the file readable (chmod +r)")
    return p


def file_format(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in PARQUET:
        return "parquet"
    if suffix in JSONL:
        return "jsonl"
    if suffix in TEXT_FORMATS:
        return "csv" if suffix == ".csv" else "tsv"
    raise DataError(f"{p}: unknown file type '{suffix}'; use .tsv, .csv, .parquet or .jsonl")


def read_text(p: Path) -> str:
    return decode(p, p.read_bytes())


def decode(p: Path, data: bytes, line: int = 1) -> str:
    """UTF-8 text (a byte-order mark dropped, CRLF as LF) of ``data``, the file's bytes from line ``line`` on."""
    if line == 1 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line += data.count(b"\n", 0, exc.start)
        raise DataError(f"{p}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "re-encode the file as UTF-8") from None
    return text.replace("\r\n", "\n")


def read_lines(p: Path, sep: str, empty_hint: str = "") -> tuple[str, list[str], list[str]]:
    """A delimited file's text, its lines (less a final empty one) and its first line's fields, unquoted; an
    empty file is an error (``empty_hint`` says what was expected)."""
    text = read_text(p)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{p}: file is empty{empty_hint}")
    return text, lines, fields(lines[0], sep)


def fields(line: str, sep: str) -> list[str]:
    """A line's fields, unquoted: what a header line names."""
    return [f.strip('"') for f in line.split(sep)]


def has_header(p: Path, first: list[str], wanted: list[str]) -> bool:
    """Whether the first line's fields name the wanted query and document columns; naming a column twice is an
    error then."""
    if not (wanted[0] in first and wanted[1] in first):
        return False
    dup = sorted({c for c in first if first.count(c) > 1})
    if dup:
        raise DataError(f"{p}: the header names column '{dup[0]}' twice; rename one of them")
    return True


def parse_csv(p: Path, text: str, lines: list[str]) -> pl.DataFrame:
    """A CSV's text (``lines``: its lines, less a final empty one), every column as text."""
    if len(lines) < 2:  # CSV always starts with a header; missing columns are reported by the caller
        raise DataError(f"{p}: has a header but no rows")
    try:
        return pl.read_csv(text.encode(), infer_schema=False, raise_if_empty=True)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise DataError(f"{p}: cannot parse as CSV ({first_line(exc)})") from None


def parse_jsonl(p: Path, text: str) -> pl.DataFrame:
    try:
        return pl.read_ndjson(text.encode(), infer_schema_length=None)
    except Exception as exc:
        raise DataError(f"{p}: cannot parse as JSON lines ({first_line(exc)}); one JSON object per line") from None


def read_delimited(p: Path, sep: str, wanted: list[str]) -> tuple[pl.DataFrame, int]:
    """Read TSV/CSV; a header is detected from the wanted column names. Returns (frame, line offset)."""
    text, lines, first = read_lines(p, sep, f"; expected rows of query{sep!r}document{sep!r}label")
    header = has_header(p, first, wanted)
    if sep == "\t":
        return read_tsv(p, text, lines, first, header, wanted)
    return parse_csv(p, text, lines), 2


def tsv_quotes(lines: list[str]) -> bool:
    """Whether a TSV quotes fields: one of its first 1,000 lines has a field starting with a double quote."""
    return any(f.startswith('"') for ln in lines[: 1000] for f in ln.split("\t"))


def read_quoted_tsv(text: str, has_header: bool, wanted: list[str]) -> pl.DataFrame | None:
    """A TSV read with double-quoted fields, or None where it does not parse so (or gives no usable columns)."""
    try:
        df = pl.read_csv(text.encode(), separator="\t", has_header=has_header, infer_schema=False,
                         quote_char='"', raise_if_empty=True)
    except (pl.exceptions.PolarsError, ValueError):
        return None
    if has_header:
        return df
    if df.width not in (2, 3):
        return None
    df.columns = ["query", "document", "label"][: df.width]
    return df.rename({"query": wanted[0], "document": wanted[1]} | ({"label": wanted[2]} if df.width == 3 else {}))


def read_tsv(p: Path, text: str, lines: list[str], first: list[str], has_header: bool, wanted: list[str],
             quoted: bool | None = None, base: int = 1):
    """Plain TSV (a line a row, no quoting: the original exercise's format), or standard quoted TSV (as Polars and
    spreadsheets write
    it: fields with tabs, quotes or line breaks in double quotes). The plain reading is tried first; a file that
    quotes fields (``quoted``; None: `tsv_quotes`), or that only parses with quoting, is read with Polars; the
    line scan words errors precisely. ``base``: the file's number of ``lines[0]`` (a slice of a file)."""
    width = len(first)
    bad_line = next((i for i, ln in enumerate(lines) if ln.count("\t") + 1 != width), None)
    quoted = tsv_quotes(lines) if quoted is None else quoted
    if quoted:  # only a file that quotes fields is read with quoting (a plain ragged line is an error below)
        df = read_quoted_tsv(text, has_header, wanted)
        if df is not None:
            return df, (2 if has_header else 1)
    if not has_header and width not in (2, 3):
        raise DataError(f"{p}: line 1 has {width} tab-separated fields; expected query<TAB>document"
                        "[<TAB>label] or a header naming the columns")
    if bad_line is not None:
        n = lines[bad_line].count("\t") + 1
        raise DataError(f"{p}: line {bad_line + base} has {n} tab-separated fields, expected {width}; fix that line "
                        "(a tab inside a text must be removed, or the field put in double quotes)")
    names = first if has_header else ["query", "document", "label"][:width]
    body = lines[1:] if has_header else lines
    if has_header and not body:
        raise DataError(f"{p}: has a header but no rows")
    cols = list(zip(*[ln.split("\t") for ln in body])) if body else [() for _ in names]
    df = pl.DataFrame({n: pl.Series(n, list(c), dtype=pl.String) for n, c in zip(names, cols)})
    if not has_header:
        df = df.rename({"query": wanted[0], "document": wanted[1]} | ({"label": wanted[2]} if width == 3 else {}))
    return df, (2 if has_header else 1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def parquet_schema(p: Path) -> dict:
    """A Parquet file's columns and types, from its footer only; a broken file is a DataError."""
    try:
        return pl.read_parquet_schema(p)
    except Exception as exc:  # polars raises several kinds for a broken footer
        raise DataError(f"{p}: not a readable Parquet file ({first_line(exc)}); "
                        "it may be truncated or not Parquet at all") from None


def missing_column_error(p: Path, col: str, found) -> DataError:
    return DataError(f"{p}: missing column '{col}' (found: {', '.join(found) or 'none'}); "
                     "rename it or pass --query-col/--document-col")


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> tuple[pl.DataFrame, int]:
    """Read any supported file. Parquet is scanned lazily, reading only ``columns``."""
    p = check_file(path)
    fmt = file_format(p)
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if fmt == "parquet":
        schema = parquet_schema(p)
        cols = [c for c in (columns or schema) if c in schema]
        try:
            return pl.scan_parquet(p).select(cols).collect(), 0
        except Exception as exc:
            raise DataError(f"{p}: cannot read Parquet data ({first_line(exc)})") from None
    if fmt == "jsonl":
        df = parse_jsonl(p, read_text(p))
        return (df.select([c for c in columns if c in df.columns]) if columns else df), 0
    return read_delimited(p, TEXT_FORMATS[p.suffix.lower()], columns or ["query", "document", "label"])


def as_text(df: pl.DataFrame, col: str, p: Path) -> pl.Series:
    s = df.get_column(col)
    if s.dtype == pl.String:
        return s
    if s.dtype.is_numeric() or s.dtype in (pl.Boolean, pl.Null):  # Null: a JSON column of nulls only
        return s.cast(pl.String)
    raise DataError(f"{p}: column '{col}' has type {s.dtype}, expected text")


def normalise_labels(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Map 0/1/true/false to Int8; anything else becomes null. Returns (labels, raw text)."""
    raw = s.cast(pl.String) if s.dtype != pl.String else s
    if s.dtype == pl.Boolean:
        return s.cast(pl.Int8), raw
    if s.dtype.is_numeric():
        f = s.cast(pl.Float64)
        lab = pl.select(pl.when(f.is_in([0.0, 1.0])).then(f).otherwise(None).cast(pl.Int8)).to_series()
        return lab, raw
    key = raw.str.strip_chars().str.to_lowercase()
    return key.replace_strict(TRUE_WORDS, default=None, return_dtype=pl.Int8), raw


def load_pairs(path: str | os.PathLike, query_col: str = "query", document_col: str = "document",
               label_col: str = "label", require_label: bool = False) -> Pairs:
    p = Path(path)
    df, offset = read_table(p, [query_col, document_col, label_col])
    for col in (query_col, document_col):
        if col not in df.columns:
            raise missing_column_error(p, col, df.columns)
    if df.height == 0:
        raise DataError(f"{p}: no rows")
    has_label = label_col in df.columns
    if require_label and not has_label:
        raise DataError(f"{p}: missing column '{label_col}'; pass --label-col")
    out, raw = pairs_frame(df, p, query_col, document_col, label_col)
    pairs = Pairs(out, p, has_label, offset)
    if raw is not None:
        pairs.n_bad_labels, pairs.bad_labels = bad_labels(out["label"], raw)
    return pairs


def pairs_frame(df: pl.DataFrame, p: Path, query_col: str, document_col: str, label_col: str):
    """A frame as read -> (query, document, label) with NFKC text and Int8 labels (label 1 where the file has
    none); also the labels' raw text (None without labels), for naming bad values."""
    query = as_text(df, query_col, p).str.normalize("NFKC").alias("query")
    document = as_text(df, document_col, p).str.normalize("NFKC").alias("document")
    raw = None
    if label_col in df.columns:
        s = df.get_column(label_col)
        if s.dtype.is_nested() or s.dtype == pl.Struct:
            raise DataError(f"{p}: column '{label_col}' has type {s.dtype}, expected 0/1 labels")
        label, raw = normalise_labels(s)
    else:
        label = pl.Series("label", [1] * df.height, dtype=pl.Int8)
    return pl.DataFrame([query, document, label.alias("label")]), raw


def bad_labels(label: pl.Series, raw: pl.Series, first: int = 5) -> tuple[int, list[tuple[int, str]]]:
    """How many labels are not 0/1, and the first few as (row, raw value)."""
    bad = label.is_null()
    n = int(bad.sum())
    rows = bad.arg_true().head(first).to_list() if n else []
    return n, [(r, "empty" if raw[r] is None or raw[r] == "" else raw[r]) for r in rows]


def usable_rows() -> list[pl.Expr]:
    """Filters for rows training can use: a query and a document with more than white space."""
    return [pl.col(c).str.strip_chars().str.len_chars().fill_null(0) > 0 for c in ("query", "document")]


def label_error(p: Path, n: int, where: str, value: str) -> DataError:
    return DataError(f"{p}: {n} labels are not 0/1 ({where}: {value!r}); "
                     "use 1 for relevant and 0 for negative (true/false also accepted)")


def no_positives_error(p: Path) -> DataError:
    return DataError(f"{p}: no positive pairs (label 1) with a non-empty query and document; "
                     "training needs at least one relevant pair")


def require_trainable(pairs: Pairs) -> pl.DataFrame:
    """The rows training can use; raise for data no model can be trained on."""
    p, df = pairs.path, pairs.df
    if pairs.n_bad_labels:
        r, v = pairs.bad_labels[0]
        raise label_error(p, pairs.n_bad_labels, pairs.where(r), v)
    usable = df.filter(usable_rows())
    if usable.filter(pl.col("label") == 1).height == 0:
        raise no_positives_error(p)
    return usable

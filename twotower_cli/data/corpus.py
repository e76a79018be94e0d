"""Reading corpora (for `index`) and query lists (for `search --queries`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from twotower_cli.data.pairs import (
    as_text,
    check_file,
    decode,
    fields,
    file_format,
    parquet_schema,
    read_lines,
    read_table,
    read_text,
    read_tsv,
)
from twotower_cli.data.text_slices import SLICE_BYTES, TextSlices, byte_slices
from twotower_cli.errors import DataError


def lines_of(path: Path) -> list[str]:
    return [ln for ln in read_text(path).split("\n") if ln.strip()]


def document_column(names: list[str], document_col: str, id_col: str | None, p: Path) -> str:
    """The column holding the documents (``document_col``, else "document" or "text"); checks the id column."""
    col = next((c for c in (document_col, "document", "text") if c in names), None)
    if col is None:
        raise DataError(f"{p}: no column '{document_col}' (found: {', '.join(names)}); pass --document-col")
    if id_col and id_col not in names:
        raise DataError(f"{p}: no id column '{id_col}' (found: {', '.join(names)})")
    return col


def read_tsv_table(p: Path, header_names: tuple[str, ...]) -> tuple[pl.DataFrame, bool]:
    """A TSV corpus or query file: with a header when its first line names one of ``header_names``; without one,
    one text a line, or the pairs layout (query<TAB>document[<TAB>label]). Returns (frame, has header)."""
    text, lines, first = read_lines(p, "\t")
    header = any(name in first for name in header_names)
    if not header and all("\t" not in ln for ln in lines):
        return pl.DataFrame({"text": lines}), False
    df, _ = read_tsv(p, text, lines, first, header, ["query", "document", "label"])
    return df, header


def read_corpus(path, document_col: str = "document", id_col: str | None = None) -> tuple[pl.Series, list | None]:
    """Documents (and ids) of a corpus file. A headerless TSV of pairs gives its documents (second column)."""
    p = check_file(path)
    if p.suffix.lower() == ".txt":
        no_columns(p, id_col)
        docs = lines_of(p)
        if not docs:
            raise DataError(f"{p}: no documents (one document per line expected)")
        return pl.Series("document", docs).str.normalize("NFKC"), None
    if p.suffix.lower() in (".tsv", ".tab"):
        df, header = read_tsv_table(p, (document_col, "document", "text"))
        if not header:
            no_header(p, id_col)
    else:
        df, _ = read_table(p, corpus_columns(document_col, id_col))
    document_col = document_column(df.columns, document_col, id_col, p)
    docs = as_text(df, document_col, p).fill_null("").str.normalize("NFKC")
    ids = id_texts(df, id_col, p)
    if len(docs) == 0:
        raise DataError(f"{p}: no documents")
    return docs, ids


def corpus_chunks(path, document_col: str = "document", id_col: str | None = None, rows: int = 65536):
    """(total rows, iterator of (documents, ids)). Parquet is read a slice at a time, so indexing a corpus
    larger than memory holds one chunk of text; so is a text file larger than a slice (32 MB: `text_corpus`); a
    smaller one is read whole, then cut into chunks."""
    p = check_file(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        parquet_schema(p)  # the footer only: a clear message for a broken file, no data read
        lazy = pl.scan_parquet(p)
        col = document_column(lazy.collect_schema().names(), document_col, id_col, p)
        total = lazy.select(pl.len()).collect().item()
        if total == 0:
            raise DataError(f"{p}: no documents")

        def parquet_chunks():
            for start in range(0, total, rows):
                part = lazy.slice(start, rows).select([col] + ([id_col] if id_col else [])).collect()
                docs = as_text(part, col, p).fill_null("").str.normalize("NFKC")
                yield docs, id_texts(part, id_col, p, start)

        return total, parquet_chunks()
    if read_in_slices(p):
        total, slices = text_corpus(p, document_col, id_col, SLICE_BYTES)
        return total, rechunk(slices(), rows)
    docs, ids = read_corpus(p, document_col, id_col)

    def memory_chunks():
        for start in range(0, len(docs), rows):
            yield docs.slice(start, rows), (ids[start:start + rows] if ids is not None else None)

    return len(docs), memory_chunks()


def read_in_slices(p: Path) -> bool:
    """Whether `corpus_chunks` reads this corpus in slices of whole records (a text file larger than one)."""
    return p.suffix.lower() in (".txt", ".tsv", ".tab", ".csv", ".jsonl", ".ndjson") and p.is_file() and \
        p.stat().st_size > SLICE_BYTES


def text_corpus(p: Path, document_col: str, id_col: str | None, size: int | None = None):
    """(documents, a function giving the (documents, ids) of each slice) of a text corpus read in slices of
    whole records (`data.text_slices`), as `read_corpus` reads it whole. Every slice is parsed once to count
    the documents, so a problem anywhere in the file is reported before any is embedded."""
    suffix = p.suffix.lower()
    if suffix == ".txt":
        no_columns(p, id_col)
        return counted(lambda: line_slices(p, size, skip_blank=True),
                       f"{p}: no documents (one document per line expected)")
    wanted = corpus_columns(document_col, id_col)
    if suffix in (".tsv", ".tab"):
        with open(p, "rb") as f:
            first = fields(decode(p, f.readline()).removesuffix("\n"), "\t")
        header = any(name in first for name in (document_col, "document", "text"))
        if not header:
            no_header(p, id_col)
        if not header and not has_byte(p, b"\t"):  # one text a line (blank ones too, as read whole)
            return counted(lambda: line_slices(p, size, skip_blank=False), f"{p}: file is empty")
        table = TextSlices(p, "tsv", wanted if header else ["query", "document", "label"], size, header=header)
    else:
        table = TextSlices(p, file_format(p), wanted, size)
    # the counting pass also finds the columns: a JSON-lines key may first appear in any slice (read whole, the
    # file's columns are every key of every line)
    seen, total, no_id = {}, 0, None
    for rows, frame in table.parsed():
        seen.update(dict.fromkeys(frame.columns))
        if id_col and no_id is None and frame.height:  # (a JSON-lines slice may lack the key: no ids there)
            missing = frame[id_col].is_null() if id_col in frame.columns else pl.Series([True])
            no_id = rows + int(missing.arg_true()[0]) if missing.any() else None
        total += frame.height
    found = [c for c in table.wanted if c in seen] if table.fmt == "jsonl" else list(seen)  # as read whole
    col = document_column(found, document_col, id_col, p)
    if no_id is not None:
        raise missing_id(p, id_col, no_id)
    table.keep(corpus_columns(col, id_col, others=()))
    if total == 0:
        raise DataError(f"{p}: no documents")

    def frames():
        for rows, frame in table:
            yield as_text(frame, col, p).fill_null("").str.normalize("NFKC"), id_texts(frame, id_col, p, rows)

    return total, frames


def id_texts(df: pl.DataFrame, id_col: str | None, p: Path, offset: int = 0) -> list | None:
    """The ids of a chunk of documents (``offset``: how many came before it), as text; a missing one is an error."""
    if not id_col:
        return None
    ids = as_text(df, id_col, p)
    if ids.null_count():
        raise missing_id(p, id_col, offset + int(ids.is_null().arg_true()[0]))
    return ids.to_list()


def missing_id(p: Path, id_col: str, row: int) -> DataError:
    return DataError(f"{p}: document {row + 1} has no id (column '{id_col}' is empty or missing there); give every "
                     "document an id, or drop --id-col to number them")


def corpus_columns(document_col: str, id_col: str | None, others=("document", "text")) -> list[str]:
    """The columns a corpus is read for, each once: the documents' (``document_col``, else one of ``others``)
    and the ids'."""
    return list(dict.fromkeys([document_col, *others] + ([id_col] if id_col else [])))


def no_header(p: Path, id_col: str | None) -> None:
    if id_col:
        raise DataError(f"{p}: has no header, so no id column '{id_col}'; add a header line or drop --id-col")


def no_columns(p: Path, id_col: str | None) -> None:
    if id_col:
        raise DataError(f"{p}: a .txt corpus is a document a line, with no id column '{id_col}'; use a table with "
                        "an id column (.tsv, .csv, .jsonl, .parquet), or drop --id-col")


def line_slices(p: Path, size: int | None, skip_blank: bool):
    """A text file's lines as documents, a slice at a time (a final line break ends the last one)."""
    for line, data in byte_slices(p, False, size or SLICE_BYTES):
        lines = decode(p, data, line).split("\n")
        if lines[-1] == "":  # after the final line break (or a byte-order mark alone)
            lines.pop()
        docs = [ln for ln in lines if ln.strip()] if skip_blank else lines
        yield pl.Series("document", docs, dtype=pl.String).str.normalize("NFKC"), None


def has_byte(p: Path, byte: bytes, block: int = 1 << 24) -> bool:
    with open(p, "rb") as f:
        return any(byte in data for data in iter(lambda: f.read(block), b""))


def counted(slices, empty: str):
    total = sum(len(docs) for docs, _ in slices())
    if total == 0:
        raise DataError(empty)
    return total, slices


def rechunk(slices, rows: int):
    """(documents, ids) of at most ``rows`` documents each, from slices of any size."""
    for docs, ids in slices:
        for start in range(0, len(docs), rows):
            yield docs.slice(start, rows), (ids[start:start + rows] if ids is not None else None)


def read_queries(path) -> list[str]:
    """Queries from a file, or from standard input for '-': one a line (.txt, stdin, a headerless TSV's first
    field), or the 'query'/'text' column of a table. NUL bytes become U+FFFD; blank lines are skipped."""
    import sys

    if str(path) == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise DataError(f"standard input: line {line} is not valid UTF-8; re-encode it as UTF-8") from None
        return [ln.replace("\x00", "\ufffd") for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    p = check_file(path, "a queries file (.txt, one a line; a table with a 'query' or 'text' column; or - for "
                         "standard input)")
    if p.suffix.lower() == ".txt":
        queries = [ln.replace("\x00", "\ufffd") for ln in lines_of(p)]
    else:
        if p.suffix.lower() in (".tsv", ".tab"):
            df, _ = read_tsv_table(p, ("query", "text"))
        else:
            df, _ = read_table(p, ["query", "text"])
        col = next((c for c in ("query", "text") if c in df.columns), None)
        if col is None:
            raise DataError(f"{p}: no 'query' or 'text' column (found: {', '.join(df.columns)})")
        queries = [q.replace("\x00", "\ufffd") for q in as_text(df, col, p).fill_null("").to_list()]
    if not any(q.strip() for q in queries):
        raise DataError(f"{p}: holds no queries (it is empty or blank); give one query a line")
    return queries

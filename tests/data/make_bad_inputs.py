"""Write the bad-input corpus into tests/data/bad/: what pipelines really produce, each a clear error or a warning.

    python tests/data/make_bad_inputs.py [OUT_DIR]

Small files are committed; the large one (a 10 MB field) and the ones git cannot hold (no read permission, a
dangling symlink) are made by this script, which the tests call into a temporary folder.
Each entry: (file name, expected outcome for `train`: "error" or "ok", a phrase the message must contain).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import polars as pl

GOOD = "".join(f"package manager {i}\tThe apt package manager number {i} installs software.\t1\n" for i in range(4))


def cases() -> list[tuple[str, object, str, str]]:
    """(name, content, expected, phrase). content: bytes, a DataFrame (Parquet), or a special marker."""
    big = ("x" * 10_000_000)
    return [
        ("empty.tsv", b"", "error", "empty"),
        ("header_only.tsv", b"query\tdocument\tlabel\n", "error", "no rows"),
        ("header_only.csv", b"query,document,label\n", "error", "no rows"),
        ("wrong_columns.csv", b"question,answer\nq,a\n", "error", "missing column 'query'"),
        ("missing_document.jsonl", b'{"query": "a", "label": 1}\n', "error", "missing column 'document'"),
        ("one_field.tsv", b"just one field\nanother\n", "error", "tab-separated fields"),
        ("four_fields.tsv", b"a\tb\t1\textra\n", "error", "tab-separated fields"),
        ("ragged.tsv", (GOOD + "q\td\n" + GOOD).encode(), "error", "line 5 has 2"),
        ("too_many_fields.tsv", (GOOD + "q\td\t1\tx\n").encode(), "error", "line 5 has 4"),
        ("latin1.tsv", "café\tdocument écrit\t1\n".encode("latin-1"), "error", "not valid UTF-8"),
        ("invalid_utf8_line3.tsv", (GOOD).encode() + b"bad \xff\xfe\tdoc\t1\n", "error", "line 5 is not valid UTF-8"),
        ("nul_bytes.tsv", (GOOD + "nul\x00here\tdoc\x00x\t1\n").encode(), "ok", ""),
        ("huge_field.tsv", ("q\t" + big + "\t1\n" + GOOD).encode(), "ok", ""),
        ("crlf.tsv", (GOOD).replace("\n", "\r\n").encode(), "ok", ""),
        ("bom.tsv", b"\xef\xbb\xbf" + (GOOD).encode(), "ok", ""),
        ("bom_header.csv", b"\xef\xbb\xbfquery,document,label\na,b,1\nc,d,1\ne,f,0\n", "ok", ""),
        ("label_yes.tsv", (GOOD + "q\td\tyes\n").encode(), "error", "'yes'"),
        ("label_2.tsv", (GOOD + "q\td\t2\n").encode(), "error", "'2'"),
        ("label_minus1.tsv", (GOOD + "q\td\t-1\n").encode(), "error", "'-1'"),
        ("label_nan.tsv", (GOOD + "q\td\tNaN\n").encode(), "error", "'NaN'"),
        ("label_empty.tsv", (GOOD + "q\td\t\n").encode(), "error", "'empty'"),
        ("label_float.csv", b"query,document,label\na,b,0.5\n", "error", "not 0/1"),
        ("all_negative.tsv", b"a\tb\t0\nc\td\t0\n", "error", "positive"),
        ("empty_texts.tsv", b"\t\t1\n \t \t1\n", "error", "positive"),
        ("parquet_int_query.parquet", pl.DataFrame({"query": [1, 2], "document": ["a", "b"], "label": [1, 1]}), "ok", ""),
        ("parquet_nested_query.parquet", pl.DataFrame({"query": [["a"], ["b"]], "document": ["a", "b"], "label": [1, 1]}), "error", "expected text"),
        ("parquet_struct_label.parquet", pl.DataFrame({"query": ["a"], "document": ["b"], "label": [{"x": 1}]}), "error", "expected 0/1"),
        ("parquet_string_label.parquet", pl.DataFrame({"query": ["a", "b"], "document": ["c", "d"], "label": ["1", "maybe"]}), "error", "'maybe'"),
        ("parquet_missing_column.parquet", pl.DataFrame({"q": ["a"], "d": ["b"]}), "error", "missing column 'query'"),
        ("truncated.parquet", "TRUNCATED", "error", "not a readable Parquet file"),
        ("not_parquet.parquet", b"this is not parquet at all\n", "error", "not a readable Parquet file"),
        ("bad_json.jsonl", b'{"query": "a", "document": "b"}\n{not json\n', "error", "cannot parse as JSON"),
        ("unknown.xlsx", b"PK\x03\x04", "error", "unknown file type"),
        ("a_directory.tsv", "DIR", "error", "is a directory"),
        ("unreadable.tsv", "NOREAD", "error", "permission denied"),
        ("dangling.tsv", "DANGLING", "error", "dangling symbolic link"),
        ("fifo.tsv", "FIFO", "error", "not a regular file"),
        ("duplicate_header.tsv", b"query\tquery\tdocument\tlabel\nq\tq2\td\t1\n", "error", "names column 'query' twice"),
        ("quoted_multiline.tsv", b'query\tdocument\tlabel\n"two lines"\t"first line\nsecond line"\t1\n'
                                 b'tabbed\t"a\tb"\t1\nplain\tplain text\t1\n', "ok", ""),
        ("two_rows.tsv", "".join(GOOD.splitlines(True)[:2]).encode(), "ok", ""),
    ]


def write_all(out: Path) -> list[tuple[Path, str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, content, expected, phrase in cases():
        path = out / name
        if path.is_symlink() or path.is_file() or path.is_fifo():
            path.unlink()
        if isinstance(content, pl.DataFrame):
            content.write_parquet(path)
        elif content == "TRUNCATED":
            good = out / ".good.parquet"
            pl.DataFrame({"query": ["a"] * 100, "document": ["b"] * 100, "label": [1] * 100}).write_parquet(good)
            path.write_bytes(good.read_bytes()[:-40])
            good.unlink()
        elif content == "DIR":
            path.mkdir(exist_ok=True)
        elif content == "NOREAD":
            path.write_text(GOOD)
            os.chmod(path, 0)
        elif content == "DANGLING":
            os.symlink(out / "does-not-exist.tsv", path)
        elif content == "FIFO":
            os.mkfifo(path)
        else:
            path.write_bytes(content)
        made.append((path, expected, phrase))
    (out / "EXPECTED.json").write_text(json.dumps({n: [e, p] for n, _, e, p in cases()}, indent=1))
    return made


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "bad"
    for p, e, _ in write_all(target):
        print(f"{e:5} {p}")

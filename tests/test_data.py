import polars as pl
import pytest

from tests.conftest import write
from twotower_cli.data.pairs import load_pairs, require_trainable
from twotower_cli.errors import DataError


def test_tsv_without_header_is_the_seeds_format(tmp_path):
    p = write(tmp_path / "a.tsv", "q one\tdoc one\t1\nq two\tdoc two\t0\n")
    pairs = load_pairs(p)
    assert pairs.df.columns == ["query", "document", "label"]
    assert pairs.df["label"].to_list() == [1, 0]


def test_tsv_with_header_and_custom_columns(tmp_path):
    p = write(tmp_path / "a.tsv", "q\td\ty\nhello\tworld\ttrue\nbye\tmoon\tFALSE\n")
    pairs = load_pairs(p, "q", "d", "y")
    assert pairs.df["query"].to_list() == ["hello", "bye"] and pairs.df["label"].to_list() == [1, 0]


def test_two_column_tsv_means_all_positive(tmp_path):
    pairs = load_pairs(write(tmp_path / "a.tsv", "q\tdoc\nq2\tdoc2\n"))
    assert pairs.df["label"].to_list() == [1, 1] and not pairs.has_label


def test_csv_jsonl_parquet_give_the_same_frame(tmp_path):
    df = pl.DataFrame({"query": ["a b", "c"], "document": ["x, y", "z"], "label": [1, 0]})
    df.write_csv(tmp_path / "a.csv")
    df.write_ndjson(tmp_path / "a.jsonl")
    df.write_parquet(tmp_path / "a.parquet")
    frames = [load_pairs(tmp_path / f"a.{ext}").df for ext in ("csv", "jsonl", "parquet")]
    for f in frames:
        assert f.to_dicts() == frames[0].to_dicts()


def test_text_is_nfkc_normalised_and_crlf_bom_handled(tmp_path):
    p = write(tmp_path / "a.tsv", "\ufeffﬁle Ｆｕｌｌ\tdoc\t1\r\nb\tc\t0\r\n".encode())
    pairs = load_pairs(p)
    assert pairs.df["query"][0] == "file Full" and pairs.df["label"][1] == 0


def test_wrong_field_count_names_the_line(tmp_path):
    p = write(tmp_path / "a.tsv", "a\tb\t1\nc\td\t0\te\nf\tg\t1\n")
    with pytest.raises(DataError, match=r"line 2 has 4 tab-separated fields, expected 3"):
        load_pairs(p)


def test_bad_labels_are_reported_with_their_row(tmp_path):
    p = write(tmp_path / "a.tsv", "a\tb\t1\nc\td\tyes\n")
    pairs = load_pairs(p)
    assert pairs.n_bad_labels == 1
    with pytest.raises(DataError, match=r"line 2: 'yes'"):
        require_trainable(pairs)


def test_missing_column_and_missing_file(tmp_path):
    pl.DataFrame({"q": ["a"], "document": ["b"]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"missing column 'query'"):
        load_pairs(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="is a directory"):
        load_pairs(tmp_path)


def test_corrupt_parquet_and_non_utf8(tmp_path):
    write(tmp_path / "bad.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_pairs(tmp_path / "bad.parquet")
    write(tmp_path / "bad.tsv", b"a\tb\t1\n\xff\xfe\tb\t0\n")
    with pytest.raises(DataError, match=r"line 2 is not valid UTF-8"):
        load_pairs(tmp_path / "bad.tsv")


def test_parquet_reads_only_needed_columns(tmp_path):
    pl.DataFrame({"query": ["a"], "document": ["b"], "label": [1], "huge": ["x" * 1000]}).write_parquet(tmp_path / "a.parquet")
    assert load_pairs(tmp_path / "a.parquet").df.columns == ["query", "document", "label"]

"""Training reads its pairs file a slice at a time: texts numbered as they first appear, each written once to a
store on disk. The streamed reading must give what reading the whole file gives."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import SAMPLE, write
from twotower_cli.config import load_config
from twotower_cli.data.pairs import load_pairs, require_trainable
from twotower_cli.data.stream import (
    ListWriter,
    Numbering,
    read_pairs_rows,
    rows_in_memory,
    sorted_numbering,
)
from twotower_cli.data.text_store import StoreWriter
from twotower_cli.data.vocab import Vocab
from twotower_cli.errors import DataError, UsageError
from twotower_cli.training import prepare as prep
from twotower_cli.training.batches import build, from_rows


def sample_df() -> pl.DataFrame:
    return pl.read_parquet(SAMPLE)


def messy_sample(n: int = 400) -> pl.DataFrame:
    """Sample rows with repeats spread over the file, empty texts and NFKC-changing text."""
    df = sample_df().head(n)
    extra = pl.DataFrame({"query": ["ﬁle Ｆｕｌｌ", "  ", "x"], "document": [df["document"][0], "d", ""],
                          "label": [1, 1, 0]})
    return pl.concat([df, extra, df.head(50)])


def test_streamed_parquet_equals_the_whole_file_in_memory(tmp_path):
    path = tmp_path / "p.parquet"
    messy_sample().write_parquet(path, row_group_size=64)
    rows = read_pairs_rows(path, folder=tmp_path / "texts", lowercase=True, rows=37)
    df = require_trainable(load_pairs(path))
    mem = rows_in_memory(df, lowercase=True)
    assert (tmp_path / "texts" / "documents.bin").stat().st_size > 0  # the texts are on disk
    assert rows.queries.to_list() == mem.queries.to_list() == df["query"].unique(maintain_order=True).to_list()
    assert rows.documents.to_list() == df["document"].unique(maintain_order=True).to_list()
    assert np.array_equal(rows.qid, mem.qid) and np.array_equal(rows.did, mem.did)
    assert np.array_equal(rows.label, df["label"].to_numpy())
    q, d = rows.queries.to_list(), rows.documents.to_list()
    assert [q[i] for i in rows.qid] == df["query"].to_list() and [d[i] for i in rows.did] == df["document"].to_list()
    assert "file Full" in q  # normalised as load_pairs normalises
    assert rows.rows == 453 and rows.dropped == 2 and len(rows.examples) == 10
    assert Vocab.from_counts(rows.char_counts).chars == Vocab.build([df["query"], df["document"]]).chars
    # the training set is the same, whichever way it was read and tokenised
    vocab = Vocab.from_counts(rows.char_counts)
    a = from_rows(rows, vocab, 32, 128, 0.1, 3, eager=False)
    b = build(df, vocab, 32, 128, 0.1, 3, eager=True)
    for name in ("pos_q", "pos_d", "neg_ptr", "neg_doc", "val_q", "pos_keys"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.val_qrels == b.val_qrels
    idx = torch.tensor([0, 7, len(d) - 1, 3])
    assert torch.equal(a.d_tokens[idx], b.d_tokens[idx]) and torch.equal(a.q_tokens[2:9], b.q_tokens[2:9])


def test_text_formats_go_through_the_same_numbering(tmp_path):
    df = messy_sample(120)
    df.write_parquet(tmp_path / "p.parquet")
    df.with_columns(pl.col("query").str.replace_all("\t", " "), pl.col("document").str.replace_all("\t", " ")) \
        .write_csv(tmp_path / "p.csv")
    a = read_pairs_rows(tmp_path / "p.parquet", folder=tmp_path / "a", rows=16)
    b = read_pairs_rows(tmp_path / "p.csv", folder=tmp_path / "b", rows=16)
    assert np.array_equal(a.qid, b.qid) and np.array_equal(a.did, b.did) and a.dropped == b.dropped


def test_bad_label_in_a_later_slice_is_named_by_its_row(tmp_path):
    df = sample_df().head(200).with_columns(pl.col("label").cast(pl.String))
    df = df.with_columns(pl.when(pl.int_range(pl.len()).is_in([150, 170])).then(pl.lit("maybe"))
                         .otherwise(pl.col("label")).alias("label"))
    df.write_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError) as err:
        read_pairs_rows(tmp_path / "p.parquet", folder=tmp_path / "t", rows=32)
    assert str(err.value) == (f"{tmp_path / 'p.parquet'}: 2 labels are not 0/1 (row 151: 'maybe'); use 1 for "
                              "relevant and 0 for negative (true/false also accepted)")


@pytest.mark.parametrize("frame, says", [
    (pl.DataFrame({"q": ["a"], "document": ["b"]}), "missing column 'query'"),
    (pl.DataFrame({"query": ["a", "c"], "document": ["b", " "], "label": [0, 1]}), "no positive pairs"),
    (pl.DataFrame({"query": pl.Series([], dtype=pl.String), "document": pl.Series([], dtype=pl.String)}), "no rows"),
])
def test_streamed_parquet_problems_are_data_errors(tmp_path, frame, says):
    frame.write_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=says):
        read_pairs_rows(tmp_path / "p.parquet", folder=tmp_path / "t")


def test_a_truncated_parquet_file_is_a_data_error(tmp_path):
    sample_df().head(100).write_parquet(tmp_path / "p.parquet")
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="Parquet"):
        read_pairs_rows(tmp_path / "p.parquet", folder=tmp_path / "t")


def test_numbering_tells_texts_apart_that_share_a_first_hash():
    n = Numbering(ListWriter())
    # as if three texts had been seen: two of them share their first hash
    n.h1 = np.array([5, 9, 9], np.uint64)
    n.h2 = np.array([1, 2, 3], np.uint64)
    n.ids = np.array([0, 1, 2], np.int64)
    found = n.known(np.array([9, 9, 9, 5, 5, 4], np.uint64), np.array([3, 2, 7, 1, 2, 1], np.uint64))
    assert found.tolist() == [2, 1, -1, 0, -1, -1]


def test_numbering_across_slices_keeps_first_appearance():
    writer = ListWriter()
    n = Numbering(writer)
    a = n(pl.Series(["b", "a", "b", "c"]))
    b = n(pl.Series(["c", "d", "a", "e", "d"]))
    assert a.tolist() == [0, 1, 0, 2] and b.tolist() == [2, 3, 1, 4, 3]
    assert writer.close().to_list() == ["b", "a", "c", "d", "e"]


def test_sorted_numbering_is_how_older_runs_numbered_texts():
    df = require_trainable(load_pairs_frame(messy_sample(200)))
    rows = sorted_numbering(rows_in_memory(df))
    assert rows.queries.to_list() == df["query"].unique().sort().to_list()
    assert rows.documents.to_list() == df["document"].unique().sort().to_list()
    assert rows.queries.gather(rows.qid).to_list() == df["query"].to_list()
    assert rows.documents.gather(rows.did).to_list() == df["document"].to_list()


def load_pairs_frame(df: pl.DataFrame):
    from twotower_cli.data.pairs import Pairs

    return Pairs(df.with_columns(pl.col("label").cast(pl.Int8)), Path("<frame>"), True)


def test_store_reads_rows_slices_and_survives_pickling(tmp_path):
    texts = ["", "héllo", "字 𝄞", "a\nb", "\x00z"]
    w = StoreWriter(tmp_path, "t")
    w.add(texts[:2])
    w.add([])
    w.add(texts[2:])
    store = w.close()
    assert len(store) == 5 and store.to_list() == texts
    assert store.rows([4, 0, 2]) == [texts[4], "", texts[2]] and store[-1] == texts[4] and store[1] == "héllo"
    assert store[1:4].to_list() == texts[1:4] and store[3:99].to_list() == texts[3:]
    assert store.gather(np.array([2, 2])).to_list() == [texts[2]] * 2
    with pytest.raises(IndexError):
        store[5]
    again = pickle.loads(pickle.dumps(store))
    assert again.to_list() == texts
    pid = os.fork()
    if pid == 0:  # a worker process reads through its own descriptor
        os._exit(0 if store.rows([2]) == [texts[2]] else 1)
    assert os.waitpid(pid, 0)[1] == 0


def cfg_for(tmp_path, **data):
    return load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "runs"),
                                          **{("data", k): v for k, v in data.items()}})


def test_prepare_writes_texts_beside_the_runs_and_removes_them(tmp_path):
    path = tmp_path / "p.parquet"
    sample_df().head(300).write_parquet(path)
    p = prep.prepare(cfg_for(tmp_path), path, None, None, None)
    folders = list((tmp_path / "runs").glob(".texts-*"))
    assert len(folders) == 1 and (folders[0] / "documents.bin").exists()
    assert p.train_set.d_tokens.eager  # small: tokenised up front
    p.close()
    assert not list((tmp_path / "runs").glob(".texts-*"))
    write(tmp_path / "bad.tsv", "q\td\tlabel\na\tb\tmaybe\n")
    with pytest.raises(DataError):
        prep.prepare(cfg_for(tmp_path), tmp_path / "bad.tsv", None, None, None)
    assert not list((tmp_path / "runs").glob(".texts-*"))  # removed when reading fails too


def test_texts_of_a_killed_process_are_removed_and_a_living_ones_kept(tmp_path):
    from twotower_cli.runs import Lock, scratch_dir

    old = time.time() - 3600
    dead = tmp_path / ".texts-1-dead"  # its lock is free: the process that held it is gone (whatever its pid)
    dead.mkdir()
    (dead / ".lock").write_text("1")
    alive = tmp_path / ".texts-999999999-live"  # a pid this namespace does not know, but the lock is held
    alive.mkdir()
    held = Lock(alive / ".lock", "test")
    young = tmp_path / ".texts-2-young"  # being created: no lock yet
    young.mkdir()
    for p in (dead, alive):
        os.utime(p, (old, old))
    folder, lock = scratch_dir(tmp_path, ".texts-")
    assert not dead.exists() and alive.exists() and young.exists() and folder.exists()
    lock.release()
    held.release()


def test_ctrl_c_while_the_file_is_read_stops_at_once_and_leaves_nothing(tmp_path):
    """Before training starts there is nothing to checkpoint: the first Ctrl-C stops reading (a large file takes
    minutes) and removes the texts written so far."""
    big = tmp_path / "big.parquet"
    df = sample_df()
    pl.concat([df.with_columns(pl.col("query") + f" ~{k}", pl.col("document") + f" ~{k}") for k in range(100)]) \
        .write_parquet(big)  # 400k rows: seconds to read
    runs = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "train", str(big), "--runs-dir", str(runs),
                             "--no-report"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(runs.glob(".texts-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]  # (what it said)
    assert not runs.exists() or not any(runs.iterdir())  # no texts, no run folder


def test_runs_dir_that_is_a_file_is_a_usage_error(tmp_path):
    path = tmp_path / "p.parquet"
    sample_df().head(50).write_parquet(path)
    write(tmp_path / "afile", "x")
    cfg = load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "afile")})
    with pytest.raises(UsageError, match="is a file, not a folder"):
        prep.prepare(cfg, path, None, None, None)


def test_auto_tokenises_large_data_on_demand(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    sample_df().head(300).write_parquet(path)
    monkeypatch.setattr(prep, "UPFRONT_LIMIT", 1000)
    p = prep.prepare(cfg_for(tmp_path), path, None, None, None)
    try:
        assert not p.train_set.d_tokens.eager and not p.train_set.q_tokens.eager
    finally:
        p.close()


def test_a_run_saved_before_first_appearance_numbering_resumes_in_sorted_order(tmp_path):
    path = tmp_path / "p.parquet"
    sample_df().head(300).write_parquet(path)
    cfg = cfg_for(tmp_path)
    fresh = prep.prepare(cfg, path, None, None, None)
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "vocab.json").write_text(json.dumps(fresh.vocab.to_json()))
    (old / "config.json").write_text(json.dumps({"data": {"path": str(path)}}))
    resumed = prep.prepare(cfg, path, None, old, None)
    try:
        assert resumed.train_set.queries.to_list() == sorted(fresh.train_set.queries.to_list())
        (old / "config.json").write_text(json.dumps({"data": {"path": str(path), "text_order": "first-seen"}}))
        again = prep.prepare(cfg, path, None, old, None)
        assert again.train_set.queries.to_list() == fresh.train_set.queries.to_list()
        again.close()
    finally:
        fresh.close()
        resumed.close()


def sample_with(tmp_path, **train):
    """2,000 rows of the sample as Parquet, and settings with these train.* values."""
    path = tmp_path / "p.parquet"
    sample_df().head(2000).write_parquet(path)
    return path, load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "runs"),
                                                **{("train", k): v for k, v in train.items()}})


def test_validation_holds_out_at_most_val_max_queries_and_says_so(tmp_path):
    path, cfg = sample_with(tmp_path, val_fraction=0.3, val_min_queries=100)
    uncapped = prep.prepare(cfg.with_overrides({("train", "val_max_queries"): 0}), path, None, None, None)
    capped = prep.prepare(cfg.with_overrides({("train", "val_max_queries"): 120}), path, None, None, None)
    try:
        assert len(uncapped.train_set.val_q) > 120 and len(capped.train_set.val_q) == 120
        assert len(capped.train_set.test_q) == 100  # 5% of the queries, at least val_min_queries
        assert capped.train_set.n_train > uncapped.train_set.n_train  # the queries not held out train
        assert any("validation holds out 120 queries" in m for m in capped.messages)
        assert not any("validation holds out" in m for m in uncapped.messages)
    finally:
        uncapped.close()
        capped.close()


def test_validation_searches_a_sample_of_a_corpus_larger_than_val_corpus_size_and_says_so(tmp_path):
    path, cfg = sample_with(tmp_path, val_corpus_size=500)
    p = prep.prepare(cfg, path, None, None, None)
    try:
        assert len(p.train_set.documents) > 500
        assert any(f"validation searches 500 of the {len(p.train_set.documents):,} documents" in m for m in p.messages)
    finally:
        p.close()


def test_a_run_saved_before_the_validation_caps_resumes_with_its_own_split():
    from twotower_cli.config import FIELDS
    from twotower_cli.training.pipeline import stored_settings

    old = {"train": {"val_fraction": 0.05, "val_corpus_size": 0, "seed": 3}, "model": {"encoder": "ngram"}}
    filled = stored_settings(old)
    # the split and validation corpus it was trained with: no minimum, no cap, every document
    assert filled["train"]["val_min_queries"] == 0 and filled["train"]["val_max_queries"] == 0
    assert filled["train"]["val_corpus_size"] == 0 and filled["train"]["seed"] == 3
    assert filled["model"]["idf_power"] == FIELDS["model"]["idf_power"][0]  # others: today's default
    assert set(filled["search"]) == set(FIELDS["search"])


def tricky_pairs(n: int = 120) -> pl.DataFrame:
    """Sample rows with texts that a sliced reader could split wrongly: quotes, and (for quoting formats) tabs,
    commas and line breaks inside a field."""
    df = sample_df().head(n)
    odd = ['say "hi", then\nleave', 'tab\there "quoted"', 'ﬁle Ｆｕｌｌ', '""', 'a,b,"c"']
    return df.with_columns(pl.Series("query", [odd[i % 5] + " " + q if i % 7 == 0 else q
                                               for i, q in enumerate(df["query"])]))


@pytest.mark.parametrize("fmt", ["tsv-plain", "tsv-plain-headless", "tsv-quoted", "csv", "jsonl"])
def test_text_files_read_in_small_slices_equal_the_whole_file(tmp_path, monkeypatch, fmt):
    from twotower_cli.data import text_slices
    from twotower_cli.data.pairs import load_pairs, usable_rows

    df = tricky_pairs()
    if fmt.startswith("tsv-plain"):  # the seed's TSV cannot hold a tab or a line break in a field
        df = df.with_columns(pl.col("query", "document").str.replace_all(r"[\t\n]", " "))
    path = tmp_path / ("p.jsonl" if fmt == "jsonl" else "p.csv" if fmt == "csv" else "p.tsv")
    if fmt == "jsonl":
        df.write_ndjson(path)
    elif fmt == "csv":
        df.write_csv(path)
    elif fmt == "tsv-quoted":
        df.write_csv(path, separator="\t", quote_style="always")
    else:
        body = "\n".join("\t".join([q, d, str(lab)]) for q, d, lab in df.iter_rows())
        path.write_text(("" if fmt.endswith("headless") else "query\tdocument\tlabel\n") + body + "\n")
    whole = load_pairs(path).df
    monkeypatch.setattr(text_slices, "SLICE_BYTES", 700)  # tens of slices, cut anywhere a record may end
    text = text_slices.TextSlices(path, path.suffix[1:], ["query", "document", "label"])
    assert len(list(text_slices.byte_slices(path, text.quoted, 700))) > 10
    rows = read_pairs_rows(path, folder=tmp_path / "t")
    usable = whole.filter(usable_rows())
    assert rows.rows == whole.height and len(rows.qid) == usable.height
    assert [rows.queries[i] for i in rows.qid.tolist()] == usable["query"].to_list()
    assert [rows.documents[i] for i in rows.did.tolist()] == usable["document"].to_list()
    assert rows.label.tolist() == usable["label"].to_list()


def test_a_record_ends_only_at_a_line_break_outside_quotes():
    from twotower_cli.data.text_slices import record_end

    data = b'q,d,label\n"a\nb",x,1\n"c ""\n"" d",y'
    assert record_end(data, quoted=True) == data.index(b'x,1\n') + 4
    assert record_end(data, quoted=False) == data.rindex(b"\n") + 1
    assert record_end(b'"open\nfield', quoted=True) == 0


@pytest.mark.parametrize("line, text, says", [
    (41, b"only two\tfields\n", "line 41 has 2 tab-separated fields, expected 3"),
    (57, b"caf\xe9\tdoc\t1\n", "line 57 is not valid UTF-8 (byte 0xe9)"),
    (63, b"q\td\tmaybe\n", "1 labels are not 0/1 (line 63: 'maybe')"),
])
def test_problems_in_a_later_slice_name_the_files_own_line(tmp_path, monkeypatch, line, text, says):
    from twotower_cli.data import text_slices

    lines = [b"query\tdocument\tlabel\n"] + [f"query {i}\tdocument {i}\t1\n".encode() for i in range(2, 80)]
    lines[line - 1] = text
    path = tmp_path / "p.tsv"
    path.write_bytes(b"".join(lines))
    monkeypatch.setattr(text_slices, "SLICE_BYTES", 300)
    with pytest.raises(DataError, match=re.escape(f"{path}: {says}")):
        read_pairs_rows(path, folder=tmp_path / "t")


def whole_outcome(path):
    """What training read from a text file before slices: load_pairs, then the usable rows (or the error)."""
    from twotower_cli.data.pairs import label_error, load_pairs, usable_rows

    try:
        pairs = load_pairs(path)
        if pairs.n_bad_labels:
            r, v = pairs.bad_labels[0]
            raise label_error(path, pairs.n_bad_labels, pairs.where(r), v)
    except DataError as exc:
        return str(exc)
    df = pairs.df.filter(usable_rows())
    return df["query"].to_list(), df["document"].to_list(), df["label"].to_list()


def sliced_outcome(path, folder):
    try:
        rows = read_pairs_rows(path, folder=folder)
    except DataError as exc:
        return str(exc)
    return ([rows.queries[i] for i in rows.qid.tolist()], [rows.documents[i] for i in rows.did.tolist()],
            rows.label.tolist())


T = b"query\tdocument\tlabel\n"
ODD_FILES = {  # found by an adversarial pass over the sliced reader (each once read differently)
    "header-then-one-row.tsv": b"query\tdocument\nq\td\n",
    "stray-quote.csv": b'query,document\nq,d "',
    "empty.tsv": b"",
    "newlines.tsv": b"\n\n",
    "duplicate-other-column.csv": b"a,a\nx,y\n",
    "headerless-quoted-newline.tsv": b'"a\nb"\tx\nq\td\nr\te\n',
    "quoted-then-ragged.tsv": T + b'"a\tb"\td\t1\n' + b"q\td\t1\n" * 15 + b"x\ty\t1\tz\n" + b"q\td\t0\n" * 5,
    "quoted-then-unclosed.tsv": b'query\tdocument\n"a\tb"\td\nq0\td0\n"open\tx\nq1\td1\n',
    "quote-only-in-a-field.tsv": b'"a"\tb\n"x"y\tz\n',
    "blank-lines.jsonl": b'{"query":"q","document":"d"}\n\n\n{"query":"r","document":"e"}\n',
    "null-query-first.jsonl": b'{"query":null,"document":"d","label":1}\n{"query":"q","document":"d","label":1}\n',
    "blank-first-line.csv": b"\n\nquery,document,label\n" + b"".join(b"q%d,d%d,1\n" % (i, i) for i in range(12)),
}


@pytest.mark.parametrize("name", sorted(ODD_FILES))
@pytest.mark.parametrize("size", [1, 7, 50, None])
def test_odd_files_read_in_slices_as_the_whole_file_reads_them(tmp_path, monkeypatch, name, size):
    from twotower_cli.data import text_slices

    path = tmp_path / name
    path.write_bytes(ODD_FILES[name])
    if size:
        monkeypatch.setattr(text_slices, "SLICE_BYTES", size)
    assert sliced_outcome(path, tmp_path / "t") == whole_outcome(path)


def test_quoting_is_decided_on_the_first_thousand_lines_however_long(tmp_path):
    path = tmp_path / "long.tsv"
    path.write_bytes(b"query\tdocument\nq\t" + b"d" * (1 << 21) + b'\n"a\tb"\td\n')
    assert sliced_outcome(path, tmp_path / "t") == whole_outcome(path)
    assert whole_outcome(path)[0] == ["q", "a\tb"]


CORPORA = {  # (file, --document-col, --id-col): read in slices by `index` when larger than a slice
    "lines.txt": (b"\xef\xbb\xbfGNU C compiler\r\n\n  \ntext editor\nlast line, no break", "document", None),
    "one-a-line.tsv": (b"first text\n\nthird text\nfourth", "document", None),
    "pairs-layout.tsv": (b"q1\tdoc one\t1\nq2\tdoc two\t0\nq3\tdoc three\t1\n", "document", None),
    "header-ids.tsv": (b'id\tdocument\na\t"a tab\there"\nb\t"two\nlines"\nc\tplain\n', "document", "id"),
    "text-column.tsv": (b"text\tn\nalpha\t1\nbeta\t2\ngamma\t3\n", "document", None),
    "ids.csv": (b'doc_id,body\n7,"quoted, comma"\n8,"line\nbreak"\n9,plain\n', "body", "doc_id"),
    "ids.jsonl": (b'{"id": 1, "document": "one"}\n\n{"id": 2, "document": "two"}\n{"id": 3, "document": null}\n',
                  "document", "id"),
    "text-key.jsonl": (b'{"text": "alpha"}\n{"text": "beta"}\n', "document", None),
    "ragged.tsv": (b"id\tdocument\na\tx\nb\ty\tz\nc\tw\n", "document", "id"),
    "no-column.csv": (b"a,b\n1,2\n3,4\n", "document", None),
    "blank.txt": (b"\n  \n\n", "document", None),
    # found by a differential fuzz of the two readers (each once read differently)
    "blank-first-line.csv": (b"\r\n\nid,document\n" + b"".join(b"%d,doc number %d\n" % (i, i) for i in range(12)),
                             "document", "id"),
    "bom-only.tsv": (b"\xef\xbb\xbf", "document", None),
    "one-a-line-with-id.tsv": (b"a\nb\n", "document", "id"),
    "list-id.jsonl": (b'{"document": "a", "id": [1]}\n', "document", "id"),
    "late-unused-key.jsonl": (b'{"document": "a"}\n{"document": "b", "text": "c"}\n', "document", None),
    "late-id.jsonl": (b'{"document": "a"}\n{"document": "b", "id": "c"}\n', "document", "id"),
    "late-asked-column.jsonl": (b'{"document": "x"}\n{"body": "y"}\n', "body", None),
    "id-is-the-documents.csv": (b"document\na\nb\n", "document", "document"),
    "missing-id.jsonl": (b'{"document": "a", "id": "x"}\n{"document": "b"}\n', "document", "id"),
    "empty-id.csv": (b'id,document\nx,a\n,b\n', "document", "id"),
    "ids-asked-of-lines.txt": (b"a\nb\n", "document", "id"),
}


@pytest.mark.parametrize("name", sorted(CORPORA))
@pytest.mark.parametrize("size", [1, 9, 64])
def test_a_corpus_read_in_slices_is_the_corpus_read_whole(tmp_path, name, size):
    """`twotower index` reads a text corpus larger than a slice a slice at a time (`corpus.text_corpus`): the same
    documents, ids and errors as the whole-file reader (a JSON-lines corpus with the default column used to fail
    with a Polars DuplicateError)."""
    from twotower_cli.data.corpus import read_corpus, text_corpus

    data, col, id_col = CORPORA[name]
    path = write(tmp_path / name, data)

    def whole():
        try:
            docs, ids = read_corpus(path, col, id_col)
            return docs.to_list(), ids
        except DataError as exc:
            return str(exc)

    def sliced():
        try:
            total, slices = text_corpus(path, col, id_col, size)
            parts = list(slices())
            docs = [d for p, _ in parts for d in p.to_list()]
            assert total == len(docs)
            return docs, ([i for _, ids in parts for i in ids] if id_col else None)
        except DataError as exc:
            return str(exc)

    assert sliced() == whole()


def test_index_reads_a_large_text_corpus_a_slice_at_a_time(cli, tiny_pairs, tmp_path, monkeypatch):
    """Above a slice (32 MB; 300 bytes here) the index is built from slices: the same index, chunk by chunk."""
    from twotower_cli.data import corpus

    docs = pl.read_parquet(tiny_pairs)["document"].unique().sort().head(40)
    path = tmp_path / "corpus.tsv"
    pl.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "document": docs}).write_csv(path, separator="\t")
    small = ["--embedding-dim", "8", "--hidden-dim", "8", "--epochs", "1", "--no-report", "--runs-dir", "runs"]
    assert cli("train", tiny_pairs, *small).exit_code == 0
    read = []
    monkeypatch.setattr(corpus, "read_corpus", lambda *a: read.append(a) or pytest.fail("read whole"))
    monkeypatch.setattr(corpus, "SLICE_BYTES", 300)
    res = cli("index", path, "--id-col", "id", "--name", "sliced", "--chunk-rows", "7", "--runs-dir", "runs")
    assert res.exit_code == 0, res.output
    assert "counting the documents of corpus.tsv" in res.stderr  # the pause before the bar is explained
    meta = json.loads(((tmp_path / "runs" / "latest").resolve() / "index/sliced/meta.json").read_text())
    assert meta["count"] == len(docs) and not read
    hits = json.loads(cli("search", docs[5], "--index", "sliced", "--json", "-k", "40", "--mode", "dense",
                          "--runs-dir", "runs").stdout)
    assert sorted(h["id"] for h in hits["results"][0]["hits"]) == sorted(f"d{i}" for i in range(len(docs)))

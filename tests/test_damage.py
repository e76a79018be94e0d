"""Damage that used to pass silently: each case is a one-line error naming the file (never other documents, a
silent change of search, or an "internal error"), and `twotower verify` finds it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import sample_pairs
from twotower_cli.errors import ArtifactError


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damage")
    sample_pairs(folder / "pairs.parquet", 300)
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192", "TWOTOWER_MODEL_HIDDEN_DIM": "16",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "1",
                          "--no-report"], cwd=folder, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return (folder / "runs" / "latest").resolve()


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "runs" / trained.name
    shutil.copytree(trained, copy)
    os.symlink(trained.name, tmp_path / "runs" / "latest")
    return copy


def nan_in_bm25(run: Path, keep_checksums: bool = True):
    path = run / "index" / "default" / "bm25" / "data.npy"
    data = np.load(path)
    data[: len(data) // 2] = np.nan
    np.save(path, data)
    if not keep_checksums:  # a BM25 written before its files had checksums
        meta = json.loads((path.parent / "bm25.json").read_text())
        meta.pop("sha256")
        (path.parent / "bm25.json").write_text(json.dumps(meta))


def flip_end(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def bad_utf8(run: Path, keep_checksums: bool = True):
    path = run / "index" / "default" / "texts.bin"
    data = bytearray(path.read_bytes())
    for start in np.load(path.parent / "texts.offsets.npy")[:-1]:  # every document's first byte
        data[int(start)] = 0xFF
    path.write_bytes(bytes(data))
    if not keep_checksums:  # an index written before its files had checksums (format 2)
        meta = json.loads((path.parent / "meta.json").read_text())
        meta.pop("files_sha256")
        meta.pop("meta_sha256")
        meta["format_version"] = 2
        (path.parent / "meta.json").write_text(json.dumps(meta))


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def edit_run_json(change):
    def apply(run: Path):
        record = json.loads((run / "run.json").read_text())
        change(record)
        (run / "run.json").write_text(json.dumps(record))
    return apply


CASES = {
    "nan in bm25": (nan_in_bm25, ["--mode", "bm25"], "bm25"),
    "nan in bm25, hybrid": (nan_in_bm25, ["--mode", "hybrid"], "bm25"),
    "nan in an older bm25": (lambda r: nan_in_bm25(r, False), ["--mode", "bm25"], "bm25"),
    "ids.bin flipped": (lambda r: flip_end(r / "index" / "default" / "ids.bin"), [], "ids.bin"),
    "texts.bin not utf-8": (bad_utf8, [], "texts.bin"),
    "texts.bin not utf-8, no checksum": (lambda r: bad_utf8(r, False), [], "texts.bin"),
    "run.json missing": (lambda r: (r / "run.json").unlink(), [], "run.json"),
    "run.json not json": (lambda r: (r / "run.json").write_text("{"), [], "run.json"),
    "search entry damaged": (edit_run_json(lambda d: d["search"].update(mode="fast")), [], "run.json"),
    "search entry removed": (edit_run_json(lambda d: d.pop("search")), [], "run.json"),
    "search weight edited": (edit_run_json(lambda d: d["search"].update(hybrid_weight=0.31)), [], "run.json"),
    "index checksums removed": (lambda r: edit_json(r / "index" / "default" / "meta.json",
                                                    lambda m: m.pop("files_sha256")), [], "meta.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_a_one_line_error_naming_the_file(case, run, cli):
    damage, args, name = CASES[case]
    damage(run)
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent, *args)
    assert res.exit_code == 1, (case, res.stdout[:300])
    assert name in res.stderr and "internal error" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    if case.startswith(("nan", "ids", "texts")):
        verified = cli("verify", "--runs-dir", run.parent, "--json")
        assert verified.exit_code == 1 and not json.loads(verified.stdout)["ok"]


def test_verify_passes_a_clean_run_and_checks_every_file(run, cli):
    res = cli("verify", "--runs-dir", run.parent, "--json")
    assert res.exit_code == 0, res.stdout
    checked = {c["what"] for c in json.loads(res.stdout)["checks"]}
    assert {"run.json", "model", "index/default/embeddings.npy", "index/default/texts.bin",
            "index/default/ids.bin", "index/default/bm25", "index/default/bm25/bm25.json", "index/default/postings.*.npy",
            "index/default/texts.offsets.npy", "index/default (opened)"} <= checked


def test_verify_finds_damage_that_loading_does_not_read(run, cli, monkeypatch):
    """Files over the size read at every load are checked by `verify` alone (here: the limit lowered to 0)."""
    from twotower_cli.retrieval import index as index_mod

    monkeypatch.setattr(index_mod, "VERIFY_UP_TO", 0)
    emb = run / "index" / "default" / "embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-3] ^= 0x10
    emb.write_bytes(bytes(data))
    res = cli("verify", "--runs-dir", run.parent, "--json")
    bad = [c for c in json.loads(res.stdout)["checks"] if not c["ok"]]
    assert res.exit_code == 1 and [c["what"] for c in bad] == ["index/default/embeddings.npy"]


def test_evaluate_says_what_it_drops_from_the_qrels(run, tmp_path, cli):
    import polars as pl

    ev = tmp_path / "ev"
    ev.mkdir()
    pl.DataFrame({"doc_id": ["d1", "d2", "d3"], "document": ["gnu c compiler", "text editor", "tar archive"]}
                 ).write_parquet(ev / "corpus.parquet")
    pl.DataFrame({"query_id": ["q1", "q2", None], "query": ["compiler", "editor", "archive"]}
                 ).write_parquet(ev / "queries.parquet")
    pl.DataFrame({"query_id": ["q1", "q2", "q9", None, "q1"], "doc_id": ["d1", "d2", "d3", "d3", "d1"],
                  "score": [1.0, 1.0, 1.0, 1.0, 0.0]}).write_parquet(ev / "qrels.parquet")
    res = cli("evaluate", ev, "--runs-dir", run.parent, "--json")
    assert res.exit_code == 0, res.stderr
    notes = json.loads(res.stdout)["systems"][0]["notes"]
    assert any("1 queries have no id" in n for n in notes) and any("1 qrels rows have no query id" in n for n in notes)
    assert any("not in the queries file" in n for n in notes) and any("judged before" in n for n in notes)
    assert res.stderr.count("note:") >= 4


def eval_folder(folder: Path, qrels: dict, queries=("compiler", "editor", "  ")) -> Path:
    import polars as pl

    folder.mkdir()
    pl.DataFrame({"doc_id": ["d1", "d2", "d3"], "document": ["gnu c compiler", "text editor", None]}
                 ).write_parquet(folder / "corpus.parquet")
    pl.DataFrame({"query_id": ["q1", "q2", "q3"], "query": list(queries)}).write_parquet(folder / "queries.parquet")
    pl.DataFrame(qrels).write_parquet(folder / "qrels.parquet")
    return folder


def test_evaluate_counts_a_repeated_judgement_once_and_says_what_has_no_text(run, tmp_path, cli):
    from twotower_cli.evaluation.eval_sets import load_eval

    ev = eval_folder(tmp_path / "ev", {"query_id": ["q1", "q1", "q2", "q2", "q2", "q3"],
                                       "doc_id": ["d1", "d1", "gone", "gone", "d2", "d3"],
                                       "score": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]})
    loaded = load_eval(ev)
    assert loaded.qrels[1] == {1: 1.0, -2: 1.0}  # the missing document counted once
    notes = " | ".join(loaded.notes)
    assert "2 qrels rows repeat an earlier row exactly" in notes and "1 relevant documents are not in" in notes
    assert "1 queries have no text" in notes and "1 documents have no text" in notes
    res = cli("evaluate", ev, "--runs-dir", run.parent, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["systems"][0]["metrics"]["recall@10"] <= 5 / 6 + 1e-9  # q2 finds 1 of its 2


@pytest.mark.parametrize("grade", [float("nan"), float("inf")])
def test_evaluate_refuses_a_grade_that_is_not_finite(run, tmp_path, cli, grade):
    ev = eval_folder(tmp_path / "ev", {"query_id": ["q1", "q2"], "doc_id": ["d1", "d2"], "score": [1.0, grade]})
    res = cli("evaluate", ev, "--runs-dir", run.parent)
    assert res.exit_code == 1 and "qrels.parquet" in res.stderr and "data row 2" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--mode", "dense", "--hybrid-weight", "0.5"], "--hybrid-weight asks for a hybrid search but --mode is dense"),
    (["--mode", "bm25", "--hybrid"], "--hybrid asks for a hybrid search but --mode is bm25"),
    (["--mode", "auto", "--hybrid-weight", "0.2"], "--mode is auto"),
])
def test_search_flags_that_contradict_are_a_usage_error(run, cli, args, needle):
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent, *args)
    assert res.exit_code == 2 and needle in res.stderr, res.stderr


def test_a_negative_zero_weight_is_zero(run, cli):
    plain = cli("search", "GNU C compiler", "--runs-dir", run.parent, "--hybrid-weight", "0", "--json")
    negative = cli("search", "GNU C compiler", "--runs-dir", run.parent, "--hybrid-weight", "-0", "--json")
    assert negative.exit_code == 0 and json.loads(negative.stdout) == json.loads(plain.stdout)


def test_a_folder_inside_a_run_is_named_as_such(run, cli):
    res = cli("search", "GNU C compiler", "--run", run / "index" / "default")
    assert res.exit_code == 2 and f"is the index 'default' of the run {run}" in res.stderr
    assert f"pass --run {run}" in res.stderr


def test_index_names_documents_that_share_an_id_and_bad_names(run, tmp_path, cli):
    import polars as pl

    pl.DataFrame({"doc_id": ["a", "b", "a", "c", "b"], "document": ["one", "two", "three", "four", "five"]}
                 ).write_parquet(tmp_path / "c.parquet")
    res = cli("index", tmp_path / "c.parquet", "--id-col", "doc_id", "--name", "ids", "--runs-dir", run.parent)
    assert res.exit_code == 0, res.stderr
    assert "2 documents have the id of an earlier, different document" in res.stderr
    res = cli("index", tmp_path / "c.parquet", "--name", "-n", "--runs-dir", run.parent)
    assert res.exit_code == 2 and "beginning with a letter or digit" in res.stderr


def test_a_lock_this_process_holds_says_so(tmp_path):
    from twotower_cli.errors import ArtifactError
    from twotower_cli.runs import Lock

    with Lock(tmp_path / "x.lock", "index 'default' of r"):
        with pytest.raises(ArtifactError, match="by this process already"):
            Lock(tmp_path / "x.lock", "index 'default' of r")


def test_a_file_written_in_place_is_noticed_whatever_its_times_say(run):
    """The same size and modification time, other bytes: the index is opened (and checked) again."""
    import twotower_cli

    model = twotower_cli.load(run)
    model.search("GNU C compiler", k=3)
    index = model.index
    path = run / "index" / "default" / "texts.bin"
    before = path.stat()
    with open(path, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0x01]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert not index.current()
    with pytest.raises(Exception, match="texts.bin"):
        model.search("GNU C compiler", k=3)


def test_model_files_written_under_a_loaded_model_are_refused(run):
    """A run's files replaced or rewritten while it is loaded (a server's): its towers in memory are no longer the
    run on disk, nor the model its indexes are checked against. Refused, naming the file, until loaded again."""
    import twotower_cli

    model = twotower_cli.load(run)
    model.search("GNU C compiler", k=3)
    for name in ("model.safetensors", "vocab.json"):
        path = run / name
        path.write_bytes(path.read_bytes())  # the same bytes, written again (a copy of the run over this one)
        with pytest.raises(ArtifactError, match=f"{name}: changed on disk since this model was loaded"):
            model.search("GNU C compiler", k=3)
        with pytest.raises(ArtifactError, match=name):
            model.encode_queries(["GNU C compiler"])
        assert twotower_cli.load(run).search("GNU C compiler", k=3)  # loaded again: served
        model = twotower_cli.load(run)


def set_header_fingerprint(path: Path) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    old = header["__metadata__"]["fingerprint"]
    new = ("0" if old[0] != "0" else "1") + old[1:]
    path.write_bytes(data[:8] + data[8:8 + n].replace(old.encode(), new.encode()) + data[8 + n:])


def test_a_damaged_model_header_is_blamed_on_the_model_not_the_index(run, cli):
    set_header_fingerprint(run / "model.safetensors")
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent)
    assert res.exit_code == 1 and "model.safetensors: does not match its recorded fingerprint" in res.stderr, \
        res.stderr
    assert "built by another model" not in res.stderr


def edit_meta(change, checksum: bool = True):
    def apply(run: Path):
        path = run / "index" / "default" / "meta.json"
        meta = json.loads(path.read_text())
        change(meta)
        if not checksum:  # written as twotower writes an index, its own checksum again
            from twotower_cli.retrieval.meta_file import meta_digest

            meta["meta_sha256"] = meta_digest(meta)
        path.write_text(json.dumps(meta))
    return apply


@pytest.mark.parametrize("change,checksum,needle", [
    (lambda m: m.update(created="2020-01-01T00:00:00+0000"), True, "its own checksum"),
    (lambda m: m["lexical"].update(weight=0.123), True, "its own checksum"),
    (lambda m: m.update(dim="16"), False, "dim '16'"),
    (lambda m: m.update(dtype="float64"), False, "dtype 'float64'"),
    (lambda m: m.update(backend="faiss", faiss={"ef_search": "many"}), False, "not one twotower writes with its backend"),
    (lambda m: (m.update(backend="faiss", faiss={"ef_search": "many"}), m.pop("layout")), False, "'faiss' entry"),
    (lambda m: m["lexical"].update(weight="x"), False, "'lexical' entry"),
    (lambda m: m["lexical"].update(weight=0.123), False, "lexical weight differ from the model's settings"),
    (lambda m: m["lexical"].update(buckets=17), False, "lexical buckets differ"),
    # a format number edited down, with the checksum left as it was or the checksums emptied: still checked
    (lambda m: (m.update(format_version=2), m.pop("files_sha256")), True, "its own checksum"),
    (lambda m: m.update(files_sha256={}), False, "checksums are missing (texts.bin"),
    (lambda m: m["lexical"].pop("sha256"), False, "lexical rows' checksums are missing"),
    (lambda m: m["lexical"].update(sha256="x"), False, "lexical rows' checksums"),
    (lambda m: m.update(format_version="3"), False, "format_version"),
    (lambda m: m.update(format_version=None), False, "format_version"),
    # a genuine format-2 index listed its strings files whenever it listed checksums
    (lambda m: (m.update(format_version=2), m.pop("meta_sha256"), m["files_sha256"].pop("texts.bin")), True,
     "checksums are missing (texts.bin)"),
    # names outside the index are never read (/dev/zero would be hashed for ever)
    (lambda m: m["files_sha256"].update({"/dev/zero": "00"}), False, "outside the index"),
    (lambda m: m["files_sha256"].update({"../../config.json": "00"}), False, "outside the index"),
])
def test_an_edited_or_damaged_index_meta_is_one_line_naming_it(run, cli, change, checksum, needle):
    edit_meta(change, checksum)(run)
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent)
    assert res.exit_code == 1 and "meta.json" in res.stderr and needle in res.stderr, res.stderr
    assert "internal error" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    verified = cli("verify", "--runs-dir", run.parent, "--json")
    assert verified.exit_code == 1 and not json.loads(verified.stdout)["ok"]


def test_files_are_checked_smallest_first_when_all_exceed_the_budget(run, cli, monkeypatch):
    """Over the bytes checked at every load, the small files are still checked (not all or nothing)."""
    from twotower_cli.retrieval import index as index_mod

    folder = run / "index" / "default"
    meta = json.loads((folder / "meta.json").read_text())
    sizes = sorted((folder / f).stat().st_size for f in meta["files_sha256"])
    monkeypatch.setattr(index_mod, "VERIFY_UP_TO", sum(sizes) - sizes[-1])  # all but the largest file
    flip_end(folder / "ids.bin")
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent)
    assert res.exit_code == 1 and "ids.bin: does not match the checksum" in res.stderr, res.stderr


def test_a_npy_file_that_asks_to_be_unpickled_is_called_damaged(run, cli):
    path = run / "index" / "default" / "embeddings.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent)
    assert res.exit_code == 1 and "embeddings.npy" in res.stderr and "header damaged" in res.stderr, res.stderr
    assert "pickle" not in res.stderr


def test_small_index_files_are_read_whole_so_truncation_cannot_kill_a_reader(run):
    """A file truncated in place under a reader that mapped it stops the process (SIGBUS): files up to 64 MiB are
    read whole when opened, and the reader answers from the build it opened."""
    code = f"""
import twotower_cli
from pathlib import Path
model = twotower_cli.load({str(run)!r})
model.search("GNU C compiler", k=3)
index = model.index
before = index.documents([0, 1])
for name in ("texts.bin", "ids.bin", "texts.offsets.npy", "embeddings.npy", "postings.weights.npy"):
    path = Path({str(run)!r}) / "index" / "default" / name
    with open(path, "r+b") as fh:
        fh.truncate(64)
assert index.documents([0, 1]) == before
print(float(index.embeddings[-1].sum()), float(index.lexical.weights[-1]), "ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.returncode, res.stderr[-2000:])


def test_non_finite_query_embeddings_blame_the_model(run, monkeypatch):
    import twotower_cli
    from twotower_cli.model.numpy_encoder import NumpyTowers

    encode = NumpyTowers.encode
    monkeypatch.setattr(NumpyTowers, "encode", lambda self, ids, side: encode(self, ids, side) * np.nan)
    with pytest.raises(ArtifactError, match="model.safetensors: gives non-finite query embeddings"):
        twotower_cli.load(run).search("GNU C compiler", k=3)


def test_index_stamps_cover_its_parquet_parts(run):
    import twotower_cli

    index = twotower_cli.load(run).index
    parts = sorted((run / "index" / "default" / "documents").glob("*.parquet"))
    assert parts and all(p in index.stamps for p in parts)


@pytest.mark.parametrize("host,needle", [("10.255.255.1", "check --host"), ("no-such-host.invalid", "check --host")])
def test_serve_names_the_host_it_cannot_listen_on(host, needle):
    from twotower_cli.errors import UsageError
    from twotower_cli.serve.http import listening_socket

    with pytest.raises(UsageError, match=needle):
        listening_socket(host, 0)


def test_a_queries_folder_or_empty_file_says_what_search_reads(run, cli, tmp_path):
    res = cli("search", "--queries", tmp_path, "--runs-dir", run.parent)
    assert res.exit_code == 1 and "expected a queries file (.txt, one a line" in res.stderr, res.stderr
    (tmp_path / "q.txt").write_text("\n  \n")
    res = cli("search", "--queries", tmp_path / "q.txt", "--runs-dir", run.parent)
    assert res.exit_code == 1 and "q.txt: holds no queries" in res.stderr, res.stderr


@pytest.mark.parametrize("file,line", [("corpus.jsonl", '{"_id": "d1", "text": ["GNU", "compiler"]}'),
                                       ("queries.jsonl", '{"_id": "q1", "text": {"words": "GNU compiler"}}')])
def test_evaluate_names_a_list_or_object_where_text_belongs(run, cli, tmp_path, file, line):
    folder = tmp_path / "ev"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "GNU C compiler"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "GNU compiler"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (folder / file).write_text(line + "\n")
    res = cli("evaluate", folder, "--runs-dir", run.parent)
    assert res.exit_code == 1 and f"{file}: column 'text' holds" in res.stderr, res.stderr
    assert "internal error" not in res.stderr


def test_a_run_replaced_under_a_loaded_model_is_named_even_after_its_index_is_rebuilt(trained, run, tmp_path):
    """Another run's model moved in and the index rebuilt with it: the loaded object says its run changed
    (restart), not that the index comes from another model (which a rebuild would not fix)."""
    import twotower_cli

    model = twotower_cli.load(run)
    model.search("GNU C compiler", k=3)
    pairs = trained.parent.parent / "pairs.parquet"
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192", "TWOTOWER_MODEL_HIDDEN_DIM": "16",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    cmd = [sys.executable, "-m", "twotower_cli"]
    other = subprocess.run([*cmd, "train", str(pairs), "--epochs", "1", "--seed", "7", "--no-report", "--runs-dir",
                            str(tmp_path / "other")], capture_output=True, text=True, env=env)
    assert other.returncode == 0, other.stderr
    for name in ("model.safetensors", "config.json", "vocab.json"):
        os.replace((tmp_path / "other" / "latest").resolve() / name, run / name)
    index = subprocess.run([*cmd, "index", str(pairs), "--runs-dir", str(run.parent), "--run", run.name, "--name",
                            "default"], capture_output=True, text=True, env=env)
    assert index.returncode == 0, index.stderr
    with pytest.raises(ArtifactError, match="changed on disk since this model was loaded"):
        model.search("GNU C compiler", k=3)


@pytest.mark.parametrize("file", ["texts.offsets.npy", "postings.weights.npy", "postings.docs.npy",
                                  "postings.indptr.npy"])
def test_a_damaged_offsets_or_lexical_file_is_named(run, cli, file):
    path = run / "index" / "default" / file
    path.write_bytes(path.read_bytes()[:40])
    res = cli("search", "GNU C compiler", "--runs-dir", run.parent)
    assert res.exit_code == 1 and file in res.stderr, res.stderr


@pytest.mark.parametrize("what", ["bm25/bm25.json", "documents/part-00000.parquet", "fifo"])
def test_a_device_or_pipe_in_place_of_an_index_file_is_never_read(run, what):
    """/dev/zero has no end and a pipe blocks its reader: search and verify say the file is damaged, at once."""
    folder = run / "index" / "default"
    if what == "fifo":  # a name added to the checksums (meta.json rewritten with its own checksum) that is a pipe
        os.mkfifo(folder / "zz")
        edit_meta(lambda m: m["files_sha256"].update(zz="0" * 64), checksum=False)(run)
        what = "zz"
    else:
        (folder / what).unlink()
        (folder / what).symlink_to("/dev/zero")
    for args in (["search", "GNU C compiler"], ["verify"]):
        res = subprocess.run([sys.executable, "-m", "twotower_cli", *args, "--runs-dir", str(run.parent)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and what in (res.stderr + res.stdout), (args, res.stderr[-500:])
        assert "internal error" not in res.stderr

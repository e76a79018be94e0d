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
    if not keep_checksums:
        meta = json.loads((path.parent / "meta.json").read_text())
        meta.pop("files_sha256")
        (path.parent / "meta.json").write_text(json.dumps(meta))


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
            "index/default/ids.bin", "index/default/bm25/data.npy", "index/default/lexical.*.npy"} <= checked


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

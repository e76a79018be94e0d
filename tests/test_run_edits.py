"""A run's settings are part of what its fingerprint covers: an edited config.json or vocab.json is refused like
altered weights, on every path (the NumPy query path after a verified search too); settings that make no sense
are refused before training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sample_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("edits")
    sample_pairs(folder / "pairs.parquet", 300)
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192", "TWOTOWER_MODEL_HIDDEN_DIM": "16",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "1",
                          "--no-report"], cwd=folder, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return (folder / "runs" / "latest").resolve()


def edit_model(key, value):
    def apply(run: Path):
        config = json.loads((run / "config.json").read_text())
        config["model"][key] = value
        (run / "config.json").write_text(json.dumps(config))
    return apply


def swap_two_characters(run: Path):
    vocab = json.loads((run / "vocab.json").read_text())
    chars = vocab["chars"]
    chars[3]["char"], chars[4]["char"] = chars[4]["char"], chars[3]["char"]
    (run / "vocab.json").write_text(json.dumps(vocab))


def no_lowercase(run: Path):
    vocab = json.loads((run / "vocab.json").read_text())
    vocab["lowercase"] = False
    (run / "vocab.json").write_text(json.dumps(vocab))


EDITS = {"idf_power": edit_model("idf_power", 3.0), "word_share": edit_model("word_share", 0.9),
         "max_query_length": edit_model("max_query_length", 5), "word_chars": edit_model("word_chars", [3]),
         "lexical_weight": edit_model("lexical_weight", 0.2), "vocab": swap_two_characters,
         "lowercase": no_lowercase}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_setting_is_refused_after_a_verified_search(trained, tmp_path, edit, cli):
    run = tmp_path / "runs" / trained.name
    shutil.copytree(trained, run)
    assert cli("search", "GNU C compiler", "--run", run.name, "--runs-dir", tmp_path / "runs").exit_code == 0
    assert (run / ".model.safetensors.verified.json").exists()  # the fast path is armed
    EDITS[edit](run)
    for query in ("GNU C compiler", "text editor"):
        res = cli("search", query, "--run", run.name, "--runs-dir", tmp_path / "runs")
        assert res.exit_code == 1, (edit, res.stdout)
        assert "does not match its recorded fingerprint" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_model_file_damaged_in_place_with_its_times_restored_is_refused(trained, tmp_path, cli):
    run = tmp_path / "runs" / trained.name
    shutil.copytree(trained, run)
    assert cli("search", "GNU C compiler", "--run", run.name, "--runs-dir", tmp_path / "runs").exit_code == 0
    path = run / "model.safetensors"
    st = path.stat()
    with open(path, "r+b") as fh:  # same size, same inode
        fh.seek(st.st_size - 64)
        byte = fh.read(1)
        fh.seek(st.st_size - 64)
        fh.write(bytes([byte[0] ^ 0x55]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time put back
    res = cli("search", "GNU C compiler", "--run", run.name, "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 1 and "model.safetensors" in res.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_lexical_weight_of_zero_is_refused_before_training(cli, tmp_path, how, monkeypatch):
    sample_pairs(tmp_path / "p.parquet", 50)
    if how == "env":
        monkeypatch.setenv("TWOTOWER_MODEL_LEXICAL_WEIGHT", "0")
        res = cli("train", tmp_path / "p.parquet", "--runs-dir", tmp_path / "runs")
    else:
        (tmp_path / "config.toml").write_text("[model]\nlexical_weight = 0.0\n")
        res = cli("train", tmp_path / "p.parquet", "--runs-dir", tmp_path / "runs", "--config",
                  tmp_path / "config.toml")
    assert res.exit_code == 1 and "lexical_weight" in res.stderr and "above 0 and below 1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "RuntimeWarning" not in res.stderr + res.stdout


def test_no_validation_split_says_so_and_chooses_nothing_on_it(cli, tmp_path):
    sample_pairs(tmp_path / "p.parquet", 200)
    res = cli("train", tmp_path / "p.parquet", "--val-fraction", "0", "--epochs", "1", "--no-report",
              "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.stderr
    assert "on the validation queries" not in res.stderr and "by val/mrr@10" not in res.stdout
    assert "lowest training loss (no validation split)" in res.stdout and "no test split" in res.stdout

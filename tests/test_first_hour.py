"""What a new user meets in the first hour, said as they would expect it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sample_pairs


def twotower(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twotower_cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "80", **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained offline with W&B into a runs folder that is not ./runs."""
    folder = tmp_path_factory.mktemp("hour")
    sample_pairs(folder / "pairs.parquet", 300)
    res = twotower("train", "pairs.parquet", "--epochs", "1", "--runs-dir", "data/runs", "--wandb", "--no-report",
                   cwd=folder, env={"WANDB_MODE": "offline", "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192"})
    assert res.returncode == 0, res.stderr
    return folder


def test_what_train_says_at_the_end(trained):
    res = twotower("train", "pairs.parquet", "--epochs", "1", "--runs-dir", "more/runs", "--no-report",
                   cwd=trained, env={"TWOTOWER_MODEL_NGRAM_BUCKETS": "8192"})
    assert res.returncode == 0, res.stderr
    assert ", 1 epoch\n" in res.stderr or ", 1 epoch," in res.stderr  # not "1 epochs"
    assert "search it: twotower search \"your query\" --runs-dir more/runs" in res.stdout
    assert "test queries, held out from training and from every choice" in res.stdout


def test_the_report_says_how_to_publish_with_the_runs_folder_and_a_path_that_works(trained, tmp_path):
    res = twotower("report", "--runs-dir", trained / "data" / "runs", "--entity", "me", cwd=tmp_path,
                   env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if "not published" in ln)
    assert "wandb sync " in line, res.stderr
    sync = line.split("wandb sync ", 1)[1].split(",", 1)[0]
    assert Path(sync).is_absolute() or (tmp_path / sync).exists()
    assert (Path(sync) if Path(sync).is_absolute() else tmp_path / sync).is_dir()
    assert f"--runs-dir {trained / 'data' / 'runs'}" in line
    page = (trained / "data" / "runs" / "latest" / "report.html").read_text()
    assert "An n-gram two-tower model" in page and "A ngram" not in page


def test_train_with_a_reading_flag_says_what_train_takes(trained):
    res = twotower("train", "pairs.parquet", "--run-id", "foo", cwd=trained)
    assert res.returncode == 2 and "--run-name NAME" in res.stderr and "--resume RUN" in res.stderr
    assert "--runs-dir" not in res.stderr.split("(usage")[0]


def test_index_says_when_it_stores_repeated_documents_once(trained):
    (trained / "dup.txt").write_text("one doc\ntwo doc\none doc\n")
    res = twotower("index", "dup.txt", "--name", "dup", "--runs-dir", "data/runs", cwd=trained)
    assert res.returncode == 0 and "1 of the 3 documents repeats an earlier one word for word" in res.stderr


def test_help_and_tables_fit_80_columns_and_nothing_is_cut_when_piped(trained):
    top = twotower("--help", cwd=trained).stdout
    commands = top.split("Commands:", 1)[1]
    assert "…" not in top and "..." not in commands
    for command in ("train", "search", "evaluate", "serve"):
        text = twotower(command, "--help", cwd=trained).stdout
        assert "…" not in text and "[default: " in text, command
    report = twotower("validate-data", "pairs.parquet", cwd=trained).stdout
    assert "…" not in report and "column" in report

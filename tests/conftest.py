"""Shared fixtures: real files in temporary folders, the real CLI through Typer's CliRunner."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "pairs.parquet"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with no TWOTOWER_*/WANDB_* variables leaking in."""
    for name in list(os.environ):
        if name.startswith(("TWOTOWER_", "WANDB_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli(runner):
    from twotower_cli.cli.main import app

    def invoke(*args, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return invoke


@pytest.fixture(scope="session")
def sample_df() -> pl.DataFrame:
    return pl.read_parquet(SAMPLE)


def sample_pairs(path: Path, positives: int) -> Path:
    """The first ``positives`` positive pairs of the shipped sample, plus their queries' negatives, as Parquet."""
    df = pl.read_parquet(SAMPLE)
    pos = df.filter(pl.col("label") == 1).head(positives)
    neg = df.filter((pl.col("label") == 0) & pl.col("query").is_in(pos["query"].implode()))
    pl.concat([pos, neg]).write_parquet(path)
    return path


@pytest.fixture
def tiny_pairs(tmp_path) -> Path:
    """600 positive pairs (plus their negatives) of real Debian text."""
    return sample_pairs(tmp_path / "tiny.parquet", 600)


def document_model(encode_documents, **cfg):
    """What `retrieval.build.write_folder` needs of a model, and no more: its settings, eval/train, and
    ``encode_documents`` (a function of the token ids)."""
    class Stub:
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def encode_documents(self, tokens):
            return encode_documents(tokens)

    Stub.cfg = type("cfg", (), {"output_dim": 4, "max_document_length": 16, **cfg})
    return Stub()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path

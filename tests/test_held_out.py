"""What training holds out and how it counts: validation and test queries grouped by the text the query tower
reads, the choices on one split and the figures on the other, the idf over what the exact lexical half reads,
batches that never leave a pair alone."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.conftest import SAMPLE
from twotower_cli.config import load_config
from twotower_cli.training import prepare as prep


def twin_file(path, n: int = 500):
    """``n`` queries, each twice: as written and as a case-and-space variant ('GCC compiler', 'gcc  COMPILER'),
    both paired with the same document; plus one random negative each."""
    df = pl.read_parquet(SAMPLE).filter(pl.col("label") == 1).unique("query", keep="first", maintain_order=True)
    df = df.head(n)  # (the same rows in every process: unique() without maintain_order picks them by thread timing)
    twins = df.with_columns(pl.col("query").str.to_uppercase().str.replace_all(" ", "  "))
    neg = df.with_columns(pl.col("document").shift(1).fill_null(df["document"][-1]), label=pl.lit(0, df["label"].dtype))
    pl.concat([df, twins, neg]).sample(fraction=1.0, seed=3).write_parquet(path)
    return path


def prepared(tmp_path, path, **train):
    cfg = load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "runs"),
                                         **{("train", k): v for k, v in train.items()}})
    return prep.prepare(cfg, path, None, None, None)


def seen(texts) -> set[str]:
    return {" ".join(t.lower().split()) for t in texts}


def test_a_query_and_its_twin_are_held_out_together(tmp_path):
    p = prepared(tmp_path, twin_file(tmp_path / "twins.parquet"), val_fraction=0.2)
    try:
        train_set = p.train_set
        val, test = (train_set.queries.gather(q.numpy()).to_list() for q in (train_set.val_q, train_set.test_q))
        trained = train_set.queries.gather(np.unique(train_set.pos_q.numpy())).to_list()
        assert len(val) >= 90 and len(test) >= 90
        assert not seen(val) & seen(trained) and not seen(test) & seen(trained) and not seen(val) & seen(test)
        assert len(val) == 2 * len(seen(val))  # both of each pair, on the same side
    finally:
        p.close()


def test_twins_do_not_flatter_the_reported_figures(cli, tmp_path):
    """With a twin of every validation query in training, validation was 0.99-1.0 against 0.78 without twins. Now
    the split is by what the towers read: the reported test figure is measured on queries no twin trained."""
    twin_file(tmp_path / "twins.parquet")
    res = cli("train", tmp_path / "twins.parquet", "--epochs", "2", "--embedding-dim", "32", "--hidden-dim", "32",
              "--no-report", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.stderr
    record = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    # a twin in training hands its query the answer (0.99-1.0); held out with it, 0.95 on this file
    assert record["test_queries"] >= 50 and record["test"]["test/mrr@10"] < 0.985, record["test"]
    assert "test queries, held out from training and from every choice" in res.stdout
    assert "the model alone" in res.stdout and "BM25" in res.stdout and "default search" in res.stdout


def test_old_runs_resume_on_their_own_ungrouped_split(tmp_path):
    """A run saved before grouping resumes on the split it trained on (by exact text, no test split)."""
    from twotower_cli.training.batches import from_rows
    from twotower_cli.data.stream import read_pairs_rows
    from twotower_cli.data.vocab import Vocab

    rows = read_pairs_rows(twin_file(tmp_path / "twins.parquet"), lowercase=True)
    vocab = Vocab.from_counts(rows.char_counts)
    old = from_rows(rows, vocab, 128, 256, 0.2, 13, grouped=False)
    new = from_rows(rows, vocab, 128, 256, 0.2, 13, test_fraction=0.05)
    assert len(old.test_q) == 0 and len(new.test_q) > 0
    expected = np.sort(np.random.default_rng(13).permutation(np.unique(rows.qid[rows.label == 1]))[:len(old.val_q)])
    assert old.val_q.tolist() == expected.tolist()


def test_the_idf_counts_what_the_exact_lexical_half_reads(tmp_path):
    """A word that appears only past the learned half's characters is counted in the idf (it was not: its exact
    lexical weight was the maximum idf, as if no document had it)."""
    import torch

    from twotower_cli.model.config import ModelConfig
    from twotower_cli.model.encode import lexical_tokens
    from twotower_cli.model.towers import TwoTower
    from twotower_cli.data.tokens import TokenTable
    from twotower_cli.data.vocab import Vocab

    docs = pl.Series(["filler " * 20 + "zebra"] * 3 + ["other words here"] * 3)
    vocab = Vocab.build([docs], 1, 100)
    cfg = ModelConfig(vocab_size=len(vocab), ngram_buckets=4096, hidden_dim=8, embedding_dim=8, idf=True,
                      lexical_dim=16, lexical_exact=True, max_document_length=40, lexical_document_length=400,
                      word_chars=[i + 2 for i, c in enumerate(vocab.chars) if c.isalnum()])
    model = TwoTower(cfg)
    table = TokenTable(docs, vocab, 40)
    model.set_idf(lexical_tokens(model, table), torch.arange(6))
    zebra = model.document_tower.selected_features(torch.from_numpy(vocab.encode(pl.Series(["zebra"]), 10)))
    bucket = model.document_tower.bucket(zebra[0], zebra[1])[zebra[1] == 1]  # the word's bucket
    idf = model.document_tower.idf[bucket]
    assert float(idf.max()) < float(model.document_tower.idf.max())  # three of six documents have it


def test_a_last_single_pair_joins_the_batch_before_it():
    from twotower_cli.training.batches import step_positions, steps_per_epoch

    assert steps_per_epoch(257, 256) == 1 and steps_per_epoch(258, 256) == 2 and steps_per_epoch(256, 256) == 1
    assert step_positions(0, 1, 256, 0, 256) == slice(0, None)  # all 257
    assert steps_per_epoch(1025, 256, processes=2) == 2  # under DDP: whole global batches
    order = list(range(513))
    steps = steps_per_epoch(513, 256)
    assert sorted(i for s in range(steps) for i in order[step_positions(s, steps, 256, 0, 256)]) == order


def test_257_pairs_at_batch_256_train_every_pair_and_finish_the_schedule(tmp_path):
    from twotower_cli.training.loop import Hooks
    from twotower_cli.training.pipeline import run_train

    df = pl.read_parquet(SAMPLE).filter(pl.col("label") == 1).unique("query", keep="first", maintain_order=True).head(257)
    df.write_parquet(tmp_path / "p.parquet")
    cfg = load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "runs"), ("train", "epochs"): 3,
                                         ("train", "val_fraction"): 0.0, ("train", "batch_size"): 256,
                                         ("model", "ngram_buckets"): 4096, ("train", "report"): False})
    steps = []

    class Record(Hooks):
        def step(self, record):
            steps.append(record)

    out = run_train(cfg, tmp_path / "p.parquet", Record(), lambda: False)
    assert [r["epoch"] for r in out.history] == [1, 2, 3]  # whole epochs, not 0.5
    logged = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in logged if "train/lr" in r]
    assert len(steps) == 3 and lrs == [0.01, 0.01, 0.005]  # every step taken: the schedule runs to its end


@pytest.mark.parametrize("value", ["1", "0"])
def test_batch_size_below_two_or_too_few_pairs_is_a_one_line_error(cli, tmp_path, value):
    df = pl.read_parquet(SAMPLE).head(40)
    df.write_parquet(tmp_path / "p.parquet")
    if value == "1":
        res = cli("train", tmp_path / "p.parquet", "--batch-size", "1", "--runs-dir", tmp_path / "runs")
        assert res.exit_code == 2 and "--batch-size must be between 2" in res.stderr
    else:
        df.filter(pl.col("label") == 1).head(1).write_parquet(tmp_path / "one.parquet")
        res = cli("train", tmp_path / "one.parquet", "--runs-dir", tmp_path / "runs")
        assert res.exit_code == 1 and "training needs at least 2" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "latest").exists()


def test_validate_data_strict_does_not_fail_on_long_documents(cli, tmp_path, monkeypatch):
    """Documents longer than max_document_length are a note about a model setting, not a defect of the data."""
    df = pl.read_parquet(SAMPLE).head(400)
    df.write_parquet(tmp_path / "p.parquet")
    monkeypatch.setenv("TWOTOWER_DATA_MAX_DOCUMENT_LENGTH", "50")
    res = cli("validate-data", tmp_path / "p.parquet", "--strict", "--json")
    report = json.loads(res.stdout)
    truncation = [f for f in report["findings"] if f["check"] == "document: truncation"]
    assert truncation and truncation[0]["level"] == "info" and "--max-document-length" in truncation[0]["message"]
    assert res.exit_code == (1 if any(f["level"] != "info" for f in report["findings"]) else 0)

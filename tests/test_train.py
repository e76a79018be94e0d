import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower_cli.config import load_config
from twotower_cli.model.artifacts import load_model
from twotower_cli.training.loop import Hooks
from twotower_cli.training.pipeline import run_train

SMALL = ["--embedding-dim", "32", "--hidden-dim", "64", "--batch-size", "64", "--max-document-length", "128",
         "--val-fraction", "0.1"]


def small_cfg(tmp_path, **train):
    cfg = load_config(env={}, overrides={("model", "embedding_dim"): 32, ("model", "hidden_dim"): 64,
                                         ("model", "ngram_buckets"): 16384, ("train", "batch_size"): 64,
                                         ("data", "max_document_length"): 128, ("train", "val_fraction"): 0.1,
                                         ("train", "runs_dir"): str(tmp_path / "runs"),
                                         **{("train", k): v for k, v in train.items()}})
    return cfg


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_a_complete_run(cli, tiny_pairs, tmp_path):
    res = cli("train", tiny_pairs, *SMALL, "--epochs", "4", "--runs-dir", tmp_path / "runs",
              "--learning-rate", "0.01", "--no-report")
    assert res.exit_code == 0, res.stderr
    run = (tmp_path / "runs" / "latest").resolve()
    for name in ("config.json", "vocab.json", "model.safetensors", "metrics.jsonl", "run.json",
                 "index/default/embeddings.npy", "index/default/bm25/bm25.json"):
        assert (run / name).exists(), name
    assert not (run / "checkpoint.safetensors").exists()  # a complete run keeps no resumable state
    epochs = [r for r in records(run) if "epoch/loss" in r]
    assert len(epochs) == 4
    assert epochs[-1]["epoch/loss"] < epochs[0]["epoch/loss"]
    import polars as pl

    model, vocab, _ = load_model(run)
    model.vocab = vocab
    pairs = pl.read_parquet(tiny_pairs).filter(pl.col("label") == 1).unique("query", keep="first").head(300)
    trained, untrained = (learned_mrr(m, pairs["query"].to_list(), pairs["document"].to_list(), learned_only=True)
                          for m in (model.eval(), untrained_twin(model)))
    assert trained > untrained + 0.05, (trained, untrained)  # the learned half, not only the fixed lexical one
    record = json.loads((run / "run.json").read_text())
    assert record["test_queries"] > 0 and 0 < record["test"]["test/search/mrr@10"] <= 1
    assert {"test/mrr@10", "test/bm25/mrr@10", "test/search/mrr@10"} <= set(records(run)[-1])
    steps = [r for r in records(run) if "train/loss" in r]
    assert {"train/pos_sim", "train/neg_sim", "train/sim_gap", "train/grad_norm", "train/lr", "perf/data_ms",
            "perf/forward_ms", "perf/backward_ms", "perf/optim_ms", "perf/pairs_per_s"} <= set(steps[0])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["embedding_dim"] == 32 and cfg["versions"]["torch"] == torch.__version__
    assert json.loads((run / "run.json").read_text())["complete"] is True
    assert "Best epoch" in res.stdout


def test_saved_model_reloads_to_identical_embeddings(cli, tiny_pairs, tmp_path):
    assert cli("train", tiny_pairs, *SMALL, "--epochs", "1", "--runs-dir", tmp_path / "runs", "--no-report").exit_code == 0
    run = (tmp_path / "runs" / "latest").resolve()
    import polars as pl

    model, vocab, _ = load_model(run)
    docs = pl.read_parquet(run / "index/default/documents/*.parquet")["document"]
    with torch.no_grad():
        again = model.encode_documents(torch.from_numpy(vocab.encode(docs, model.cfg.max_document_length)))
    saved = np.load(run / "index/default/embeddings.npy")  # (compact: the learned half only, the last columns)
    assert saved.shape == (len(docs), model.cfg.embedding_dim)
    np.testing.assert_allclose(again.numpy()[:, -saved.shape[1]:], saved, atol=1e-6)


def learned_mrr(model, queries, documents, learned_only=False) -> float:
    """MRR@10 of each query's own document among ``documents`` (by the learned part of the embeddings alone: the
    ngram model's fixed lexical half finds most of them untrained)."""
    from twotower_cli.evaluation.metrics import retrieval_metrics
    from twotower_cli.model.towers import TwoTower  # noqa: F401

    import polars as pl

    vocab = model.vocab
    with torch.no_grad():
        q = model.encode_queries(torch.from_numpy(vocab.encode(pl.Series(queries), model.cfg.max_query_length)))
        d = model.encode_documents(torch.from_numpy(vocab.encode(pl.Series(documents), model.cfg.max_document_length)))
    n = model.cfg.lexical_dim if learned_only else 0
    q, d = torch.nn.functional.normalize(q[:, n:], dim=1), torch.nn.functional.normalize(d[:, n:], dim=1)
    ranked = torch.topk(q @ d.T, 10, dim=1).indices.numpy()
    return retrieval_metrics(ranked, [{i: 1.0} for i in range(len(queries))], ("mrr@10",))["mrr@10"]


def untrained_twin(model):
    """A model of the same configuration at its initial weights, with the trained one's idf (not learned)."""
    from twotower_cli.model.towers import TwoTower

    torch.manual_seed(13)
    fresh = TwoTower(model.cfg)
    state = fresh.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k.endswith(("idf", "mean_words"))})
    fresh.load_state_dict(state)
    fresh.vocab = model.vocab
    return fresh.eval()


@pytest.mark.parametrize("encoder,loss,lr,epochs,negatives", [
    ("ngram", "infonce", 1e-2, 2, "none"), ("ngram", "triplet", 1e-2, 2, "bm25"), ("cnn", "infonce", 1e-3, 4, "none")])
def test_each_encoder_learns_the_pairs_it_is_shown(tiny_pairs, tmp_path, encoder, loss, lr, epochs, negatives):
    """The trained model ranks its training pairs well above the same model at its initial weights (the learned
    part of the embedding: the ngram model's fixed lexical half would pass untrained)."""
    import polars as pl

    cfg = small_cfg(tmp_path, epochs=epochs, loss=loss, learning_rate=lr, hard_negatives=negatives).with_overrides(
        {("model", "encoder"): encoder, ("data", "max_document_length"): 48})
    out = run_train(cfg, tiny_pairs, Hooks(), lambda: False)
    assert not out.interrupted and out.history[-1]["epoch/loss"] < out.history[0]["epoch/loss"]
    model, vocab, _ = load_model(out.run_dir)
    model.vocab = vocab
    pairs = pl.read_parquet(tiny_pairs).filter(pl.col("label") == 1).unique("query", keep="first").head(300)
    trained, untrained = (learned_mrr(m, pairs["query"].to_list(), pairs["document"].to_list(), learned_only=True)
                          for m in (model.eval(), untrained_twin(model)))
    assert trained > untrained + 0.05, (trained, untrained)


@pytest.mark.parametrize("encoder,loss", [("mean", "infonce"), ("mean", "triplet"), ("cnn", "triplet"),
                                          ("ngram", "triplet")])
def test_the_other_encoder_and_loss_pairs_run_end_to_end(tiny_pairs, tmp_path, encoder, loss):
    """The seed's character encoders and the triplet loss with random negatives learn little from 540 pairs (they
    are not asserted to learn: see benchmarks/RESULTS.md); they must still train, save and search."""
    from twotower_cli.errors import TrainingError

    cfg = small_cfg(tmp_path, epochs=2, loss=loss, learning_rate=1e-3).with_overrides(
        {("model", "encoder"): encoder, ("data", "max_document_length"): 48})
    try:
        out = run_train(cfg, tiny_pairs, Hooks(), lambda: False)
    except TrainingError as exc:  # refused as collapsed: kept, never made latest
        assert "collapsed" in str(exc) and not (tmp_path / "runs" / "latest").exists()
        return
    assert np.isfinite(out.history[-1]["epoch/loss"]) and out.search["mode"] in ("dense", "hybrid", "bm25")
    import twotower_cli

    assert len(twotower_cli.load(out.run_dir).search("text editor", k=3)[0]) == 3


@pytest.mark.parametrize("shared", [True, False])
def test_shared_table_is_stored_once_and_reloads_shared(tiny_pairs, tmp_path, shared):
    from twotower_cli.model.artifacts import read_tensors

    cfg = small_cfg(tmp_path, epochs=1, keep_checkpoint=True).with_overrides({("model", "shared_embeddings"): shared})
    out = run_train(cfg, tiny_pairs, Hooks(), lambda: False)
    for name in ("model.safetensors", "checkpoint.safetensors"):
        tensors, _ = read_tensors(out.run_dir / name)
        assert len([k for k in tensors if k.endswith("bag.weight")]) == (1 if shared else 2), name
    model, _, cfg_json = load_model(out.run_dir)
    assert cfg_json["model"]["shared_embeddings"] is shared
    q, d = model.query_tower, model.document_tower
    assert (q.bag.weight.data_ptr() == d.bag.weight.data_ptr()) is shared
    assert not torch.equal(q.proj.weight, d.proj.weight)  # the towers' own layers trained apart


def test_shared_table_is_looked_up_once_for_both_towers():
    from twotower_cli.model.towers import ModelConfig, TwoTower

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, embedding_dim=8, hidden_dim=16, ngram_buckets=512, max_query_length=12,
                      max_document_length=30, word_chars=list(range(2, 30)), shared_embeddings=True)
    model = TwoTower(cfg)
    q_ids = torch.randint(2, 40, (6, 12)) * (torch.rand(6, 12) > 0.2)
    d_ids = torch.randint(2, 40, (6, 30)) * (torch.rand(6, 30) > 0.2)

    def grads(embed):
        model.zero_grad(set_to_none=True)
        q, d = embed()
        ((q @ d.T) ** 2).sum().backward()
        return {n: p.grad.coalesce() if p.grad.is_sparse else p.grad for n, p in model.named_parameters()}

    joint = model.query_tower.bag.weight
    once = grads(lambda: model(q_ids, d_ids))
    n_rows = joint.grad._indices().shape[1]  # the training path's gradient, before coalescing
    twice = grads(lambda: (model.encode_queries(q_ids), model.encode_documents(d_ids)))
    assert n_rows == once["query_tower.bag.weight"]._indices().shape[1]  # no duplicate rows to coalesce
    for name, g in once.items():
        torch.testing.assert_close(g.to_dense(), twice[name].to_dense(), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_tokenising_on_demand_trains_the_same_model(tiny_pairs, tmp_path, monkeypatch):
    """On demand (what each torchrun process does, with its prefetch thread) gives the same batches as up front;
    worker processes start once and serve every epoch."""
    loaders = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *a, **kw):
            loaders.append(kw.get("num_workers"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    runs = {}
    for mode, workers in (("upfront", 0), ("on-demand", 0), ("on-demand", 2)):  # 2: worker processes (GPU default)
        cfg = small_cfg(tmp_path / f"{mode}{workers}", epochs=2, loader_workers=workers).with_overrides(
            {("data", "tokenize"): mode})
        runs[mode, workers] = run_train(cfg, tiny_pairs, Hooks(), lambda: False)
    assert loaders == [2]  # one loader of 2 workers for both epochs
    a, _, _ = load_model(runs["upfront", 0].run_dir)
    for key in (("on-demand", 0), ("on-demand", 2)):
        b, _, _ = load_model(runs[key].run_dir)
        for name, t in a.weights().items():
            torch.testing.assert_close(t, b.weights()[name], atol=1e-6, rtol=0, msg=f"{key} {name}")
        assert runs["upfront", 0].best["val/mrr@10"] == pytest.approx(runs[key].best["val/mrr@10"], abs=1e-6)


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_pairs, tmp_path):
    calls = []  # how often the loop asks whether to stop, so the interruptions land mid-run whatever the split
    full = run_train(small_cfg(tmp_path / "a", epochs=3), tiny_pairs, Hooks(), lambda: calls.append(1) and False)

    class StopAfter:
        def __init__(self, n):
            self.n = n

        def __call__(self):
            self.n -= 1
            return self.n < 0

    cfg = small_cfg(tmp_path / "b", epochs=3)
    first, second = len(calls) // 2, len(calls) // 3  # mid-epoch 2, then mid-epoch 3
    part = run_train(cfg, tiny_pairs, Hooks(), StopAfter(first))
    assert part.interrupted and not (tmp_path / "b" / "runs" / "latest").exists()
    part = run_train(cfg, None, Hooks(), StopAfter(second), resume=part.run_dir.name)  # interrupted again
    assert part.interrupted
    done = run_train(cfg, None, Hooks(), lambda: False, resume=part.run_dir.name)
    assert not done.interrupted
    for k, v in full.best.items():
        assert abs(done.best[k] - v) < 1e-5, k
    a, _, _ = load_model(full.run_dir)
    b, _, _ = load_model(done.run_dir)
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(t1, t2, atol=1e-5, rtol=0, msg=n1)
    steps = [r["step"] for r in records(done.run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice after the resumes


def test_a_run_saved_before_newer_settings_resumes_with_its_own_model_config(tiny_pairs, tmp_path):
    """An interrupted run from an older version: its config.json lacks settings added since (and the model key
    idf_power, which it trained at 1.0). It resumes without an error, rebuilt from the model config it saved."""
    stops = iter([False] * 3 + [True])
    cfg = small_cfg(tmp_path, epochs=2)
    part = run_train(cfg, tiny_pairs, Hooks(), lambda: next(stops, True))
    assert part.interrupted
    path = part.run_dir / "config.json"
    saved = json.loads(path.read_text())
    for key in ("val_min_queries", "val_max_queries"):
        del saved["settings"]["train"][key]
    del saved["settings"]["model"]["idf_power"], saved["model"]["idf_power"]
    del saved["settings"]["data"]["lexical_document_length"], saved["model"]["lexical_document_length"]
    path.write_text(json.dumps(saved))
    done = run_train(cfg, None, Hooks(), lambda: False, resume=part.run_dir.name)
    assert not done.interrupted
    model, _, _ = load_model(done.run_dir)
    assert model.cfg.idf_power == 1.0  # as it was trained, not today's default (0.75)
    assert model.cfg.lexical_length == model.cfg.max_document_length  # not today's 2,048 characters


def test_lexical_rows_read_their_own_length_of_the_same_texts():
    """`lexical_tokens`: the validation documents tokenised again to the exact lexical half's length (on demand),
    whether the table was tokenised up front, on demand, or is a subset."""
    from types import SimpleNamespace

    import polars as pl

    from twotower_cli.data.tokens import TokenTable
    from twotower_cli.data.vocab import Vocab
    from twotower_cli.model.config import ModelConfig
    from twotower_cli.model.encode import lexical_tokens

    texts = pl.Series([("GNU compiler İİ collection " * 9)[: 40 + 17 * i] for i in range(10)] + ["İ" * 150])
    vocab = Vocab.build([texts])
    model = SimpleNamespace(cfg=ModelConfig(max_document_length=64, lexical_document_length=200))
    for eager in (True, False):
        table = TokenTable(texts, vocab, 64, eager)
        for t, rows in ((table, texts), (table.subset(torch.tensor([7, 2])), texts.gather([7, 2]))):
            got = lexical_tokens(model, t)
            assert got.shape == (len(rows), 200)
            ids = got[0:len(rows)].numpy()  # as wide as the texts need ('İ' lowercases to two characters)
            assert ids.shape[1] <= 200 and (ids.shape[1] == 200 or (ids[:, -1] == 0).all())
            np.testing.assert_array_equal(np.pad(ids, ((0, 0), (0, 200 - ids.shape[1]))), vocab.encode(rows, 200))
    same = SimpleNamespace(cfg=ModelConfig(max_document_length=64))
    assert lexical_tokens(same, table) is table
    from twotower_cli.model.encode import document_tokens  # a long setting costs what the texts need, not more

    assert document_tokens(vocab, ["GNU", None], 1_000_000).shape == (2, 6)
    assert document_tokens(vocab, pl.Series(["GNU", "compiler"]), 1_000_000).shape == (2, 16)


def test_a_run_stopped_while_finishing_resumes_to_the_same_run(tiny_pairs, tmp_path, monkeypatch):
    """A stop after training (while the index is built: an hour for 10M documents on a CPU) leaves a run that
    `--resume` finishes: the model trained is kept, not trained again, and the run equals one never stopped."""
    from twotower_cli.retrieval import build

    full = run_train(small_cfg(tmp_path / "a", epochs=2), tiny_pairs, Hooks(), lambda: False)
    real = build.build_index

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_index", stopped)
    cfg = small_cfg(tmp_path / "b", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, tiny_pairs, Hooks(), lambda: False)
    run_dir = next(p for p in (tmp_path / "b" / "runs").iterdir() if not p.name.startswith("."))
    assert not (tmp_path / "b" / "runs" / "latest").exists() and (run_dir / "checkpoint.safetensors").exists()
    monkeypatch.setattr(build, "build_index", real)
    done = run_train(cfg, None, Hooks(), lambda: False, resume=run_dir.name)
    assert not done.interrupted and (tmp_path / "b" / "runs" / "latest").resolve() == run_dir
    steps = [r["step"] for r in records(done.run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps))  # nothing trained twice
    for name in ("config.json", "run.json"):  # the same choices: the lexical weight, the default search
        a_json, b_json = (json.loads((r / name).read_text()) for r in (full.run_dir, done.run_dir))
        for key in ("model", "lexical_choice", "search"):
            assert a_json.get(key) == b_json.get(key), (name, key)
    a, _, _ = load_model(full.run_dir)
    b, _, _ = load_model(done.run_dir)
    for name, t in a.weights().items():
        torch.testing.assert_close(t, b.weights()[name], atol=1e-6, rtol=0, msg=name)
    assert done.best == pytest.approx(full.best)


def test_a_stop_request_while_finishing_stops_at_once_and_says_how_to_finish(capsys):
    import os
    import signal

    import typer

    from twotower_cli.cli.train_cmd import StopFlag

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = StopFlag()
        stop.install()
        stop.arm()
        os.kill(os.getpid(), signal.SIGTERM)  # training: only asks the loop to stop after its step
        assert stop() and stop.signum == signal.SIGTERM
        stop.signum = None
        stop.finishing("20261128-120000-abcd")
        with pytest.raises(typer.Exit) as exit_:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exit_.value.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    err = capsys.readouterr().err
    assert "stopped while finishing the run" in err and "twotower train --resume 20261128-120000-abcd" in err


def test_epoch_lines_of_a_partial_epoch_say_the_step():
    from twotower_cli.cli.train_cmd import epoch_line

    assert epoch_line({"epoch": 2.0, "step": 80, "epoch/loss": 0.5}) == "epoch 2: loss 0.5000"
    assert epoch_line({"epoch": 0.0285307, "step": 100, "epoch/loss": 0.74, "val/mrr@10": 0.7}) == \
        "epoch 0.0285 (step 100): loss 0.7400  val/mrr@10 0.7000"


def test_seed_spelling_aliases_and_settings(cli, tiny_pairs, tmp_path):
    res = cli("train", tiny_pairs, "--batch_size", "32", "--learning_rate", "0.002", "--epochs", "1",
              "--embedding_dim", "16", "--hidden_dim", "32", "--max-document-length", "64",
              "--runs-dir", tmp_path / "runs", "--no-report")
    assert res.exit_code == 0, res.stderr
    cfg = json.loads(((tmp_path / "runs" / "latest").resolve() / "config.json").read_text())
    assert cfg["settings"]["train"]["batch_size"] == 32 and cfg["settings"]["train"]["learning_rate"] == 0.002


@pytest.mark.parametrize("args,needle,code", [
    (["--epochs", "-1"], "--epochs must be between 0 and", 2),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto, got 'tpu'", 2),
    (["--loss", "hinge"], "--loss must be one of 'infonce', 'triplet', got 'hinge'", 2),
    (["--tokenize", "later"], "--tokenize must be one of", 2),
    (["--learning-rate", "1e9"], "--learning-rate must be above 0 and at most 10", 2),
    (["--run-name", "../../x"], "--run-name must be a plain name", 2),
])
def test_bad_options_are_clear_errors(cli, tiny_pairs, tmp_path, args, needle, code):
    res = cli("train", tiny_pairs, "--runs-dir", tmp_path / "runs", *args)
    assert res.exit_code == code and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "runs" / "latest").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_but_absent(cli, tiny_pairs, tmp_path):
    res = cli("train", tiny_pairs, "--device", "cuda", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tiny_pairs, tmp_path):
    env = {**os.environ, "TWOTOWER_TRAIN_CHECKPOINT_MINUTES": "0"}
    cmd = [sys.executable, "-m", "twotower_cli", "train", str(tiny_pairs), *SMALL, "--epochs", "200",
           "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "twotower train --resume" in err and "Traceback" not in err
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert (run / "checkpoint.safetensors").exists()


def test_settings_of_the_exact_lexical_half_set_for_a_model_without_one_are_noted():
    from twotower_cli.config import load_config
    from twotower_cli.training.prepare import unused_settings

    def notes(env, lead=None):
        return unused_settings(load_config(env=env, overrides={("model", "lead_characters"): lead}))

    assert notes({}) == [] and notes({}, 50) == []  # the default model reads it
    mean = notes({"TWOTOWER_MODEL_ENCODER": "mean"}, 50)
    assert mean == ["--lead-characters 50 has no effect: --encoder mean has no lexical half"]
    flat = notes({"TWOTOWER_MODEL_LEXICAL_DIM": "0", "TWOTOWER_DATA_LEXICAL_DOCUMENT_LENGTH": "500"})
    assert len(flat) == 1 and flat[0].startswith("--lexical-document-length 500 has no effect")
    assert notes({"TWOTOWER_MODEL_ENCODER": "cnn"}) == []  # defaults are never noted

"""DDP on CPU with gloo and 2 processes: gathered negatives carry the right gradients, and a torchrun run
trains the same model as one process with the combined batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

B = 24  # per process


def setup_training(tiny_pairs, eager=True):
    from twotower_cli.config import load_config
    from twotower_cli.data.pairs import load_pairs, require_trainable
    from twotower_cli.data.vocab import Vocab
    from twotower_cli.model.towers import TwoTower
    from twotower_cli.training.batches import build
    from twotower_cli.training.loop import sample_negatives
    from twotower_cli.training.pipeline import model_config

    cfg = load_config(env={}, overrides={("model", "embedding_dim"): 16, ("model", "hidden_dim"): 32,
                                         ("model", "ngram_buckets"): 2048, ("data", "max_document_length"): 64})
    df = require_trainable(load_pairs(tiny_pairs))
    vocab = Vocab.build([df["query"], df["document"]], 1, 2000, True)
    train_set = build(df, vocab, 64, 64, 0.0, 13, eager=eager)
    torch.manual_seed(0)
    model = TwoTower(model_config(cfg, vocab))
    return cfg, train_set, model, sample_negatives(train_set, 13, 0)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}


def worker(rank, world, init_file, tiny_pairs, out_dir):
    import torch.distributed as dist

    from twotower_cli.training.batches import make_batch
    from twotower_cli.training.distributed import Dist, reduce_sparse, wrap
    from twotower_cli.training.loop import batch_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg, train_set, model, negs = setup_training(tiny_pairs, eager=False)  # as under torchrun: tokenise on demand
    net = wrap(model, torch.device("cpu"))  # what training does under NCCL too: the table is reduced by gathering
    idx = torch.arange(rank * B, (rank + 1) * B)
    batch = make_batch(train_set, idx, negs, cfg.train.loss)
    loss, _ = batch_loss(net, batch, cfg.train, Dist(rank, world, 0, torch.device("cpu"), "gloo"))
    loss.backward()
    table = model.query_tower.bag.weight
    assert table.grad.is_sparse and table.grad._indices().shape[1] < table.shape[0]  # this process's rows only
    reduce_sparse(model, world)
    torch.save(grads_of(model), Path(out_dir) / f"grads{rank}.pt")
    # this process tokenised its own slice of the global batch, nothing else
    tokenised = {"queries": train_set.q_tokens.rows_tokenised, "documents": train_set.d_tokens.rows_tokenised,
                 "batch_documents": int(batch.d_tokens.shape[0]), "all_documents": len(train_set.d_tokens)}
    (Path(out_dir) / f"tokenised{rank}.json").write_text(json.dumps(tokenised))
    dist.destroy_process_group()


def test_idf_counted_in_shares_and_added_up_equals_one_count(tiny_pairs):
    """Under torchrun each process counts every world-th document and the counts are all-reduced (`Dist.add_up`);
    here three shares are added by hand: the idf and mean words equal one process counting every document."""
    _, train_set, one, _ = setup_training(tiny_pairs)
    rows = torch.arange(len(train_set.documents))
    one.set_idf(train_set.d_tokens, rows, batch_size=50)
    counts = []
    for rank in range(3):
        _, _, m, _ = setup_training(tiny_pairs)
        m.set_idf(train_set.d_tokens, rows, batch_size=50, share=(rank, 3, lambda c: counts.append(c.clone())))
    _, _, shared, _ = setup_training(tiny_pairs)
    shared.set_idf(train_set.d_tokens, rows, batch_size=50, share=(0, 3, lambda c: c.copy_(sum(counts))))
    assert not torch.equal(counts[0], sum(counts))  # each share counted only its own documents
    for name in ("idf", "mean_words"):
        assert torch.equal(getattr(shared.document_tower, name), getattr(one.document_tower, name)), name
    assert one.document_tower.idf.max() > one.document_tower.idf.min()


def test_gathered_negatives_give_the_combined_batch_gradients(tiny_pairs, tmp_path):
    from twotower_cli.training.batches import make_batch
    from twotower_cli.training.loop import batch_loss

    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tiny_pairs), str(tmp_path)), nprocs=2, join=True)
    cfg, train_set, model, negs = setup_training(tiny_pairs)  # one process, tokenised up front
    loss, _ = batch_loss(model, make_batch(train_set, torch.arange(2 * B), negs, cfg.train.loss), cfg.train)
    loss.backward()
    single = grads_of(model)
    for rank in range(2):
        ddp = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)  # our own test file
        for name, g in single.items():
            torch.testing.assert_close(ddp[name], g, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {name}")
        seen = json.loads((tmp_path / f"tokenised{rank}.json").read_text())
        assert seen["queries"] == B and seen["documents"] == seen["batch_documents"] < seen["all_documents"]


def loss_worker(rank, world, init_file, tiny_pairs, out_dir):
    """Without gathering, each process's InfoNCE loss is over its own batch only."""
    import torch.distributed as dist

    from twotower_cli.training.batches import make_batch
    from twotower_cli.training.distributed import Dist, wrap
    from twotower_cli.training.loop import batch_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg, train_set, model, negs = setup_training(tiny_pairs, eager=False)
    cfg = cfg.with_overrides({("train", "gather_negatives"): False})
    batch = make_batch(train_set, torch.arange(rank * B, (rank + 1) * B), negs, cfg.train.loss)
    loss, _ = batch_loss(wrap(model, torch.device("cpu")), batch, cfg.train, Dist(rank, world, 0, torch.device("cpu"), "gloo"))
    (Path(out_dir) / f"loss{rank}.json").write_text(json.dumps(float(loss.detach())))
    dist.destroy_process_group()


def test_without_gathering_each_process_sees_only_its_own_batch(tiny_pairs, tmp_path):
    from twotower_cli.training.batches import make_batch
    from twotower_cli.training.loop import batch_loss

    mp.spawn(loss_worker, args=(2, str(tmp_path / "init"), str(tiny_pairs), str(tmp_path)), nprocs=2, join=True)
    cfg, train_set, model, negs = setup_training(tiny_pairs)
    for rank in range(2):
        own, _ = batch_loss(model, make_batch(train_set, torch.arange(rank * B, (rank + 1) * B), negs, cfg.train.loss),
                            cfg.train)
        assert json.loads((tmp_path / f"loss{rank}.json").read_text()) == pytest.approx(float(own.detach()),
                                                                                         rel=1e-5, abs=1e-6)
    both, _ = batch_loss(model, make_batch(train_set, torch.arange(2 * B), negs, cfg.train.loss), cfg.train)
    assert float(both.detach()) > float(own.detach())  # the combined batch would be a harder problem


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_trains_one_run_matching_a_single_process(tiny_pairs, tmp_path):
    B = 27  # 540 training pairs = 10 global batches of 2 x 27
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    # bm25 hard negatives: rank 0 mines and sends the lists; the ragged negatives are gathered too
    common = ["--epochs", "1", "--val-fraction", "0.1", "--embedding-dim", "16", "--hidden-dim", "32",
              "--max-document-length", "64", "--no-report", "--device", "cpu", "--hard-negatives", "bm25"]
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "4096", "OMP_NUM_THREADS": "1",
           "TWOTOWER_TRAIN_VAL_MIN_QUERIES": "0", "TWOTOWER_TRAIN_TEST_FRACTION": "0"}
    single = subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(tiny_pairs), *common,
                             "--batch-size", str(2 * B), "--runs-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    one = (tmp_path / "one" / "latest").resolve()
    n = json.loads((one / "config.json").read_text())["data"]["train_pairs"]
    assert n % (2 * B) == 0, "the comparison needs whole global batches (DDP drops a ragged last batch)"
    multi = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "twotower_cli", "train", str(tiny_pairs),
                            *common, "--batch-size", str(B), "--runs-dir", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    runs = [p for p in (tmp_path / "two").iterdir() if not p.is_symlink()]
    assert len(runs) == 1  # one run folder, written by rank 0
    two = runs[0]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        if name.endswith("bag.weight"):  # sparse Adam: an entry whose gradient is ~0 moves by up to a step (lr
            # 0.01) either way, so float sums added in another order (another CPU's kernels) can flip a few of them
            far = (a[name] - b[name]).abs() > 2e-4 + 1e-3 * b[name].abs()
            assert int(far.sum()) <= a[name].numel() // 10_000 and float((a[name] - b[name]).abs().max()) <= 0.01
            continue
        torch.testing.assert_close(a[name], b[name], atol=2e-4, rtol=1e-3, msg=name)
    assert (two / "metrics.jsonl").read_text().count("epoch/loss") == 1
    assert (two / "hard_negatives_epoch0.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_sigterm_stops_every_process_with_a_checkpoint_and_torchrun_resumes(tiny_pairs, tmp_path):
    import signal
    import time

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = [torchrun, "--nproc_per_node", "2", "-m", "twotower_cli", "train", str(tiny_pairs), "--device", "cpu",
            "--epochs", "30", "--batch-size", "32", "--embedding-dim", "16", "--hidden-dim", "32",
            "--max-document-length", "64", "--no-report", "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "4096", "OMP_NUM_THREADS": "1",
           "TWOTOWER_TRAIN_VAL_MIN_QUERIES": "0"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training is under way (two epochs logged)
        logs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if logs and logs[0].read_text().count("epoch/loss") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun passes it on to both workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    run = logs[0].parent
    assert len([p for p in (tmp_path / "runs").iterdir()]) == 1  # no runs/latest: the run is not complete
    assert (run / "checkpoint.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["complete"] is False
    assert f"torchrun --nproc_per_node 2 -m twotower_cli train --resume {run.name}" in err
    again = subprocess.run([*args[:5], "train", "--resume", run.name, "--device", "cpu", "--runs-dir",
                            str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["complete"] is True
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines() if "epoch/loss" in x]
    assert epochs == list(range(1, 31))  # every epoch once, across the stop


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_index_is_the_index_one_process_builds(tiny_pairs, tmp_path):
    """Chunks of 7 rows dealt to 2 processes (a repeated document in chunks of both ranks), rank 0 assembling:
    the same rows, texts, ids, embeddings and exact lexical rows as `twotower index` in one process."""
    import numpy as np
    import polars as pl

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "4096", "OMP_NUM_THREADS": "1"}
    train = subprocess.run([sys.executable, "-m", "twotower_cli", "train", str(tiny_pairs), "--epochs", "1",
                            "--embedding-dim", "16", "--hidden-dim", "32", "--max-document-length", "64",
                            "--no-report", "--device", "cpu", "--runs-dir", str(tmp_path / "runs")],
                           capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    docs = pl.read_parquet(tiny_pairs)["document"].unique(maintain_order=True).head(40).to_list()
    docs = docs + docs[3:5] + ["a document only once"] + docs[10:12]  # repeats in chunks that rank 1 embeds
    corpus = tmp_path / "corpus.parquet"
    pl.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "document": docs}).write_parquet(corpus)
    args = ["-m", "twotower_cli", "index", str(corpus), "--id-col", "id", "--chunk-rows", "7", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs")]
    one = subprocess.run([sys.executable, *args, "--name", "one"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", *args, "--name", "two"], capture_output=True,
                         text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "with 2 processes" in two.stderr
    base = (tmp_path / "runs" / "latest").resolve() / "index"
    a, b = base / "one", base / "two"
    assert not [p.name for p in base.iterdir() if ".shards-" in p.name]  # no shard folder left behind
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert meta_a["count"] == meta_b["count"] == 41 and meta_a["lexical"]["nnz"] == meta_b["lexical"]["nnz"]
    assert meta_a["layout"] == meta_b["layout"] == "compact"
    for name in ("texts.bin", "ids.bin", "texts.offsets.npy", "postings.indptr.npy", "postings.docs.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    np.testing.assert_allclose(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"), atol=1e-6)
    weights = [np.load(p / "postings.weights.npy").astype(np.int64) * m["lexical"]["weight_scale"]
               for p, m in ((a, meta_a), (b, meta_b))]
    np.testing.assert_allclose(*weights, atol=2 * meta_a["lexical"]["weight_scale"])  # (a step or two)

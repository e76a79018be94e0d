"""Each promise an adversarial test and a review broke (issue 17), held by a test that failed before the fix."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import SAMPLE, document_model, sample_pairs, write
from twotower_cli.retrieval.meta_file import meta_digest

ENV = {"TWOTOWER_MODEL_NGRAM_BUCKETS": "8192", "TWOTOWER_MODEL_HIDDEN_DIM": "32", "TWOTOWER_MODEL_EMBEDDING_DIM": "16",
       "TWOTOWER_MODEL_LEXICAL_DIM": "64", "TWOTOWER_DATA_MAX_DOCUMENT_LENGTH": "128"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A runs folder with one small complete run (copied by tests that damage it)."""
    folder = tmp_path_factory.mktemp("g")
    sample_pairs(folder / "pairs.parquet", 400)
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "2",
                          "--no-report"], cwd=folder, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return folder


@pytest.fixture
def runs(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained runs folder, as ./runs."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    shutil.copytree(trained / "runs", tmp_path / "runs", symlinks=True)
    shutil.copy(trained / "pairs.parquet", tmp_path / "pairs.parquet")
    return tmp_path / "runs"


def one_line(res, code: int, *needles: str, after_progress: bool = False) -> None:
    """Exit code ``code`` and the error as one line (the last line of stderr after training's progress lines)."""
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = res.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert after_progress or len(lines) == 1, res.stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1, res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


# -- F1, F2, F3: inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["query\tdocument\tlabel\nq1\tthe first document\t1\nq2\tthe second one\t0\n",
                                  "q1\tthe first document\t1\nq2\tthe second one\t0\n",
                                  "q1\tthe first document\nq2\tthe second one\n"])
def test_f1_index_of_a_pairs_tsv_indexes_its_documents(cli, runs, tmp_path, text):
    path = write(tmp_path / "pairs.tsv", text)
    res = cli("index", path, "--name", "p")
    assert res.exit_code == 0, res.stderr
    docs = pl.read_parquet((runs / "latest").resolve() / "index/p/documents/*.parquet")["document"].to_list()
    assert docs == ["the first document", "the second one"]


def test_f2_query_files_with_tabs_nul_and_odd_lines(cli, runs, tmp_path):
    """A one-a-line query file is read line by line: a tab or NUL is part of a query, an empty line is skipped."""
    path = write(tmp_path / "q.txt", "gnu compiler\nnul\x00inside\ttab field\n\n   odd  \n")
    res = cli("search", "--queries", path, "--json", "-k", "1")
    assert res.exit_code == 0, res.stderr
    queries = [r["query"] for r in json.loads(res.stdout)["results"]]
    assert len(queries) == 3 and queries[0] == "gnu compiler" and "tab field" in queries[1] and "odd" in queries[2]


def test_f3_an_unreadable_file_is_one_line_exit_1(cli, tmp_path, monkeypatch):
    path = write(tmp_path / "pairs.tsv", "q\td\t1\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real(p, mode))
    one_line(cli("validate-data", path), 1, "permission denied")


# -- F4: evaluation folders -----------------------------------------------------------------------------------------

def beir(folder: Path, qrels: str | None) -> Path:
    write(folder / "corpus.jsonl", '{"_id": "d1", "text": "a document"}\n{"_id": "d2", "text": "another"}\n')
    write(folder / "queries.jsonl", '{"_id": "q1", "text": "document"}\n{"_id": "q1", "text": "again"}\n')
    if qrels is not None:
        write(folder / "qrels" / "test.tsv", qrels)
    return folder


@pytest.mark.parametrize("case,needle", [("empty", "qrels/test.tsv: file is empty"),
                                         ("dir", "test.tsv: is not a file"),
                                         ("noqueries", "no judged query")])
def test_f4_damaged_evaluation_folders_name_the_file(cli, runs, tmp_path, case, needle):
    folder = beir(tmp_path / "ev", "" if case == "empty" else None if case == "dir" else
                  "query-id\tcorpus-id\tscore\nqX\td1\t1\n")
    if case == "dir":
        (folder / "qrels" / "test.tsv").mkdir(parents=True)
    one_line(cli("evaluate", folder), 1, needle)


def test_f4_duplicate_query_ids_and_missing_documents_are_noted(cli, runs, tmp_path):
    folder = beir(tmp_path / "ev", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    res = cli("evaluate", folder, "--json")
    assert res.exit_code == 0, res.stderr
    assert "duplicate query ids" in res.stderr and "not in the corpus" in res.stderr
    recall = json.loads(res.stdout)["systems"][0]["metrics"]["recall@100"]
    assert recall == pytest.approx(0.5)  # d9 counts as relevant and not found


def test_f4_parquet_layout_errors_name_the_file(cli, runs, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pl.DataFrame({"query_id": ["q1"], "query": ["x"]}).write_parquet(folder / "queries.parquet")
    pl.DataFrame({"doc_id": ["d1"], "text": ["y"]}).write_parquet(folder / "corpus.parquet")
    pl.DataFrame({"query_id": ["q1"], "doc_id": ["d1"]}).write_parquet(folder / "qrels.parquet")
    one_line(cli("evaluate", folder), 1, "corpus.parquet: missing column(s) document")


# -- F5: W&B falls back offline with a real refusing and a real silent server ---------------------------------------

def refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


@pytest.mark.slow
@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_f5_wandb_fallback_keeps_the_run(tmp_path, server):
    silent = None
    if server == "refusing":
        port = refusing_port()
    else:
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts, never answers
        port = silent.getsockname()[1]
    df = pl.read_parquet(SAMPLE).head(300)
    df.write_parquet(tmp_path / "p.parquet")
    env = {**os.environ, **ENV, "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_MODE": "online",
           "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "TWOTOWER_WANDB_INIT_TIMEOUT": "5"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "p.parquet", "--epochs", "1", "--wandb",
                          "--no-report"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if silent:
        silent.close()
    assert res.returncode == 0, res.stderr[-2000:]
    assert "logging offline instead" in res.stderr and "wandb sync" in res.stderr
    run = (tmp_path / "runs" / "latest").resolve()
    assert json.loads((run / "run.json").read_text())["wandb_mode"] == "offline"
    assert list((run / "wandb").glob("offline-run-*"))


# -- F6, F14: names and paths stay inside the runs folder ---------------------------------------------------------

@pytest.mark.parametrize("name", ["/abs/x", "../../x", "a\nb", ".hidden", "x/y"])
def test_f6_run_names_cannot_leave_the_runs_folder(cli, runs, name):
    latest = (runs / "latest").resolve()
    res = cli("train", runs.parent / "pairs.parquet", "--run-name", name)
    one_line(res, 2, "--run-name must be a plain name")
    assert (runs / "latest").resolve() == latest


def test_f14_runs_and_latest_outside_the_folder_are_refused(cli, runs, tmp_path):
    outside = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, outside, symlinks=True)
    target = (outside / "latest").resolve()
    one_line(cli("report", "--run-id", str(target)), 2, "outside the runs folder")
    (runs / "latest").unlink()
    os.symlink(target, runs / "latest")
    one_line(cli("search", "x"), 1, "points outside")
    (runs / "latest").unlink()
    os.symlink("latest", runs / "latest")
    one_line(cli("search", "x"), 1, "symbolic link loop")


def test_a_run_named_by_its_folder_is_read_wherever_it_is_and_written_only_in_the_runs_folder(cli, runs, tmp_path):
    outside = tmp_path / "data" / "runs"
    shutil.copytree(runs, outside, symlinks=True)
    folder = (outside / "latest").resolve()
    for named in (str(folder), "data/runs/latest", str(outside / "latest")):
        res = cli("search", "tar archive", "--run", named, "--json", "-k", "2")
        assert res.exit_code == 0 and len(json.loads(res.stdout)["results"][0]["hits"]) == 2, (named, res.stderr)
    import twotower_cli

    assert twotower_cli.load(folder).search("tar archive", k=1)[0]
    corpus = write(tmp_path / "c.txt", "one document\ntwo\n")
    one_line(cli("index", corpus, "--run", str(folder), "--name", "x"), 2, "writes into the run")
    one_line(cli("search", "x", "--run", "data/runs"), 2, "is a runs folder, not a run")
    one_line(cli("search", "x", "--run", "nope", "--runs-dir", tmp_path / "missing"), 1, "there is no runs folder")


# -- F7, F8: the index swap and temporary files -------------------------------------------------------------------

def test_f7_a_kill_between_the_renames_is_recovered(cli, runs):
    index = (runs / "latest").resolve() / "index"
    os.replace(index / "default", index / ".default.old-99999")  # the old index moved aside, the new one not in
    res = cli("search", "gnu compiler", "--json")
    assert res.exit_code == 0, res.stderr
    assert (index / "default" / "meta.json").exists() and not (index / ".default.old-99999").exists()


def test_f8_stale_temporary_files_are_removed_by_the_next_writer(cli, runs, tmp_path):
    """Only this index's: another index's folder being written (`.other.tmp-PID`, `.default.v2.tmp-PID` of the
    index named `default.v2`) may belong to a live writer of that index."""
    run = (runs / "latest").resolve()
    stale = [run / "index" / ".default.tmp-424242", run / "index" / ".default.old-1"]
    others = [run / "index" / ".other.tmp-424243", run / "index" / ".default.v2.tmp-424244"]
    for d in stale + others:
        d.mkdir()
        (d / "embeddings.npy").write_bytes(b"x" * 1000)
    corpus = write(tmp_path / "c.txt", "one document\nanother document\n")
    assert cli("index", corpus, "--name", "default").exit_code == 0
    assert not any(d.exists() for d in stale) and all(d.exists() for d in others)


def test_f8_a_killed_bm25_builders_folder_is_removed_and_a_live_ones_kept(cli, runs):
    index = (runs / "latest").resolve() / "index" / "default"
    shutil.rmtree(index / "bm25")  # built again from the texts at the next BM25 search
    dead, live = index / ".bm25.tmp-4194303", index / f".bm25.tmp-{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
    assert cli("search", "gnu compiler", "--mode", "bm25").exit_code == 0
    assert (index / "bm25" / "bm25.json").exists() and not dead.exists() and live.exists()


def test_f8_resume_removes_half_written_checkpoints(tmp_path):
    from twotower_cli.config import load_config
    from twotower_cli.training.loop import Hooks
    from twotower_cli.training.pipeline import run_train

    df = pl.read_parquet(SAMPLE).head(400)
    df.write_parquet(tmp_path / "p.parquet")
    cfg = load_config(env={}, overrides={("train", "runs_dir"): str(tmp_path / "runs"), ("train", "epochs"): 2,
                                         ("model", "ngram_buckets"): 4096, ("model", "lexical_dim"): 64})
    calls = iter(range(100))
    part = run_train(cfg, tmp_path / "p.parquet", Hooks(), lambda: next(calls) >= 1)
    assert part.interrupted
    junk = part.run_dir / ".checkpoint.safetensors.abc123.tmp"
    junk.write_bytes(b"\0" * 4096)
    done = run_train(cfg, None, Hooks(), lambda: False, resume=part.run_dir.name)
    assert not done.interrupted and not junk.exists()


def test_a_second_writer_of_an_index_gets_one_line(cli, runs, tmp_path):
    import subprocess
    import sys

    from twotower_cli.retrieval.index import lock_path

    run = (runs / "latest").resolve()
    corpus = write(tmp_path / "c.txt", "one document\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from twotower_cli.runs import Lock; "
                               f"held = Lock({str(lock_path(run, 'busy'))!r}, 'index'); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line(cli("index", corpus, "--name", "busy"), 1, f"another twotower process (pid {holder.pid}")
    finally:
        holder.communicate("")
    assert cli("index", corpus, "--name", "busy").exit_code == 0


# -- F9, F10: damaged artifacts ------------------------------------------------------------------------------------

def damage(run: Path, what: str) -> None:
    index = run / "index" / "default"
    if what == "metrics":
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write("[1, 2, 3]\nnull\n{\"step\": \"x\"}\n")
    elif what == "empty_embeddings":
        (index / "embeddings.npy").write_bytes(b"")
    elif what == "short_documents":
        offsets = np.load(index / "texts.offsets.npy")
        np.save(index / "texts.offsets.npy", offsets[:-2])
    elif what == "faiss_missing":  # (FAISS searches the full layout: the default index is rebuilt in it first)
        import twotower_cli

        model = twotower_cli.load(run)
        model.index_documents(model.index.all_documents(), "default", model.index.ids.range(0, model.index.count),
                              layout="full")
        meta = json.loads((index / "meta.json").read_text())
        meta.update(backend="faiss", faiss={"ef_search": 128})
        meta["meta_sha256"] = meta_digest(meta)  # the file as a FAISS build writes it: only the graph is missing
        (index / "meta.json").write_text(json.dumps(meta))
    elif what == "version_string":
        cfg = json.loads((run / "config.json").read_text())
        cfg["format_version"] = "1"
        (run / "config.json").write_text(json.dumps(cfg))
    elif what in ("lead_weight", "lead_nan"):  # config.json edited: the opening's weight changes the lexical rows
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"].update(lead_characters=100, lead_weight=float("nan") if what == "lead_nan"
                            else cfg["model"]["lead_weight"] + 0.2)
        (run / "config.json").write_text(json.dumps(cfg))
    elif what == "nan":
        emb = np.load(index / "embeddings.npy")
        emb[0, :] = np.nan
        np.save(index / "embeddings.npy", emb)
        meta = json.loads((index / "meta.json").read_text())
        import hashlib

        meta["sha256"] = hashlib.sha256(emb.tobytes()).hexdigest()  # the checksum agrees: only the values are bad
        meta["meta_sha256"] = meta_digest(meta)
        (index / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("what,needle", [("empty_embeddings", "embeddings.npy"), ("short_documents", "texts.offsets.npy"),
                                         ("faiss_missing", "faiss.index"), ("version_string", "format_version"),
                                         ("nan", "non-finite"), ("lead_weight", "recorded fingerprint"),
                                         ("lead_nan", "lead_weight is nan")])
def test_f9_f10_damaged_artifacts_name_the_file_and_nan_is_never_served(cli, runs, what, needle):
    assert cli("search", "gnu compiler", "--json", "--mode", "dense").exit_code == 0  # verified once (a marker)
    damage((runs / "latest").resolve(), what)
    res = cli("search", "gnu compiler", "--json", "--mode", "dense")
    one_line(res, 1, needle)
    assert res.stdout == ""  # nothing half printed, never NaN


def test_f9_damaged_metric_lines_are_skipped(cli, runs):
    damage((runs / "latest").resolve(), "metrics")
    assert cli("report").exit_code == 0


def test_f9_a_config_without_settings_cannot_be_resumed(cli, runs):
    run = (runs / "latest").resolve()
    cfg = json.loads((run / "config.json").read_text())
    del cfg["settings"]
    (run / "config.json").write_text(json.dumps(cfg))
    run_json = json.loads((run / "run.json").read_text())
    run_json["complete"] = False
    (run / "run.json").write_text(json.dumps(run_json))
    one_line(cli("train", "--resume", run.name), 1, "no 'settings'")


# -- F11: numbers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("toml,needle", [
    ("[train]\nwarmup_fraction = nan\n", "train.warmup_fraction"),
    ("[train]\nweight_decay = -1\n", "train.weight_decay"),
    ("[train]\nlog_every = 0\n", "train.log_every"),
    ("[model]\nngram_buckets = 0\n", "model.ngram_buckets"),
    ("[model]\ncnn_widths = \"abc\"\n", "model.cnn_widths"),
    ("[search]\ntop_k = 0\n", "search.top_k"),
    ("[search]\ntop_k = -5\n", "search.top_k"),
    ("[search]\nhybrid_weight = nan\n", "search.hybrid_weight"),
    ("[train]\nlearning_rate = 1e9\n", "train.learning_rate"),
])
def test_f11_every_setting_is_checked_when_the_configuration_loads(cli, runs, toml, needle):
    write(runs.parent / "config.toml", toml)
    for args in (["search", "x"], ["config"]):
        one_line(cli(*args), 1, needle, "config.toml")


def test_f11_a_divergence_blames_the_temperature_and_says_what_is_kept(cli, runs):
    res = cli("train", runs.parent / "pairs.parquet", "--temperature", "1e-30", "--epochs", "1")
    one_line(res, 1, "raise --temperature", "holds no model", after_progress=True)


# -- F12, F13: reading never writes; messages say what is true -------------------------------------------------------

def test_f12_hybrid_search_on_a_read_only_run(cli, runs, monkeypatch):
    run = (runs / "latest").resolve()
    shutil.rmtree(run / "index" / "default" / "bm25")

    def read_only(*a, **k):
        raise PermissionError(13, "Read-only file system", str(run))

    import twotower_cli.retrieval.bm25 as bm

    monkeypatch.setattr(bm, "save_bm25", read_only)
    res = cli("search", "gnu compiler", "--mode", "hybrid", "--json")
    assert res.exit_code == 0, res.stderr
    assert not (run / "index" / "default" / "bm25").exists()


def test_f13_messages_say_what_is_true(cli, runs, tmp_path):
    run = (runs / "latest").resolve()
    (run / "vocab.json").write_text("{broken")
    one_line(cli("inspect-vocab"), 1, "vocab.json: not valid JSON")
    fifo = tmp_path / "pipe.tsv"
    os.mkfifo(fifo)
    one_line(cli("validate-data", fifo), 1, "not a regular file")
    one_line(cli("validate-data", "/dev/zero"), 1, "not a regular file")


def test_f13_a_refusing_server_is_not_called_silent():
    from twotower_cli.tracking.wandb_sink import choose_mode

    choice = choose_mode("0" * 40, "", env={"WANDB_BASE_URL": f"http://127.0.0.1:{refusing_port()}"}, timeout=2)
    assert choice.mode == "offline" and "refused" in choice.reason


def test_f13_disk_full_names_the_file(tmp_path, monkeypatch):
    import twotower_cli.runs as runs_mod
    from twotower_cli.errors import ArtifactError

    monkeypatch.setattr(runs_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(ArtifactError, match=r"big\.json: needs about"):
        runs_mod.atomic_write_json(tmp_path / "big.json", {"x": "y" * 1000})
    assert not list(tmp_path.iterdir())


# -- correctness --------------------------------------------------------------------------------------------------------

def test_faiss_with_k_above_the_corpus(cli, runs, tmp_path):
    pytest.importorskip("faiss")
    corpus = write(tmp_path / "c.txt", "one document\ntwo documents\nthree\n")
    assert cli("index", corpus, "--name", "ann", "--backend", "faiss").exit_code == 0
    res = cli("search", "document", "--index", "ann", "-k", "50", "--json", "--mode", "dense")
    assert res.exit_code == 0, res.stderr
    hits = json.loads(res.stdout)["results"][0]["hits"]
    assert sorted(h["document"] for h in hits) == ["one document", "three", "two documents"]


def test_infonce_masks_pairs_the_file_says_are_relevant():
    from twotower_cli.model.losses import infonce

    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    ids, qids = torch.tensor([10, 11]), torch.tensor([0, 1])
    plain, _ = infonce(q, d, ids, qids)
    known = lambda qi, di: (qi.unsqueeze(1) == 0) & (di.unsqueeze(0) == 11)  # noqa: E731 (q0, d11) relevant too
    masked, _ = infonce(q, d, ids, qids, known=known)
    row0 = torch.nn.functional.cross_entropy((q @ d.T / 0.05)[:1, :1], torch.tensor([0]))  # d11 not a negative
    row1 = torch.nn.functional.cross_entropy((q @ d.T / 0.05)[1:], torch.tensor([1]))
    assert float(masked) == pytest.approx(float((row0 + row1) / 2), abs=1e-5)
    assert float(masked) != pytest.approx(float(plain))


def test_triplet_fallback_never_picks_a_positive_of_the_query():
    from twotower_cli.training.batches import TrainingSet, make_batch

    docs = pl.Series([f"d{i}" for i in range(4)])
    train_set = TrainingSet(queries=pl.Series(["a", "b"]), documents=docs, q_tokens=torch.zeros(2, 3, dtype=torch.int32),
                     d_tokens=torch.zeros(4, 3, dtype=torch.int32), pos_q=torch.tensor([0, 0, 0, 1]),
                     pos_d=torch.tensor([0, 1, 2, 3]), neg_ptr=torch.zeros(3, dtype=torch.long),
                     neg_doc=torch.zeros(0, dtype=torch.long), val_q=torch.zeros(0, dtype=torch.long), val_qrels=[],
                     test_q=torch.zeros(0, dtype=torch.long), test_qrels=[], pos_keys=torch.tensor([0, 1, 2, 4 + 3]))
    batch = make_batch(train_set, torch.arange(4), torch.full((4,), -1), "triplet")
    for q, n in zip(batch.qi.tolist(), batch.ni.tolist()):
        assert not bool(train_set.is_pair(torch.tensor([q]), torch.tensor([n])))


def test_sorted_member_is_isin():
    from twotower_cli.training.batches import sorted_member

    g = torch.Generator().manual_seed(3)
    known = torch.unique(torch.randint(0, 5000, (700,), generator=g))  # sorted, as pos_keys is
    keys = torch.cat([torch.randint(-3, 5100, (40, 50), generator=g), known[:5].view(1, 5).expand(40, 5)], 1)
    keys[0, :3] = torch.tensor([-1, int(known[0]), int(known[-1]) + 1])  # the ends and the padding key
    want = torch.isin(keys, known)
    assert torch.equal(sorted_member(keys, known), want) and want.any() and not want.all()
    assert not sorted_member(keys, known[:0]).any()


def test_bf16_logits_are_float32():
    from twotower_cli.model.losses import infonce

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    ids = torch.arange(16)
    ref, _ = infonce(q, d, ids, ids, temperature=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = infonce(q, d, ids, ids, temperature=0.01)
    assert low.dtype == torch.float32 and float(low) == pytest.approx(float(ref), rel=1e-6)


def test_bm25_mining_skips_copies_of_the_positive_and_model_mining_checks_every_positive():
    from twotower_cli.training import mining

    positives = {0: {0, 1}}
    kept = mining.select(np.array([0]), np.array([[0, 1, 2, 3, 4]]), positives, lambda q, d: d == 2)
    assert kept[1].tolist() == [3, 4]  # positives 0 and 1, and the copy 2, are skipped


def test_the_bm25_miner_returns_hard_negatives_and_never_a_positive(tiny_pairs):
    """The miner itself, on real pairs: each query's mined documents are BM25's best non-positives."""
    from twotower_cli.data.vocab import Vocab
    from twotower_cli.training import mining
    from twotower_cli.training.batches import build

    df = pl.read_parquet(tiny_pairs)
    train_set = build(df, Vocab.build([df["query"], df["document"]]), 64, 128, 0.0, 1)
    q, d = mining.mine_with_bm25(train_set)
    assert len(q) > 0 and len(q) == len(d)
    positives = set(zip(train_set.pos_q.tolist(), train_set.pos_d.tolist()))
    assert not {(int(a), int(b)) for a, b in zip(q, d)} & positives
    docs = train_set.documents.to_list()
    # a mined document shares a word with its query far more often than a random document does
    share = np.mean([bool(set(train_set.queries[int(a)].lower().split()) & set(docs[int(b)].lower().split()))
                     for a, b in zip(q, d)])
    rng = np.random.default_rng(0)
    chance = np.mean([bool(set(train_set.queries[int(a)].lower().split()) & set(docs[rng.integers(len(docs))].lower().split()))
                      for a in q])
    assert share > chance + 0.2, (share, chance)


def test_new_models_hash_kinds_apart():
    from twotower_cli.model.config import ModelConfig
    from twotower_cli.model.towers import TwoTower

    m = TwoTower(ModelConfig(vocab_size=30, ngram_buckets=1024, word_chars=list(range(2, 30)), idf=True,
                             embedding_dim=8, hidden_dim=8, max_query_length=8, max_document_length=8))
    raw = torch.tensor([5, 5 + 1024, 5 + 2048, 7] * 2)
    kind = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # the same values as trigrams and as words
    buckets, _, _ = m.query_tower.tfidf_features(raw, kind, torch.zeros(8, dtype=torch.long), 1)
    assert len(set(buckets.tolist())) == 8  # no two of {x, x + 1024, x + 2048} collide, and words != trigrams


@pytest.mark.parametrize("power", [1.0, 0.75, 0.5])
def test_features_are_weighted_by_idf_to_the_power_in_torch_and_numpy(power):
    from twotower_cli.model.config import ModelConfig
    from twotower_cli.model.numpy_encoder import NumpyTowers
    from twotower_cli.model.towers import TwoTower

    m = TwoTower(ModelConfig(vocab_size=30, ngram_buckets=1024, word_chars=list(range(2, 30)), idf=True,
                             idf_power=power, embedding_dim=8, hidden_dim=8, max_query_length=8,
                             max_document_length=8, word_share=0.0, lexical_dim=16))
    idf = torch.rand(1024, generator=torch.Generator().manual_seed(0)) * 5 + 1
    m.query_tower.idf.copy_(idf)
    raw, kind = torch.tensor([11, 12, 13]), torch.zeros(3, dtype=torch.long)  # three trigrams, each once
    buckets, w, _ = m.query_tower.tfidf_features(raw, kind, torch.zeros(3, dtype=torch.long), 1)
    want = idf[buckets] ** power
    assert torch.allclose(w, want / want.norm(), atol=1e-6)  # unit length, each in proportion to idf^power
    ids = torch.tensor([[3, 4, 5, 6, 0, 0, 0, 0], [7, 3, 9, 9, 9, 2, 8, 0]])
    tensors = {k: v.detach().numpy() for k, v in m.weights().items()}
    npe = NumpyTowers(m.cfg, tensors)
    for side, tower in (("query", m.query_tower), ("document", m.document_tower)):
        assert np.allclose(npe.encode(ids.numpy(), side), m.encode(tower, ids).detach().numpy(), atol=1e-5)


def test_a_checkpoint_is_never_written_with_a_nan_loss(tmp_path):
    from twotower_cli.errors import TrainingError
    from twotower_cli.training.loop import Loop

    loop = Loop.__new__(Loop)
    loop.state = {"epoch": 0, "loss_sum": math.nan, "loss_n": 3, "best_epoch": -1, "global_step": 7}
    loop.cfg = type("C", (), {"learning_rate": 0.01, "temperature": 0.05})()
    loop.run_dir, loop.main = tmp_path, True
    loop.log = type("L", (), {"flush": lambda self, st: None})()
    with pytest.raises(TrainingError, match="diverged"):
        loop.checkpoint()
    assert not list(tmp_path.iterdir())


def test_index_dedup_compares_texts_not_only_hashes(tmp_path, monkeypatch):

    def same_hash(self, seed=0):
        return pl.Series(np.zeros(len(self), dtype=np.uint64))

    monkeypatch.setattr(pl.Series, "hash", same_hash)  # every text collides
    from twotower_cli.retrieval.build import write_folder

    from twotower_cli.data.vocab import Vocab

    vocab = Vocab.build([pl.Series(["abc"])], 1, 10)
    chunks = [(pl.Series(["alpha", "beta", "alpha"]), None), (pl.Series(["beta", "gamma"]), None)]
    model = document_model(lambda tokens: torch.ones(tokens.shape[0], 4))
    n, *_ = write_folder(tmp_path / "ix", model, vocab, chunks, "cpu", "float32", 8, None, None)
    from twotower_cli.retrieval.snapshot import Strings

    # alpha, beta, gamma: hash collisions kept apart, true copies dropped, the rows in the order first seen
    assert n == 3 and Strings(tmp_path / "ix", "texts")[[0, 1, 2]] == ["alpha", "beta", "gamma"]
    assert Strings(tmp_path / "ix", "ids")[[0, 1, 2]] == ["0", "1", "4"]


# -- trusted-tool additions ----------------------------------------------------------------------------------------

def test_a_collapsed_model_never_becomes_latest(cli, runs):
    from twotower_cli.errors import TrainingError
    from twotower_cli.training.finish import check_not_collapsed
    from twotower_cli.training.loop import Outcome

    latest = (runs / "latest").resolve()
    res = cli("train", runs.parent / "pairs.parquet", "--encoder", "mean", "--epochs", "1", "--learning-rate", "10")
    assert res.exit_code == 1 and ("collapsed" in res.stderr or "diverged" in res.stderr), res.stderr
    assert (runs / "latest").resolve() == latest
    with pytest.raises(TrainingError, match="same embedding"):
        check_not_collapsed(latest, Outcome(best={"val/mrr@10": 0.5}), torch.ones(100, 8), 100)
    with pytest.raises(TrainingError, match="random ranking"):
        check_not_collapsed(latest, Outcome(best={"val/mrr@10": 0.001}), torch.randn(100, 8), 1000)
    check_not_collapsed(latest, Outcome(best={"val/mrr@10": 0.2}), torch.randn(100, 8), 1000)


def test_free_space_is_checked_before_an_index(cli, runs, tmp_path, monkeypatch):
    import twotower_cli.runs as runs_mod

    corpus = write(tmp_path / "c.txt", "one document\n" * 3 + "two\n")
    monkeypatch.setattr(runs_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    one_line(cli("index", corpus, "--name", "big"), 1, "embeddings.npy: needs about")
    assert not ((runs / "latest").resolve() / "index" / "big").exists()


def test_keys_never_leak_into_the_server_or_errors(cli, runs, monkeypatch):
    import socket
    import subprocess
    import sys
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    secret = "SECRETSECRETSECRET1234"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    res = cli("search", "--run", secret)
    assert res.exit_code != 0 and secret not in res.stderr + res.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    url, seen = f"http://127.0.0.1:{port}", []
    try:
        for _ in range(300):
            try:
                seen.append(httpx.get(url + "/health", timeout=1).text)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert seen, "the server did not start"
        seen.append(httpx.get(url + "/openapi.json").text)
        seen.append(httpx.post(url + "/search", json={"queries": [secret], "k": 2}).text)
        bad = httpx.post(url + "/search", json={"queries": ["x"], "api_key": secret})
        assert bad.status_code == 422
        seen.append(httpx.post(url + "/search", content=b"{", headers={"content-type": "application/json"}).text)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    # the secret may come back as the query a client sent; never from the configuration
    assert not any(secret in text for text in seen[:2] + seen[3:]) and secret not in out + err


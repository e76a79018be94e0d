"""`train --base-model`: a pretrained Hugging Face encoder as the learned half, with everything twotower does around
it. The base model here is a tiny BERT with random weights and a WordPiece vocabulary built from the test texts,
made inside the test (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import sample_pairs

transformers = pytest.importorskip("transformers")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128}
ARGS = ["--lexical-dim", "256", "--max-document-tokens", "48", "--max-query-tokens", "16", "--batch-size", "32",
        "--learning-rate", "3e-3", "--no-report"]


def tiny_bert(folder: Path, texts: list[str], sentence_transformers: bool = True) -> Path:
    """A randomly initialised BERT and a WordPiece vocabulary of ``texts``' characters and common words, saved as a
    model folder."""
    import collections
    import re

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    # Built by hand, not by `tokenizers`' trainer: its ties fall in hash order, so the vocabulary (and what the
    # tiny model can learn) changed from one process to the next.
    words = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    chars = sorted({c for w in words for c in w})
    common = [w for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2 and len(w) > 1]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    vocab += common[:max(0, 600 - len(vocab))]
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, **TINY)
    transformers.BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    if sentence_transformers:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                      "pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    df = sample_pairs(folder / "pairs.parquet", 300)
    texts = pl.read_parquet(df)
    return tiny_bert(folder / "model", texts["query"].to_list() + texts["document"].to_list())


def train(folder: Path, base: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--base-model", str(base),
                           *ARGS, *extra], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192"})


@pytest.fixture(scope="module")
def run(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bertrun")
    sample_pairs(folder / "pairs.parquet", 300)
    res = train(folder, base, "--epochs", "3")
    assert res.returncode == 0, res.stderr
    return (folder / "runs" / "latest").resolve()


def learned(model, texts: list[str], side: str) -> np.ndarray:
    """The learned half of the run's embeddings (after the exact lexical half's sketch), unit rows."""
    import torch

    vocab = model.vocab
    n = model.cfg.max_query_length if side == "query" else model.cfg.max_document_length
    with torch.no_grad():
        e = (model.encode_queries if side == "query" else model.encode_documents)(
            torch.from_numpy(vocab.encode(pl.Series(texts), n)))
    e = e[:, model.cfg.lexical_dim:].numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_the_fine_tuned_model_learns_and_every_command_works_on_it(run, base, cli):
    import twotower_cli
    from twotower_cli.model.artifacts import load_model, new_model

    config = json.loads((run / "config.json").read_text())["model"]
    assert config["encoder"] == "transformer" and config["base_model"] == str(base) and config["pooling"] == "mean"
    assert len(config["base_model_sha256"]) == 64
    model, vocab, _ = load_model(run)
    model.vocab = vocab
    untrained = new_model(model.cfg, vocab, base).eval()
    untrained.vocab = vocab
    state = untrained.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k.endswith(("idf", "mean_words"))})
    untrained.load_state_dict(state)
    pairs = pl.read_parquet(run.parent.parent / "pairs.parquet").filter(pl.col("label") == 1).head(200)

    def mrr(m):
        q, d = learned(m, pairs["query"].to_list(), "query"), learned(m, pairs["document"].to_list(), "document")
        ranks = (q @ d.T > np.diag(q @ d.T)[:, None]).sum(1)
        return float(np.mean(np.where(ranks < 10, 1.0 / (ranks + 1), 0.0)))

    assert mrr(model.eval()) > mrr(untrained) + 0.05  # it learned the pairs it was shown
    # the run's search, the API, evaluate and the index command
    api = twotower_cli.load(run)
    hits = api.search(["GNU C compiler", "text editor"], k=5)
    assert len(hits[0]) == 5 and api.plan.mode in ("dense", "hybrid", "bm25")
    record = json.loads((run / "run.json").read_text())
    assert record["test"]["test/search/mrr@10"] > 0
    cwd = run.parent.parent
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "search", "GNU C compiler", "--json", "-k", "3"],
                         cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0 and [h["id"] for h in json.loads(res.stdout)["results"][0]["hits"]] == \
        [h.id for h in hits[0][:3]]
    docs = pairs["document"].unique().sort()
    ev = cwd / "ev"
    ev.mkdir(exist_ok=True)
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(len(docs))], "document": docs}).write_parquet(ev / "corpus.parquet")
    sub = pairs.unique("query", maintain_order=True).head(30)
    row = {d: i for i, d in enumerate(docs.to_list())}
    pl.DataFrame({"query_id": [f"q{i}" for i in range(30)], "query": sub["query"]}).write_parquet(ev / "queries.parquet")
    pl.DataFrame({"query_id": [f"q{i}" for i in range(30)], "doc_id": [f"d{row[d]}" for d in sub["document"]]}
                 ).write_parquet(ev / "qrels.parquet")
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "evaluate", "ev", "--baseline", "bm25", "--json"],
                         cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [s["system"].split(" ")[0] for s in json.loads(res.stdout)["systems"]][:2] == ["two-tower", "bm25"]
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "index", "ev/corpus.parquet", "--name", "ev",
                          "--id-col", "doc_id"], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert twotower_cli.load(run, index="ev").search("GNU C compiler", k=2)[0][0].id.startswith("d")


def test_the_server_answers_for_a_fine_tuned_run(run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import twotower_cli
    from twotower_cli.serve import create_app

    model = twotower_cli.TwoTowerModel(run)
    client = TestClient(create_app(model))
    assert client.get("/health").json()["documents"] > 0
    body = client.post("/search", json={"queries": ["GNU C compiler"], "k": 3}).json()
    assert [h["id"] for h in body["results"][0]["hits"]] == [h.id for h in model.search("GNU C compiler", k=3)[0]]


def test_the_encoder_folder_loads_by_path_and_embeds_the_same(run):
    """transformers (and sentence-transformers where installed) read the run's encoder/ folder as a model of
    their own, with the same embeddings as the run's learned half."""
    import torch

    from twotower_cli.model.artifacts import load_model

    folder = run / "encoder"
    assert {"config.json", "model.safetensors", "modules.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list(run.rglob("pytorch_model*")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    texts = ["gnu c compiler", "a small text editor for the terminal", "fonts"]
    model, vocab, _ = load_model(run)
    model.vocab = vocab
    ours = learned(model, texts, "document")
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        batch = tok(texts, padding=True, truncation=True, max_length=model.cfg.max_document_tokens, return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = ((hf(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)).numpy()  # the folder's pooling
    np.testing.assert_allclose(ours, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("declared,expected", [({"pooling_mode_cls_token": True}, "cls"),
                                               ({"pooling_mode_max_tokens": True}, "max"),
                                               ({"pooling_mode_mean_tokens": True}, "mean"), (None, "mean")])
def test_the_pooling_is_what_the_folder_declares(tmp_path, declared, expected):
    from twotower_cli.model.transformer import pooling_of

    if declared is not None:
        (tmp_path / "modules.json").write_text(json.dumps([
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(declared))
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 200}))
    assert pooling_of(tmp_path) == (expected, 200 if declared else 0)


def test_resume_equals_an_uninterrupted_run(base, tmp_path):
    """Stopped mid-training, then resumed: the same model as training straight through (dropout masks are a
    function of the step)."""
    from safetensors.numpy import load_file

    from twotower_cli.config import load_config
    from twotower_cli.training.loop import Hooks
    from twotower_cli.training.pipeline import run_train

    pairs = sample_pairs(tmp_path / "pairs.parquet", 200)

    def cfg(name):
        return load_config(env={}, overrides={
            ("model", "base_model"): str(base), ("model", "lexical_dim"): 256, ("model", "max_document_tokens"): 48,
            ("model", "max_query_tokens"): 16, ("model", "ngram_buckets"): 8192, ("train", "batch_size"): 32,
            ("train", "learning_rate"): 1e-3, ("train", "epochs"): 2, ("train", "seed"): 5,
            ("train", "report"): False, ("train", "runs_dir"): str(tmp_path / name)})

    class StopAfter:
        def __init__(self, n):
            self.n = n

        def __call__(self):
            self.n -= 1
            return self.n < 0

    full = run_train(cfg("a"), pairs, Hooks(), lambda: False)
    part = run_train(cfg("b"), pairs, Hooks(), StopAfter(4))  # mid-epoch 1 (5 steps an epoch)
    assert part.interrupted
    done = run_train(cfg("b"), None, Hooks(), lambda: False, resume=part.run_dir.name)
    assert not done.interrupted
    one = load_file(full.run_dir / "encoder" / "model.safetensors")
    two = load_file(done.run_dir / "encoder" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(one[k], two[k], atol=1e-5, err_msg=k)
    assert done.test == pytest.approx(full.test, abs=1e-6)


def test_zero_epochs_builds_a_run_of_the_base_model_as_it_is(base, tmp_path):
    sample_pairs(tmp_path / "pairs.parquet", 150)
    res = train(tmp_path, base, "--epochs", "0")
    assert res.returncode == 0, res.stderr
    run = (tmp_path / "runs" / "latest").resolve()
    from safetensors.numpy import load_file

    theirs = load_file(base / "model.safetensors")
    ours = load_file(run / "encoder" / "model.safetensors")
    for k in theirs:
        np.testing.assert_array_equal(theirs[k], ours[k])
    assert json.loads((run / "run.json").read_text())["complete"] and "base model as it is" in res.stdout


@pytest.mark.parametrize("case", ["not a folder", "no weights", "pickle only", "no network", "no extra"])
def test_a_base_model_that_cannot_be_used_is_one_line(case, base, tmp_path, cli, monkeypatch):
    sample_pairs(tmp_path / "pairs.parquet", 50)
    folder = tmp_path / "m"
    folder.mkdir()
    name, expect = str(folder), ""
    if case == "not a folder":
        expect = "no config.json"
    elif case == "no weights":
        (folder / "config.json").write_text((base / "config.json").read_text())
        expect = "no model.safetensors"
    elif case == "pickle only":
        (folder / "config.json").write_text((base / "config.json").read_text())
        (folder / "pytorch_model.bin").write_bytes(b"x")
        expect = "never loads"
    elif case == "no network":
        name, expect = "nobody-here/no-such-model", "cannot be reached"
    else:
        monkeypatch.setitem(sys.modules, "transformers", None)
        expect = "pip install -e '.[hf]'"
    t = time.monotonic()
    res = cli("train", tmp_path / "pairs.parquet", "--base-model", name, "--runs-dir", tmp_path / "runs")
    assert res.exit_code != 0 and expect in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 20
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("2*"))

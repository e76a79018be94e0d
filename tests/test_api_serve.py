"""The Python API, its torch-free query path, and `twotower serve` as a real server on a loopback port."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import ROOT, SAMPLE, sample_pairs

TEXTS = ["", " ", "a", "GNU C compiler", "İstanbul ﬁne straße", "日本語のテキスト", "x" * 500, "tab\there\nnewline",
         "nul\x00byte", "émoji 🙂 and ümlauts"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One small run with the default model (its lexical half and idf included), trained once for the module."""
    folder = tmp_path_factory.mktemp("api")
    sample_pairs(folder / "pairs.parquet", 500)
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "16384", "TWOTOWER_MODEL_HIDDEN_DIM": "32",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "2",
                          "--no-report", "--max-document-length", "256"], cwd=folder, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    return (folder / "runs" / "latest").resolve()


def random_texts(n: int = 60) -> list[str]:
    rng = random.Random(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyz     0123456789-.,'ÄéüßñçøÅ日本語中文") + ["🙂", "\t", "\n", "İ", "ﬁ"]
    return TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(n)]


def test_numpy_and_torch_embeddings_agree(run):
    import torch

    import twotower_cli
    from twotower_cli.model.artifacts import load_model

    api = twotower_cli.load(run)
    assert api.uses_numpy() and api.config.lexical_dim > 0 and api.config.idf  # the default model
    model, vocab, _ = load_model(run)
    texts = random_texts()
    for side, max_len in (("query", api.config.max_query_length), ("document", api.config.max_document_length)):
        ids = torch.from_numpy(vocab.encode(pl.Series(texts).str.normalize("NFKC"), max_len))
        with torch.no_grad():
            ref = (model.encode_queries if side == "query" else model.encode_documents)(ids).numpy()
        got = api.encode_queries(texts) if side == "query" else api.encode_documents(texts)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=side)


def test_exact_lexical_rows_numpy_and_torch_agree(run):
    import torch

    import twotower_cli
    from twotower_cli.model.artifacts import load_model
    from twotower_cli.model.encode import lexical_rows

    api = twotower_cli.load(run)
    assert api.config.lexical_exact  # the default model
    model, vocab, _ = load_model(run)
    texts = random_texts() + [" ".join(f"word{i}" for i in range(400))]  # 3,000 characters
    for side, max_len in (("query", api.config.max_query_length), ("document", api.config.max_document_length),
                          ("document", api.config.lexical_length)):
        ids = vocab.encode(pl.Series(texts).str.normalize("NFKC"), max_len)
        ref = lexical_rows(model, torch.from_numpy(ids), side, "cpu")
        got = api._numpy_towers().lexical_rows(ids, side)
        np.testing.assert_array_equal(got.indptr, ref.indptr)
        np.testing.assert_array_equal(got.buckets, ref.buckets)
        np.testing.assert_allclose(got.weights, ref.weights, atol=1e-6, rtol=0, err_msg=side)


def test_the_exact_lexical_half_reads_past_the_learned_half(run):
    """A word after the 256 characters the learned half reads still counts: the index's exact lexical rows read
    2,048 (``data.lexical_document_length``). Read as far as the learned half, the two documents are the same."""
    import twotower_cli

    api = twotower_cli.load(run)
    assert (api.config.max_document_length, api.config.lexical_length) == (256, 2048)
    filler = " ".join(pl.read_parquet(SAMPLE)["document"].unique().sort().head(5).to_list())[:300]
    docs = [filler + " zyzzogeton", filler + " quoddity", "a text editor", "the GNU C compiler"]
    api.index_documents(docs, name="far", ids=["far", "other", "editor", "gcc"])
    hits = api.use_index("far").search("zyzzogeton", k=4, mode="dense")[0]
    score = {h.id: h.score for h in hits}
    assert hits[0].id == "far" and score["far"] - score["other"] > 0.01, score
    learned = api.encode_documents(docs[:2])
    np.testing.assert_allclose(learned[0], learned[1], atol=1e-6)  # the embeddings cannot tell them apart


def test_search_scores_are_the_learned_half_plus_the_exact_lexical_half(run):
    """Brute force over every document, sparse vectors as Python dicts: what the index's re-scoring must give."""
    import twotower_cli

    api = twotower_cli.load(run)
    docs = api.index.all_documents()
    api.index_documents(docs, "full-layout", api.index.ids.range(0, api.index.count), layout="full")
    for name in ("default", "full-layout"):  # (compact, full)
        scores_are_the_halves(api.use_index(name), docs)


def scores_are_the_halves(api, docs):
    index, cfg = api.index, api.config
    assert index.lexical is not None and index.count <= 1000  # every row is re-scored: the result is exact
    towers = api._numpy_towers()

    def dicts(texts, side):
        max_len = cfg.max_query_length if side == "query" else cfg.lexical_length  # (2,048 characters)
        r = towers.lexical_rows(api.vocab.encode_list(texts, max_len), side)
        return [dict(zip(r.buckets[a:b].tolist(), r.weights[a:b].tolist()))
                for a, b in zip(r.indptr[:-1], r.indptr[1:])]

    d_vecs = dicts(docs, "document")
    emb = np.asarray(index.embeddings)
    queries = ["GNU C compiler", "text editor", "python library for images", "zzqx"]
    hashed_gap = 0.0
    for q, qv, qe in zip(queries, dicts(queries, "query"), api.encode_queries(queries)):
        learned = emb[:, -cfg.embedding_dim:] @ qe[cfg.lexical_dim:]
        exact = np.array([sum(w * d.get(b, 0.0) for b, w in qv.items()) for d in d_vecs])
        brute = learned + exact
        order = np.lexsort((np.arange(len(brute)), -brute))[:10]
        hits = api.search(q, k=10, mode="dense")[0]
        assert [int(h.id) for h in hits] == order.tolist(), q
        np.testing.assert_allclose([h.score for h in hits], brute[order], atol=1e-5)
        if emb.shape[1] == qe.shape[0]:  # (the full layout: the sketch too)
            hashed_gap = max(hashed_gap, float(np.abs(emb @ qe - brute).max()))
    assert hashed_gap > 1e-3 or index.meta.get("layout") == "compact"  # the sketch alone would have scored otherwise


def test_api_search_is_what_the_cli_prints(run, cli):
    import twotower_cli

    api = twotower_cli.load(run)
    hits = api.search(["GNU C compiler", "text editor"], k=5)
    res = cli("search", "--queries", "-", "--run", run.name, "--runs-dir", run.parent, "-k", "5", "--json",
              input="GNU C compiler\ntext editor\n")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [[h.to_dict() for h in q] for q in hits] == [r["hits"] for r in doc["results"]]
    assert doc["mode"] == api.plan.mode and len(hits[0]) == 5 and hits[0][0].rank == 1
    dense = api.search("GNU C compiler", k=3, hybrid=False)[0]
    assert [h.score for h in dense] == sorted((h.score for h in dense), reverse=True)
    from twotower_cli.errors import UsageError

    with pytest.raises(UsageError, match="query 2 is empty"):  # as the CLI and the server refuse it
        api.search(["text editor", "\u200b "])


def test_a_cold_search_never_imports_torch(run):
    code = ("import sys, twotower_cli; m = twotower_cli.load(sys.argv[1]); m.search('gnu compiler', k=3, "
            "hybrid=True); print('torch' in sys.modules, 'polars' in sys.modules, 'bm25s' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout
    log = subprocess.run([sys.executable, "-X", "importtime", "-m", "twotower_cli", "search", "gnu compiler",
                          "--run", run.name, "--runs-dir", str(run.parent)], capture_output=True, text=True)
    assert log.returncode == 0, log.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in log.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported and "polars" not in imported


def test_index_documents_and_search_the_new_index(run, tmp_path):
    import shutil

    import twotower_cli

    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    api = twotower_cli.load(copy)
    docs = ["the vim text editor", "emacs, an extensible editor", "a tool to compress files with gzip"]
    path = api.index_documents(docs, name="tools", ids=["v", "e", "g"])
    assert (path / "meta.json").exists()
    hits = twotower_cli.load(copy, index="tools").search("compress files", k=3)[0]
    assert hits[0].id == "g" and {h.id for h in hits} == {"v", "e", "g"}
    with pytest.raises(twotower_cli.api.UsageError):
        api.search("x", k=0)


def test_numpy_bm25_scores_equal_bm25s():
    import bm25s

    from twotower_cli.retrieval.bm25 import BM25

    docs = pl.read_parquet(SAMPLE)["document"].unique().sort().head(800).to_list()
    queries = pl.read_parquet(SAMPLE)["query"].unique().sort().head(100).to_list()
    ours = BM25.build(docs)
    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    for q in queries:
        want = ref.get_scores(bm25s.tokenize([q], stopwords="en", show_progress=False, return_ids=False)[0])
        np.testing.assert_allclose(ours.scores(q), want, rtol=1e-5, atol=1e-6, err_msg=q)


def test_bm25_built_from_a_store_in_slices_into_files_equals_one_built_whole(tmp_path):
    from twotower_cli.data.text_store import StoreWriter
    from twotower_cli.retrieval.bm25 import BM25, save_bm25

    docs = pl.read_parquet(SAMPLE)["document"].unique().sort().head(300).to_list() + ["", "a b", "the and of"]
    queries = pl.read_parquet(SAMPLE)["query"].unique().sort().head(60).to_list() + ["the", "zzqx"]
    writer = StoreWriter(tmp_path / "texts", "documents")
    writer.add(docs)
    store = writer.close()
    whole = BM25.build(docs)
    (tmp_path / "index").mkdir()
    sliced = save_bm25(tmp_path / "index", store)  # one slice (65,536 rows by default)
    again = BM25.build(store, tmp_path / "again", chunk=7)
    assert not sliced.data.flags.writeable and sorted(p.name for p in (tmp_path / "index").iterdir()) == ["bm25"]
    for bm in (sliced, again, BM25.load(tmp_path / "again")):
        assert bm.vocab == whole.vocab and bm.n_docs == len(docs)
        for q in queries:
            assert np.array_equal(bm.scores(q), whole.scores(q)), q
    assert not whole.scores("the").any() and whole.scores("zzqx").shape == (len(docs),)


# -- the server ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "serve", "--run", run.name, "--runs-dir",
                             str(run.parent), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stderr.read())
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_server_answers_like_the_cli(server, run, cli):
    import httpx

    health = httpx.get(server + "/health").json()
    from twotower_cli.model.files import fingerprint

    assert health["model_fingerprint"] == fingerprint(run) and health["documents"] > 0 and health["status"] == "ok"
    body = httpx.post(server + "/search", json={"queries": ["GNU C compiler"], "k": 4, "hybrid": None}).json()
    res = cli("search", "GNU C compiler", "--run", run.name, "--runs-dir", run.parent, "-k", "4", "--json")
    assert body == json.loads(res.stdout)  # the same document, field for field
    emb = httpx.post(server + "/embed", json={"texts": ["a", "b c"]}).json()
    assert emb["dim"] == len(emb["embeddings"][0]) and len(emb["embeddings"]) == 2
    import numpy as np

    import twotower_cli

    assert np.allclose(emb["embeddings"], twotower_cli.load(run).encode_queries(["a", "b c"]), atol=1e-6, rtol=0)
    assert httpx.get(server + "/docs").status_code == 200
    assert "/search" in httpx.get(server + "/openapi.json").json()["paths"]


@pytest.mark.parametrize("body,status", [
    ({"queries": [], "k": 3}, 422),
    ({"queries": ["x"], "k": 10**9}, 422),
    ({"queries": ["x"] * 10_000}, 422),
    ({"queries": ["   "]}, 422),
    ({"queries": ["\u200b\x00"]}, 422),  # a zero-width space and a NUL: nothing to search for
    ({"queries": "not a list"}, 422),
    ({"k": 3}, 422),
    ({"queries": ["x"], "mode": "magic"}, 422),
    ({"queries": ["y" * 2_000_000]}, 413),
    ({"queries": ["abc\ud800"]}, 422),  # a lone surrogate: valid JSON, not valid Unicode
    ({"queries": ["x"], "top_k": 3}, 422),  # an unknown field is named, not ignored
    ({"queries": ["x"], "k": True}, 422),
    ({"queries": ["x"], "k": "3"}, 422),
    ({"queries": ["x"], "hybrid": "yes"}, 422),
    ({"queries": ["x"], "mode": "dense", "hybrid": True}, 422),
    ({"queries": ["x"] * 20, "k": 1000}, 422),  # 20,000 hits: over the per-request bound
])
def test_bad_requests_are_4xx_json_and_the_server_stays_up(server, body, status):
    import httpx

    # json.dumps escapes a lone surrogate as \\ud800 (valid JSON); httpx's json= would fail to encode it
    r = httpx.post(server + "/search", content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status and "error" in r.json(), r.text
    r = httpx.post(server + "/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = httpx.post(server + "/search", content=b'{"queries": ["\xff\xfe"]}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"], r.text  # (starlette said: error parsing the body)
    assert httpx.get(server + "/health").status_code == 200


def test_every_http_edge_is_json(server):
    """Answers that come from outside the handlers are JSON too, with the status that says what happened."""
    import httpx

    r = httpx.post(server + "/embed", content=json.dumps({"texts": ["ok", "bad \udfff"], "kind": "document"}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and "texts" in r.json()["error"] and "surrogate" in r.json()["error"]
    r = httpx.post(server + "/search", json={"queries": ["x"], "top_k": 3})
    assert "top_k" in r.json()["error"] and "queries" in r.json()["error"]
    r = httpx.post(server + "/search", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "empty" in r.json()["error"]
    chunks = (b'{"queries": ["' + b"y" * 65536 for _ in range(20))  # a chunked body over 1 MiB: no length
    r = httpx.post(server + "/search", content=chunks, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "over" in r.json()["error"]
    r = httpx.get(server + "/health/")
    assert r.status_code == 404 and "error" in r.json()  # no redirect to /health
    assert httpx.head(server + "/health").status_code == 200
    assert httpx.get(server + "/health").status_code == 200


def test_api_turns_a_lone_surrogate_into_the_replacement_character(run):
    import twotower_cli

    model = twotower_cli.load(run)
    assert model.search("gnu \ud800 compiler", k=2)[0]  # no UnicodeEncodeError
    assert (model.encode_queries(["a\udfffb"]) == model.encode_queries(["a\ufffdb"])).all()


def test_concurrent_requests_are_safe(server):
    import httpx

    want = httpx.post(server + "/search", json={"queries": ["text editor"], "k": 5}).json()
    results, errors = [], []

    def client():
        with httpx.Client() as c:
            for _ in range(5):
                try:
                    results.append(c.post(server + "/search", json={"queries": ["text editor"], "k": 5}).json())
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 80
    # requests that wait together are searched together: the same hits; a score may differ in its last float bits
    # (a batch is multiplied by another BLAS kernel than a single query), hence the tolerance on scores only
    for r in results:
        assert [h["id"] for h in r["results"][0]["hits"]] == [h["id"] for h in want["results"][0]["hits"]]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(r["results"][0]["hits"],
                                                                       want["results"][0]["hits"]))


def test_waiting_requests_are_answered_by_one_search(run):
    """The server's batcher: 32 jobs queued while its worker is busy cost a few model calls, and each job gets
    its own answer, the same as searching it alone."""
    import twotower_cli
    from twotower_cli.serve import Batcher

    model = twotower_cli.load(run)
    alone = {q: [h.id for h in model.search(q, k=3, mode="dense")[0]] for q in ("text editor", "gnu compiler", "x")}
    batcher = Batcher(model)
    busy, gate = threading.Event(), threading.Event()
    real = model.encode_queries
    model.encode_queries = lambda texts, **kw: (busy.set(), gate.wait(10), real(texts, **kw))[2]
    blocker = batcher.submit(("embed", "query"), ["hold the worker"])
    assert busy.wait(10)  # the worker is inside the first job: what follows waits in the queue
    futures = [(q, batcher.submit(("search", 3, "dense"), [q])) for q in list(alone) * 10]
    futures.append(("bad", batcher.submit(("search", 3, "no-such-mode"), ["text editor"])))
    gate.set()
    blocker.result(timeout=30)
    for q, f in futures[:-1]:
        assert [h.id for h in f.result(timeout=30)[0]] == alone[q]
    with pytest.raises(Exception, match="no-such-mode"):
        futures[-1][1].result(timeout=30)
    assert batcher.calls == 3  # the blocker, the 30 searches together, the bad one

    # a request given up while waiting (its client went away) is skipped, and the worker goes on
    gate.clear()
    busy.clear()
    blocker = batcher.submit(("embed", "query"), ["hold the worker"])
    assert busy.wait(10)
    gone = batcher.submit(("search", 3, "dense"), ["text editor"])
    assert gone.cancel()
    gate.set()
    blocker.result(timeout=30)
    assert [h.id for h in batcher.submit(("search", 3, "dense"), ["x"]).result(timeout=30)[0]] == alone["x"]


def test_serve_without_the_extra_is_one_line(run, monkeypatch, cli):
    import builtins

    real = builtins.__import__

    def no_fastapi(name, *a, **k):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    res = cli("serve", "--run", run.name, "--runs-dir", run.parent)
    assert res.exit_code == 2 and "pip install -e '.[serve]'" in res.stderr


def test_readme_api_example_runs(run, tmp_path):
    """The README's Python example, as written, against a run in ./runs."""
    import re
    import shutil

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    shutil.copytree(run, tmp_path / "runs" / run.name)
    os.symlink(run.name, tmp_path / "runs" / "latest")
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_run_saved_by_session_2_code_loads_and_embeds_as_it_did(tmp_path, cli):
    """A run written before the restructuring (tests/data/session2_runs, trained with the code of commit c5264f2):
    the new code rebuilds its embeddings to float32 rounding, the NumPy path agrees, and search, evaluate and index
    work. (Bit for bit on the machine that wrote them; on an AMD EPYC the sums' last bits differ, by ~1e-8, with
    the old code too: the CPU's kernels add in another order.)"""
    import shutil

    import torch

    import twotower_cli
    from twotower_cli.model.artifacts import load_model

    runs = tmp_path / "runs"
    shutil.copytree(ROOT / "tests" / "data" / "session2_runs", runs, symlinks=True)
    run = (runs / "latest").resolve()
    model, vocab, _ = load_model(run)
    docs = pl.read_parquet(run / "index/default/documents/*.parquet")["document"]
    with torch.no_grad():
        again = model.encode_documents(torch.from_numpy(vocab.encode(docs, model.cfg.max_document_length))).numpy()
    np.testing.assert_allclose(again, np.load(run / "index/default/embeddings.npy"), atol=1e-6, rtol=0)
    api = twotower_cli.load(run)
    assert api.plan.mode == "dense" and api.config.lexical_dim == 0  # what such a run did: the model alone
    queries = ["gnu c compiler", "", "ümlaut"]
    with torch.no_grad():
        ref = model.encode_queries(torch.from_numpy(vocab.encode(pl.Series(queries), model.cfg.max_query_length)))
    np.testing.assert_allclose(api.encode_queries(queries), ref.numpy(), atol=1e-5)
    res = cli("search", "gnu compiler", "--runs-dir", runs, "--json", "--mode", "hybrid")
    assert res.exit_code == 0 and json.loads(res.stdout)["results"][0]["hits"], res.stderr


def test_server_connections_send_without_waiting_for_acks():
    """Connections the server accepts have Nagle off: a keep-alive client otherwise waits 40 ms (the delayed ACK)
    for the second segment of every response."""
    from twotower_cli.serve import listening_socket

    with listening_socket("127.0.0.1", 0) as server, socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        del client


def test_a_documents_opening_counts_again_at_its_weight(run):
    """``lead_weight``: a document's row is its whole row plus the weight times its opening's row (the first
    ``lead_characters``, cut before a word they would split), the same in torch and NumPy. Two documents with the
    same words score alike until the query's word opens one of them."""
    import torch

    import twotower_cli
    from twotower_cli.model.artifacts import load_model
    from twotower_cli.model.encode import document_and_opening_rows, lexical_rows

    api = twotower_cli.load(run)
    model, vocab, _ = load_model(run)
    cfg = api.config
    assert cfg.lead_characters == 100  # the default
    filler = " ".join(pl.read_parquet(SAMPLE)["document"].unique().sort().head(3).to_list())
    filler = filler.encode("ascii", "ignore").decode()[:300]  # (lowercasing keeps its length)
    docs = [". zyzzogeton " + filler + " .", ". " + filler + " zyzzogeton ."]  # the same n-grams
    ids = vocab.encode(pl.Series(docs), cfg.lexical_length)
    q = api.query_lexical(["zyzzogeton"])
    table = np.zeros(cfg.ngram_buckets, dtype=np.float32)
    scores = {}
    saved = cfg.lead_weight, model.cfg.lead_weight
    try:
        for weight in (0.0, 0.35):
            cfg.lead_weight = model.cfg.lead_weight = weight
            ref = lexical_rows(model, torch.from_numpy(ids), "document", "cpu")
            got = api._numpy_towers().lexical_rows(ids, "document")
            np.testing.assert_array_equal(got.buckets, ref.buckets)
            np.testing.assert_allclose(got.weights, ref.weights, atol=1e-6, rtol=0)
            scores[weight] = ref.dots(q, 0, np.arange(2), table)
        opening = document_and_opening_rows(model, torch.from_numpy(ids), "cpu")[1]
        cut = vocab.encode(pl.Series([opening_of(d, 100) for d in docs]), 100)
        whole = lexical_rows(model, torch.from_numpy(cut), "query", "cpu")  # (no length scaling on either)
        np.testing.assert_array_equal(opening.buckets, whole.buckets)
        np.testing.assert_allclose(opening.weights, whole.weights, atol=1e-6, rtol=0)
    finally:
        cfg.lead_weight, model.cfg.lead_weight = saved
    np.testing.assert_allclose(scores[0.0][0], scores[0.0][1], rtol=1e-5)  # the same words: the same score
    assert scores[0.35][0] > scores[0.35][1] + 0.01
    np.testing.assert_allclose(scores[0.35][0] - scores[0.0][0], 0.35 * opening.dots(q, 0, np.arange(1), table)[0],
                               rtol=1e-4)
    np.testing.assert_allclose(scores[0.35][1], scores[0.0][1], rtol=1e-5)  # its opening lacks the word


def opening_of(text: str, n: int) -> str:
    """The first ``n`` characters, less a word they would split (what `numpy_encoder.lead_tokens` keeps)."""
    if len(text) > n and text[n - 1].isalnum() and text[n].isalnum():
        return text[:max(i for i in range(n) if not text[i].isalnum()) + 1]
    return text[:n]

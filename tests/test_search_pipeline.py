"""One search for every caller (`retrieval.search`): its ranking against a brute force over every document, the
same top 10 whatever k is asked, the same answers from the API, the CLI, `evaluate` and the choices made after
training, and one build of an index per search while the index changes under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import document_model, sample_pairs

QUERIES = ["GNU C compiler", "text editor", "python library for images", "zzqx", "the", "a fast web server",
           "font", "library"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A small run of the default model (under 1,000 documents: the dense stage re-scores every one of them)."""
    folder = tmp_path_factory.mktemp("pipeline")
    sample_pairs(folder / "pairs.parquet", 450)
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "16384", "TWOTOWER_MODEL_HIDDEN_DIM": "32",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "2",
                          "--no-report", "--max-document-length", "256"], cwd=folder, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    return (folder / "runs" / "latest").resolve()


def brute_force(api, queries: list[str], weight: float, depth: int = 100) -> list[list[int]]:
    """The fused ranking computed for every document from its definition: each side's score over the whole
    index, normalised by the min and max of that side's top ``depth``, 0 below it; ties to the lower row."""
    index, cfg = api.index, api.config
    towers = api._numpy_towers()
    docs = index.all_documents()
    d_rows = towers.lexical_rows(api.vocab.encode_list(docs, cfg.lexical_length), "document")
    q_rows = towers.lexical_rows(api.vocab.encode_list(queries, cfg.max_query_length), "query")
    emb = np.asarray(index.embeddings, dtype=np.float32)
    table = np.zeros(cfg.ngram_buckets, dtype=np.float32)
    out = []
    for j, (q, qe) in enumerate(zip(queries, api.encode_queries(queries))):
        learned = emb[:, -cfg.embedding_dim:] @ qe[cfg.lexical_dim:]  # (a compact index stores the learned half only)
        dense = learned + d_rows.dots(q_rows, j, np.arange(len(docs)), table)
        lex = index.bm25().scores(q)
        sides = []
        for s in (dense.astype(np.float64), lex.astype(np.float64)):
            top = np.lexsort((np.arange(s.size), -s))[:depth]
            lo, hi = s[top].min(), s[top].max()
            norm = np.zeros(s.size)
            norm[top] = (s[top] - lo) / (hi - lo) if hi > lo else 0.0
            sides.append((norm, top))
        fused = weight * sides[0][0] + (1 - weight) * sides[1][0]
        union = np.union1d(sides[0][1], sides[1][1])
        order = union[np.lexsort((union, -fused[union]))]
        out.append(order[:10].tolist())
    return out


def test_the_fused_ranking_is_its_definition_over_every_document(run):
    import twotower_cli

    api = twotower_cli.load(run)
    assert api.index.count <= 1000 and api.index.lexical is not None
    for weight in (0.3, 0.7):
        got = [[int(h.id) for h in hits] for hits in api.search(QUERIES, k=10, mode="hybrid", weight=weight)]
        assert got == brute_force(api, QUERIES, weight)


@pytest.mark.parametrize("mode", ["dense", "hybrid", "bm25"])
def test_the_top_ten_is_the_same_for_every_k(run, mode):
    import twotower_cli

    api = twotower_cli.load(run)
    queries = pl.read_parquet(run.parent.parent / "pairs.parquet")["query"].unique().sort().head(150).to_list()
    queries += QUERIES
    base = api.search(queries, k=10, mode=mode)
    for k in (11, 200, 1000):
        deeper = api.search(queries, k=k, mode=mode)
        assert [[(h.id, h.score) for h in a] for a in base] == [[(h.id, h.score) for h in b[:10]] for b in deeper]
        assert all(len(b) == min(k, api.index.count) for b in deeper)  # as deep as asked, never short
        assert all(x.score >= y.score for b in deeper for x, y in zip(b, b[1:]) if mode != "dense" or y.rank <= 1000)


def test_bm25_breaks_ties_by_row_across_the_cut():
    from twotower_cli.retrieval.fusion import best_rows

    scores = np.array([0.0, 2.0, 1.0, 1.0, 1.0, 3.0, 1.0, 0.0], dtype=np.float32)
    assert best_rows(scores, 3).tolist() == [5, 1, 2]
    assert best_rows(scores, 4).tolist() == [5, 1, 2, 3]
    assert best_rows(scores, 8).tolist() == [5, 1, 2, 3, 4, 6, 0, 7]


def test_every_caller_gets_the_same_ranking(run, tmp_path):
    """The API, `search --json`, `evaluate` (its corpus: the index's documents) and the choice of the default
    search (its MRR@10 at each weight) all rank through `retrieval.search`."""
    import twotower_cli
    from twotower_cli.evaluation.evaluate import evaluate_run
    from twotower_cli.evaluation.metrics import retrieval_metrics
    from twotower_cli.training.choices import choose_search

    api = twotower_cli.load(run)
    queries = QUERIES[:4]
    hits = api.search(queries, k=10)
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "search", "--queries", "-", "--run", str(run),
                          "--json"], input="\n".join(queries), capture_output=True, text=True,
                         cwd=run.parent.parent)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert [[h["id"] for h in r["hits"]] for r in printed["results"]] == [[h.id for h in q] for q in hits]

    # evaluate over the index's own documents: its rankings are the API's, so are its metrics
    docs = api.index.all_documents()
    pairs = pl.read_parquet(run.parent.parent / "pairs.parquet").filter(pl.col("label") == 1).head(60)
    row = {d: i for i, d in enumerate(docs)}
    eval_dir = tmp_path / "ev"
    eval_dir.mkdir()
    pl.DataFrame({"doc_id": [str(i) for i in range(len(docs))], "document": docs}).write_parquet(
        eval_dir / "corpus.parquet")
    pl.DataFrame({"query_id": [f"q{i}" for i in range(60)], "query": pairs["query"]}).write_parquet(
        eval_dir / "queries.parquet")
    pl.DataFrame({"query_id": [f"q{i}" for i in range(60)],
                  "doc_id": [str(row[d]) for d in pairs["document"]]}).write_parquet(eval_dir / "qrels.parquet")
    rows = evaluate_run(run, eval_dir, baseline="bm25")
    qrels = [{row[d]: 1.0} for d in pairs["document"]]
    for system, mode in ((rows[0], "dense"), (rows[1], "bm25"), (rows[-1], api.plan.mode)):
        ranked = [[int(h.id) for h in q] + [-1] * (100 - len(q)) for q in
                  api.search(pairs["query"].to_list(), k=100, mode=mode)]
        assert system["metrics"] == pytest.approx(retrieval_metrics(ranked, qrels)), system["system"]

    _, record = choose_search(api, api.index, pairs["query"].to_list(), qrels)
    for w in (0.0, 0.5, 1.0):
        ranked = [[int(h.id) for h in q] + [-1] * (10 - len(q)) for q in
                  api.search(pairs["query"].to_list(), k=10, mode="hybrid", weight=w)]
        assert record["val_mrr@10"][str(w)] == pytest.approx(retrieval_metrics(ranked, qrels, ("mrr@10",))["mrr@10"])


def test_searches_see_one_build_while_the_index_is_swapped_and_rebuilt(run):
    """Threads search while another switches between two indexes and rebuilds one of them: every answer is one
    index's whole answer, and nothing raises (the API is shared between threads, as `serve` shares it)."""
    import twotower_cli

    api = twotower_cli.load(run)
    docs = api.index.all_documents()
    api.index_documents(docs[:300], name="small")
    api.index_documents(docs[200:600][::-1], name="other")
    answers = {name: [[(h.id, h.document) for h in q] for q in twotower_cli.load(run, index=name).search(QUERIES, 5)]
               for name in ("small", "other")}
    shared = twotower_cli.load(run, index="small")
    errors, seen, stop = [], [], threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                got = [[(h.id, h.document) for h in q] for q in shared.search(QUERIES, 5)]
                seen.append(got)
                if got not in answers.values():
                    errors.append(got)
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            shared.use_index("other" if i % 2 else "small")
            if i % 3 == 0:  # the same documents again: a new build under the readers
                twotower_cli.load(run).index_documents(docs[:300], name="small")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:2]
    assert len(seen) > 10 and {json.dumps(a) for a in seen} == {json.dumps(a) for a in answers.values()}


def test_a_plan_asked_again_is_the_same_plan():
    """evaluate marks the row of the run's own search as the default: asking a dense run for dense is its plan."""
    from twotower_cli.retrieval.search import SearchPlan

    dense, hybrid = SearchPlan(mode="dense", hybrid_weight=1.0), SearchPlan(mode="hybrid", hybrid_weight=0.7)
    assert dense.forced("dense") == dense and hybrid.forced("hybrid") == hybrid and hybrid.forced() == hybrid
    assert dense.forced("hybrid").hybrid_weight == 0.5 and hybrid.forced("hybrid", 0.2).hybrid_weight == 0.2
    assert SearchPlan(mode="bm25", hybrid_weight=0.0).forced("hybrid").hybrid_weight == 0.5


def test_a_faiss_index_is_read_once_not_at_every_search(run, monkeypatch):
    faiss = pytest.importorskip("faiss")
    import twotower_cli

    api = twotower_cli.load(run)
    docs = api.index.all_documents()[:200]
    api.index_documents(docs, name="ann", backend="faiss")
    reads = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a, **k: reads.append(a) or real(*a, **k))
    ann = twotower_cli.load(run, index="ann")
    for q in QUERIES[:4]:
        assert ann.search(q, k=3, mode="dense")[0]
    assert len(reads) == 1


def test_writing_an_index_that_fails_leaves_no_file_open(tmp_path):

    from twotower_cli.data.vocab import Vocab
    from twotower_cli.retrieval.build import write_folder

    def fail(tokens):
        raise RuntimeError("the model failed")

    vocab = Vocab.build([pl.Series(["abc"])], 1, 10)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError):
        write_folder(tmp_path / "ix", document_model(fail, lexical_exact=False), vocab,
                     [(pl.Series(["alpha", "beta"]), None)], "cpu", "float32", 8, None, None)
    opened = {os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not [p for p in opened if str(tmp_path) in p], opened


def test_an_atomic_write_syncs_the_folder_that_holds_the_rename(tmp_path, monkeypatch):
    import stat

    from twotower_cli import runs

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    runs.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert synced == [False, True]  # the file's data, then the folder's entry

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import write
from twotower_cli.evaluation.metrics import retrieval_metrics
from twotower_cli.retrieval.topk import exact_topk

SMALL = ["--embedding-dim", "32", "--hidden-dim", "64", "--batch-size", "64", "--max-document-length", "128",
         "--epochs", "1", "--no-report"]


@pytest.fixture
def trained(cli, tiny_pairs, tmp_path):
    res = cli("train", tiny_pairs, *SMALL, "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.stderr
    return tmp_path / "runs"


@pytest.mark.parametrize("n,q,k,chunk,block", [(1000, 7, 10, 128, 16), (1000, 3, 10, 1000, 64), (37, 2, 50, 8, 4), (3000, 300, 10, 512, 16),
                                               (5000, 1, 100, 999, 64), (10, 4, 3, 3, 1)])
def test_topk_equals_brute_force(n, q, k, chunk, block):
    g = torch.Generator().manual_seed(n + q)
    corpus = torch.randn(n, 16, generator=g)
    queries = torch.randn(q, 16, generator=g)
    s, i = exact_topk(queries, corpus, k, chunk=chunk, block=block)
    full = queries @ corpus.T
    ref = torch.topk(full, min(k, n), dim=1)
    torch.testing.assert_close(s, ref.values)
    torch.testing.assert_close(torch.gather(full, 1, i), ref.values)  # indices point at those scores
    assert s.shape == (q, min(k, n))


def test_topk_ties_and_float16_memmap(tmp_path):
    corpus = np.zeros((300, 8), dtype=np.float16)
    corpus[:, 0] = 1.0  # every document ties
    np.save(tmp_path / "e.npy", corpus)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    s, i = exact_topk(torch.ones(2, 8), mm, 5, chunk=64, block=8)
    assert torch.all(s == 1.0) and len(set(i[0].tolist())) == 5


def test_metrics_hand_computed():
    ranked = [[3, 1, 2], [5, 6, 7], [9, 8, 4]]
    qrels = [{1: 1.0}, {0: 1.0}, {9: 1.0, 4: 1.0}]
    m = retrieval_metrics(ranked, qrels)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["recall@1"] == pytest.approx((0 + 0 + 0.5) / 3)
    assert m["recall@10"] == pytest.approx((1 + 0 + 1) / 3)
    ndcg_q3 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 0 + ndcg_q3) / 3)
    assert m["map@100"] == pytest.approx((1 / 2 + 0 + (1 + 2 / 3) / 2) / 3)
    graded = retrieval_metrics([[1, 2]], [{1: 1.0, 2: 3.0}])
    assert graded["ndcg@10"] == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))


def test_metrics_match_pytrec_eval():
    """Rankings of 150 of 200 documents, so every cut-off (@1, @10, @100) is exercised; graded, multi-relevant
    judgements, some relevant documents ranked past 100 or not at all, and queries whose judgements are all 0."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    ranked = [rng.permutation(200)[:150].tolist() for _ in range(40)]
    qrels = [{int(d): float(rng.integers(0 if i % 10 == 0 else 1, 3)) for d in rng.permutation(200)[:4]}
             for i in range(40)]
    qrels[5] = {int(d): 0.0 for d in rng.permutation(200)[:3]}  # judged, nothing relevant: scores 0
    ours = retrieval_metrics(ranked, qrels)
    rel = {str(i): {str(d): int(g) for d, g in q.items()} for i, q in enumerate(qrels)}

    def trec(measures: set, depth: int) -> dict:
        run = {str(i): {str(d): float(1000 - r) for r, d in enumerate(row[:depth])} for i, row in enumerate(ranked)}
        res = pytrec_eval.RelevanceEvaluator(rel, measures).evaluate(run)
        return {m: np.mean([res[str(i)][m] for i in range(len(ranked))]) for m in next(iter(res.values()))}

    at10 = trec({"recip_rank", "ndcg_cut.10", "recall.10"}, 10)  # MRR@10: the reciprocal rank within the top 10
    at100 = trec({"recall.100", "map_cut.100", "recall.1"}, 150)
    assert ours["mrr@10"] == pytest.approx(at10["recip_rank"], abs=1e-12)
    assert ours["ndcg@10"] == pytest.approx(at10["ndcg_cut_10"], abs=1e-12)
    assert ours["recall@10"] == pytest.approx(at10["recall_10"], abs=1e-12)
    assert ours["recall@1"] == pytest.approx(at100["recall_1"], abs=1e-12)
    assert ours["recall@100"] == pytest.approx(at100["recall_100"], abs=1e-12)
    assert ours["map@100"] == pytest.approx(at100["map_cut_100"], abs=1e-12)
    assert 0 < ours["recall@100"] < 1  # some relevant documents lie past rank 100: the cut-off matters


def test_search_json_schema_and_table(cli, trained):
    res = cli("search", "GNU C compiler", "--runs-dir", trained, "--json", "-k", "3")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # nothing but JSON on stdout
    assert doc["top_k"] == 3 and doc["index"] == "default"
    hits = doc["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(set(h) == {"rank", "score", "id", "document"} for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    table = cli("search", "bibliothèque für 日本語 ✓", "--runs-dir", trained)
    assert table.exit_code == 0 and "score" in table.stdout


def test_search_many_queries_from_file(cli, trained, tmp_path):
    write(tmp_path / "q.txt", "python library\n\nweb server\n")
    res = cli("search", "--queries", tmp_path / "q.txt", "--runs-dir", trained, "--json")
    assert [r["query"] for r in json.loads(res.stdout)["results"]] == ["python library", "web server"]
    pl.DataFrame({"query": ["editor"]}).write_parquet(tmp_path / "q.parquet")
    res = cli("search", "--queries", tmp_path / "q.parquet", "--runs-dir", trained, "--json")
    assert json.loads(res.stdout)["results"][0]["query"] == "editor"


def test_empty_query_is_a_clear_error(cli, trained):
    for q in ("", "   \t", "\u200b\u2060 \ufeff"):  # zero-width characters: nothing to search for either
        res = cli("search", q, "--runs-dir", trained)
        assert res.exit_code == 2 and "empty" in res.stderr and "Traceback" not in res.stderr


def test_no_run_yet(cli, tmp_path):
    res = cli("search", "x", "--runs-dir", tmp_path / "none")
    assert res.exit_code == 1 and "train one first" in res.stderr


def test_index_command_and_stale_index(cli, trained, tmp_path, tiny_pairs):
    corpus = write(tmp_path / "corpus.jsonl", "\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in
                                                      enumerate(["apt package manager", "the vim editor",
                                                                 "the vim editor", "web server nginx"])))
    res = cli("index", corpus, "--name", "mine", "--id-col", "id", "--runs-dir", trained, "--dtype", "float16")
    assert res.exit_code == 0, res.stderr
    meta = json.loads(((trained / "latest").resolve() / "index/mine/meta.json").read_text())
    assert meta["count"] == 3 and meta["dtype"] == "float16"  # the duplicate stored once
    res = cli("search", "vim", "--index", "mine", "--runs-dir", trained, "--json")
    assert {h["id"] for h in json.loads(res.stdout)["results"][0]["hits"]} == {"d0", "d1", "d3"}
    # retrain into the same folder: the old run's index now belongs to another model
    old = (trained / "latest").resolve()
    new_model = cli("train", tiny_pairs, *SMALL, "--runs-dir", trained, "--seed", "99")
    assert new_model.exit_code == 0
    new = (trained / "latest").resolve()
    for name in ("model.safetensors", "config.json"):  # the other model, whole (its weights match its config)
        (old / name).write_bytes((new / name).read_bytes())
    res = cli("search", "vim", "--index", "mine", "--run", old.name, "--runs-dir", trained)
    assert res.exit_code == 1 and "another model" in res.stderr


def in_full_layout(run) -> None:
    """The run's default index rebuilt in the full layout (the default is compact)."""
    import twotower_cli

    model = twotower_cli.load(run)
    model.index_documents(model.index.all_documents(), "default", model.index.ids.range(0, model.index.count),
                          layout="full")


@pytest.mark.parametrize("name", ["embeddings.npy", "lexical.weights.npy", "lexical.indptr.npy",
                                  "postings.weights.npy", "postings.indptr.npy", "postings.docs.npy"])
def test_corrupt_index_names_the_file(cli, trained, name):
    if name.startswith("lexical."):
        in_full_layout((trained / "latest").resolve())
    path = (trained / "latest").resolve() / "index/default" / name
    path.write_bytes(path.read_bytes()[: 200])
    res = cli("search", "vim", "--runs-dir", trained)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert (name in res.stderr or "lexical rows" in res.stderr) and "rebuild" in res.stderr, res.stderr


def damage_lexical(folder, how):
    if how == "meta":
        meta = json.loads((folder / "meta.json").read_text())
        meta["lexical"] = None
        (folder / "meta.json").write_text(json.dumps(meta))
        return
    if how == "rows past the end":  # (the compact layout's postings)
        a = np.load(folder / "postings.docs.npy")
        a[:] = np.iinfo(a.dtype).max
        np.save(folder / "postings.docs.npy", a)
        return
    name = {"negative buckets": "buckets", "float offsets": "indptr", "nan weights": "weights"}[how]
    a = np.load(folder / f"lexical.{name}.npy")
    if how == "negative buckets":
        a[:] = -5
    elif how == "float offsets":
        a = a.astype(np.float64)
    else:
        a[3] = np.nan
    np.save(folder / f"lexical.{name}.npy", a)


@pytest.mark.parametrize("how", ["negative buckets", "float offsets", "nan weights", "meta", "rows past the end"])
def test_lexical_rows_damaged_in_place_are_refused(cli, trained, how):
    """Damage that keeps the files' shapes: caught by the types, the checksums in meta.json, or meta.json's checks."""
    folder = (trained / "latest").resolve() / "index/default"
    if how not in ("meta", "rows past the end"):
        in_full_layout((trained / "latest").resolve())
    damage_lexical(folder, how)
    res = cli("search", "vim", "--runs-dir", trained, "--mode", "dense")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "rebuild the index" in res.stderr and "internal error" not in res.stderr, res.stderr


def test_the_first_pass_adds_an_even_mix_whatever_the_stored_weight():
    from twotower_cli.retrieval.lexical import first_pass

    rng = np.random.default_rng(0)
    sketch_q, learned_q = rng.normal(size=(3, 8)), rng.normal(size=(3, 4))
    sketch_d, learned_d = rng.normal(size=(20, 8)), rng.normal(size=(20, 4))
    even = 0.5 * sketch_q @ sketch_d.T + 0.5 * learned_q @ learned_d.T
    for w in (0.1, 0.5, 0.9):
        q = np.hstack([np.sqrt(w) * sketch_q, np.sqrt(1 - w) * learned_q]).astype(np.float32)
        d = np.hstack([np.sqrt(w) * sketch_d, np.sqrt(1 - w) * learned_d]).astype(np.float32)
        f = first_pass(q, 8, w)  # the queries as stored, then (weight not 0.5) their even mix
        np.testing.assert_allclose(f[:3], q)
        np.testing.assert_allclose(f[3:] @ d.T if w != 0.5 else f @ d.T, even, atol=1e-5)


class OneProcess:
    """What `build_sharded` needs of the process group, for one process: no collectives."""
    rank, world, main, device = 0, 1, True, "cpu"

    def broadcast(self, obj):
        return obj

    def barrier(self):
        pass

    def any(self, flag):
        return flag


def test_a_sharded_build_refuses_a_corpus_that_changed_and_leaves_nothing(trained):
    import polars as pl

    import twotower_cli
    from twotower_cli.errors import DataError
    from twotower_cli.retrieval.sharded import build_sharded

    api = twotower_cli.load(trained / "latest")
    reads = []

    def chunks():
        reads.append(1)
        docs = ["gnu c compiler", "a text editor", "python web framework"]
        if len(reads) > 1:  # the second read (rank 0 assembling) sees the file changed
            docs = docs[::-1]
        return iter([(pl.Series(docs), None)])

    with pytest.raises(DataError, match="changed while it was being indexed"):
        build_sharded(api.run_dir, api.torch_model(), api.vocab, chunks, "moved", OneProcess())

    def interrupted():
        yield pl.Series(["gnu c compiler"]), None
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_sharded(api.run_dir, api.torch_model(), api.vocab, interrupted, "stopped", OneProcess())
    left = [p.name for p in (api.run_dir / "index").iterdir() if ".shards-" in p.name or p.name in ("moved", "stopped")]
    assert left == []


def make_eval(tmp_path, sample_df, layout):
    pos = sample_df.filter(pl.col("label") == 1).head(40)
    docs = pos["document"].to_list()
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "parquet":
        pl.DataFrame({"query_id": [f"q{i}" for i in range(40)], "query": pos["query"]}).write_parquet(folder / "queries.parquet")
        pl.DataFrame({"doc_id": [f"d{i}" for i in range(40)], "document": docs}).write_parquet(folder / "corpus.parquet")
        pl.DataFrame({"query_id": [f"q{i}" for i in range(40)], "doc_id": [f"d{i}" for i in range(40)]}).write_parquet(folder / "qrels.parquet")
    else:
        write(folder / "corpus.jsonl", "\n".join(json.dumps({"_id": f"d{i}", "title": "", "text": d}) for i, d in enumerate(docs)))
        write(folder / "queries.jsonl", "\n".join(json.dumps({"_id": f"q{i}", "text": q}) for i, q in enumerate(pos["query"])))
        write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(40)))
    return folder


@pytest.mark.parametrize("layout", ["parquet", "beir"])
def test_evaluate_both_layouts_with_bm25(cli, trained, tmp_path, sample_df, layout):
    folder = make_eval(tmp_path, sample_df, layout)
    res = cli("evaluate", folder, "--runs-dir", trained, "--json", "--baseline", "bm25", "--hybrid")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    systems = {s["system"].split(" ")[0]: s for s in doc["systems"]}
    assert set(systems) == {"two-tower", "bm25", "hybrid"}
    chance = sum(1 / r for r in range(1, 11)) / 40  # MRR@10 of a random ranking of the 40 documents
    for s in systems.values():
        assert s["queries"] == 40 and s["documents"] == 40
        assert set(s["metrics"]) == {"mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "map@100"}
        assert s["metrics"]["mrr@10"] > 3 * chance, s["system"]
    assert systems["bm25"]["metrics"]["mrr@10"] > 0.5  # summaries share words with their descriptions
    assert systems["hybrid"]["system"].startswith("hybrid (dense weight")  # forced by --hybrid
    assert [s.get("default") for s in doc["systems"]].count(True) <= 1


def test_faiss_backend_index_and_search(cli, trained, tmp_path):
    pytest.importorskip("faiss")
    docs = [f"package number {i} provides the {w} tool" for i, w in enumerate(["vim", "emacs", "nano", "ed"] * 30)]
    corpus = write(tmp_path / "c.txt", "\n".join(docs))
    res = cli("index", corpus, "--name", "ann", "--backend", "faiss", "--runs-dir", trained)
    assert res.exit_code == 0, res.stderr
    meta = json.loads(((trained / "latest").resolve() / "index/ann/meta.json").read_text())
    assert meta["backend"] == "faiss" and meta["faiss"]["type"] == "HNSW32"
    exact_res = cli("index", corpus, "--name", "exact", "--runs-dir", trained)
    assert exact_res.exit_code == 0, exact_res.stderr
    agree = []
    for query in ("emacs tool", "package number 7", "the nano", "vim"):
        found = [[h["id"] for h in json.loads(cli("search", query, "--index", name, "--runs-dir", trained, "--json",
                                                   "-k", "10", "--mode", "dense").stdout)["results"][0]["hits"]]
                 for name in ("ann", "exact")]
        assert len(found[0]) == 10
        agree.append(len(set(found[0]) & set(found[1])) / 10)
    assert np.mean(agree) >= 0.9, agree  # HNSW at this size finds (nearly) what exact search finds

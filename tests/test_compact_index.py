"""`twotower index --layout compact`: the learned half and the exact lexical rows inverted (postings), without the
hashed sketch. The same search as the full layout, a fraction of its size."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import sample_pairs
from twotower_cli.model.sparse_rows import SparseRows
from twotower_cli.retrieval.postings import Postings, PostingsWriter, from_rows

SMALL = ["--embedding-dim", "32", "--hidden-dim", "64", "--batch-size", "64", "--max-document-length", "128",
         "--epochs", "1", "--no-report"]


def random_rows(seed: int, n: int, buckets: int) -> SparseRows:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    ids = np.concatenate([np.sort(rng.choice(buckets, m, replace=False)) for m in lengths]).astype(np.int32)
    return SparseRows(indptr, ids, rng.random(ids.size).astype(np.float32))


@pytest.mark.parametrize("chunk,range_entries,row_bits", [(700, 5000, 16), (3000, 1 << 20, 6), (1, 100, 3),
                                                       (250, 3000, 32)])
def test_postings_written_in_chunks_equal_the_rows_inverted_in_memory(chunk, range_entries, row_bits):
    """Written chunk by chunk, each row in ``row_bits`` bits (lists split into blocks of 2**row_bits rows): the
    same lists as the rows inverted whole, each list's rows ascending."""
    rows, buckets = random_rows(1, 900, 3000), 3000
    whole = from_rows(rows.indptr, rows.buckets, rows.weights, buckets, np.uint16, row_bits)
    wide = from_rows(rows.indptr, rows.buckets, rows.weights, buckets)  # (whole rows, one block)
    assert whole.blocks == max(1, -(-900 >> row_bits)) and whole.docs.dtype == (np.uint16 if row_bits < 32 else
                                                                                np.uint32)
    with tempfile.TemporaryDirectory() as d:
        writer = PostingsWriter(Path(d), buckets, range_entries=range_entries, row_bits=row_bits)
        for s in range(0, len(rows), chunk):
            part = rows.take(np.arange(s, min(len(rows), s + chunk)))
            writer.add(part.indptr, part.buckets, part.weights)
        assert writer.close() == rows.buckets.size
        read = Postings.load(Path(d), len(rows), buckets, row_bits, writer.scale)
        for name in ("indptr", "docs", "weights"):
            np.testing.assert_array_equal(np.asarray(getattr(read, name)), getattr(whole, name))
        for b in range(0, buckets, 7):
            np.testing.assert_array_equal(read.rows(b)[1], wide.rows(b)[1])
        assert read.in_range(len(rows)) and not read.in_range(len(rows) - 1) or row_bits == 32
        assert sorted(p.name for p in Path(d).iterdir()) == [f"postings.{n}.npy" for n in ("docs", "indptr", "weights")]


@pytest.mark.parametrize("row_bits", [32, 16, 5])
def test_postings_scores_are_the_rows_exact_dot_products(row_bits):
    rows, buckets = random_rows(2, 2000, 500), 500
    postings = from_rows(rows.indptr, rows.buckets, rows.weights, buckets, row_bits=row_bits)
    query = random_rows(3, 1, buckets)
    exact = rows.dots(query, 0, np.arange(len(rows)), np.zeros(buckets, np.float32))
    found, values = postings.scores(query.buckets, query.weights, len(rows))
    full = np.zeros(len(rows), np.float32)
    full[found] = values
    np.testing.assert_allclose(full, exact, rtol=1e-6, atol=1e-7)
    assert set(found.tolist()) == set(np.flatnonzero(exact).tolist())
    rng = np.random.default_rng(4)
    for some in (np.sort(rng.choice(len(rows), 300, replace=False)), np.arange(31, 40), np.array([len(rows) - 1])):
        np.testing.assert_allclose(postings.at(query.buckets, query.weights, some), exact[some], rtol=1e-6,
                                   atol=1e-7)
    # the first pass without the long lists: exactly what the short lists give
    longest = int(np.median(postings.lengths(query.buckets)))
    short = query.buckets[postings.lengths(query.buckets) <= longest]
    found, values = postings.scores(query.buckets, query.weights, len(rows), longest=longest)
    lists = [postings.rows(b)[1] for b in short]
    assert set(found.tolist()) == set(np.concatenate(lists).tolist()) and len(short) < len(query.buckets)
    # as stored: 2-byte fixed-point weights, within half a step of each weight
    fixed = from_rows(rows.indptr, rows.buckets, rows.weights, buckets, np.uint16, row_bits)
    found, values = fixed.scores(query.buckets, query.weights, len(rows))
    np.testing.assert_allclose(values, exact[found], rtol=0, atol=0.5 * fixed.scale * np.abs(query.weights).sum())
    np.testing.assert_allclose(fixed.at(query.buckets, query.weights, found), values, rtol=1e-6)


@pytest.fixture(scope="module")
def run_with_both(tmp_path_factory):
    """A small trained run with the same corpus indexed in both layouts."""
    from typer.testing import CliRunner

    from twotower_cli.cli.main import app

    folder = tmp_path_factory.mktemp("compact")
    pairs = sample_pairs(folder / "pairs.parquet", 600)
    docs = pl.read_parquet(pairs)["document"].unique(maintain_order=True)
    corpus = folder / "corpus.parquet"
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(len(docs))], "document": docs}).write_parquet(corpus)
    runner = CliRunner()
    runs = folder / "runs"
    res = runner.invoke(app, ["train", str(pairs), *SMALL, "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    for layout, dtype in (("full", "float32"), ("compact", "float32"), ("compact", "float16")):
        res = runner.invoke(app, ["index", str(corpus), "--runs-dir", str(runs), "--id-col", "doc_id", "--name",
                                  f"{layout}-{dtype}", "--layout", layout, "--dtype", dtype])
        assert res.exit_code == 0, res.output
    return runs


QUERIES = ["GNU C compiler", "text editor for the terminal", "python library for images", "fonts", "x",
           "database server", "a game with cards", "network monitoring tool"]


def brute_force(model, index, queries: list[str], k: int) -> list[list[str]]:
    """The ids of the k best documents of a full-layout index by the search's definition, every document scored:
    the learned half's dot product plus the exact lexical one (ties: the lower row)."""
    dim = index.meta["lexical"]["dim"]
    q, rows = model.encode_queries(queries), model.query_lexical(queries)
    learned = np.asarray(index.embeddings, dtype=np.float32)[:, dim:] @ q[:, dim:].T
    table = np.zeros(index.meta["lexical"]["buckets"], np.float32)
    out = []
    for j in range(len(queries)):
        s = learned[:, j] + index.lexical.dots(rows, j, np.arange(index.count), table)
        out.append(index.ids[np.lexsort((np.arange(index.count), -s))[:k].tolist()])
    return out


def test_compact_search_is_the_exact_search_and_the_full_one(run_with_both):
    import twotower_cli

    run = (run_with_both / "latest").resolve()
    full = twotower_cli.load(run, index="full-float32")
    compact = twotower_cli.load(run, index="compact-float32")
    assert [[h.id for h in hits] for hits in compact.search(QUERIES, k=10, mode="dense")] == \
        brute_force(full, full.index, QUERIES, 10)
    for mode in ("dense", "hybrid", "bm25"):
        a = full.search(QUERIES, k=10, mode=mode)
        b = compact.search(QUERIES, k=10, mode=mode)
        for x, y in zip(a, b):
            assert [h.id for h in x] == [h.id for h in y], mode
            # (a fusion normalises over each side's best 100: the full layout's first pass is not exact that deep;
            # the compact layout's lexical weights are 2-byte fixed point: a dot product moves by a few 1e-6)
            tolerance = 0.01 if mode == "hybrid" else 2e-5
            np.testing.assert_allclose([h.score for h in x], [h.score for h in y], rtol=1e-4, atol=tolerance)
    # float16 learned half: the same documents at the top, scores within float16's rounding
    half = twotower_cli.load(run, index="compact-float16").search(QUERIES, k=3, mode="dense")
    for x, y in zip(full.search(QUERIES, k=3, mode="dense"), half):
        assert x[0].id == y[0].id
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=2e-3)


def test_compact_index_is_smaller_and_says_what_it_holds(run_with_both):
    run = (run_with_both / "latest").resolve()
    full, compact = run / "index" / "full-float32", run / "index" / "compact-float16"
    meta = json.loads((compact / "meta.json").read_text())
    assert meta["layout"] == "compact" and meta["format_version"] == 5 and meta["dim"] == 32
    assert not list(compact.glob("lexical.*")) and (compact / "postings.docs.npy").is_file()
    emb = np.load(compact / "embeddings.npy")
    assert emb.dtype == np.float16 and emb.shape == (meta["count"], 32)

    def size(folder, skip=("postings.indptr.npy", "lexical.indptr.npy")):  # (per bucket / per row: fixed costs)
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    assert size(compact) < 0.5 * size(full)


def test_a_damaged_compact_index_is_named_never_served(run_with_both, tmp_path):
    import shutil

    import twotower_cli
    from twotower_cli.errors import ArtifactError

    run = (run_with_both / "latest").resolve()
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    folder = copy / "index" / "compact-float32"
    weights = np.load(folder / "postings.weights.npy")
    weights[len(weights) // 2] += 1
    np.save(folder / "postings.weights.npy", weights)
    with pytest.raises(ArtifactError, match="postings.weights.npy"):
        twotower_cli.load(copy, index="compact-float32").search(QUERIES, k=5, mode="dense")
    (folder / "postings.docs.npy").unlink()
    with pytest.raises(ArtifactError, match="postings.docs.npy: missing"):
        twotower_cli.load(copy, index="compact-float32").search(QUERIES, k=5)


def test_compact_layout_needs_the_exact_lexical_half_and_the_exact_backend(run_with_both, cli, tmp_path):
    corpus = tmp_path / "c.parquet"
    pl.DataFrame({"document": ["a", "b"]}).write_parquet(corpus)
    res = cli("index", corpus, "--runs-dir", run_with_both, "--layout", "compact", "--backend", "faiss")
    assert res.exit_code != 0 and "--backend exact" in res.stderr
    res = cli("index", corpus, "--runs-dir", run_with_both, "--layout", "sideways")
    assert res.exit_code != 0 and "--layout 'sideways'" in res.stderr


def test_the_top_10_does_not_depend_on_k():
    """Rows past the first pass's best ``rerank`` follow them, re-scored among themselves: asking for more results
    shows more of one ranking (the long lists' additions never lift a row from past ``rerank`` into the top)."""
    from twotower_cli.retrieval.compact import exact_ranking

    rows, buckets = random_rows(5, 3000, 60), 60  # few buckets: long lists, whose additions reorder rows
    postings = from_rows(rows.indptr, rows.buckets, rows.weights, buckets)
    queries = random_rows(6, 4, buckets)
    rng = np.random.default_rng(7)
    learned_q, learned_d = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((3000, 8)) * 0.01
    top10 = exact_ranking(learned_q, queries, learned_d, postings, 10, longest=100, rerank=50)[1]
    for depth in (50, 51, 400, 3000):
        s, found = exact_ranking(learned_q, queries, learned_d, postings, depth, longest=100, rerank=50)
        np.testing.assert_array_equal(found[:, :10], top10)
        assert (np.sort(found, 1)[:, 1:] != np.sort(found, 1)[:, :-1]).all()  # each row once


def test_a_compact_index_of_format_4_still_loads_and_searches_the_same(run_with_both, tmp_path):
    """Format 4 stored whole rows (uint32) and float32 weights, without ``row_bits``: still read."""
    import shutil

    import twotower_cli
    from twotower_cli.retrieval.index import file_digest
    from twotower_cli.retrieval.meta_file import meta_digest

    run = (run_with_both / "latest").resolve()
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    folder = copy / "index" / "compact-float32"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["lexical"]["row_bits"] == 16 and np.load(folder / "postings.docs.npy").dtype == np.uint16
    scale = meta["lexical"].pop("weight_scale")
    for name, f in (("docs", lambda a: a.astype(np.uint32)), ("weights", lambda a: (a * scale).astype(np.float32))):
        np.save(folder / f"postings.{name}.npy", f(np.load(folder / f"postings.{name}.npy")))  # (one block)
        meta["lexical"]["sha256"][name] = file_digest(folder / f"postings.{name}.npy")
    del meta["lexical"]["row_bits"]
    meta["format_version"] = 4
    meta["meta_sha256"] = meta_digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    old = twotower_cli.load(copy, index="compact-float32")
    assert old.index.lexical.docs.dtype == np.uint32
    new = twotower_cli.load(run, index="compact-float32")
    for x, y in zip(old.search(QUERIES, k=10), new.search(QUERIES, k=10)):
        assert [h.id for h in x] == [h.id for h in y]


def test_evaluate_searches_an_index_built_from_the_corpus_without_holding_it(run_with_both, cli, tmp_path):
    """`evaluate --index NAME`: the corpus's ids are read, not its texts; the figures are the in-memory ones."""
    import shutil

    folder = run_with_both.parent
    ev = tmp_path / "eval"
    ev.mkdir()
    shutil.copy(folder / "corpus.parquet", ev / "corpus.parquet")
    corpus = pl.read_parquet(ev / "corpus.parquet")
    pairs = pl.read_parquet(folder / "pairs.parquet").filter(pl.col("label") == 1).unique("query").head(80)
    qrels = pairs.join(corpus, on="document").with_columns(query_id=pl.format("q{}", pl.int_range(pl.len())))
    qrels.select("query_id", "query").write_parquet(ev / "queries.parquet")
    qrels.select("query_id", "doc_id").write_parquet(ev / "qrels.parquet")
    figures = {}
    for index in (None, "full-float32", "compact-float32"):
        res = cli("evaluate", ev, "--runs-dir", run_with_both, "--baseline", "bm25", "--json",
                  *(["--index", index] if index else []))
        assert res.exit_code == 0, res.stderr
        figures[index] = {r["system"].split(" (")[0]: r["metrics"]["mrr@10"] for r in json.loads(res.stdout)["systems"]}
    assert figures[None]["bm25"] == figures["full-float32"]["bm25"] == figures["compact-float32"]["bm25"]
    assert figures[None]["two-tower"] == figures["full-float32"]["two-tower"] > 0.3  # (in memory: the full layout)
    # each index's figure is its own search's, as the API ranks it
    import twotower_cli
    from twotower_cli.evaluation.metrics import retrieval_metrics

    queries, row_of = qrels["query"].to_list(), {d: i for i, d in enumerate(corpus["doc_id"].to_list())}
    relevant = [{row_of[d]: 1.0} for d in qrels["doc_id"].to_list()]
    for index in ("full-float32", "compact-float32"):
        hits = twotower_cli.load(run_with_both / "latest", index=index).search(queries, k=100, mode="dense")
        ranked = [[row_of[h.id] for h in hs] + [-1] * (100 - len(hs)) for hs in hits]
        assert figures[index]["two-tower"] == pytest.approx(retrieval_metrics(ranked, relevant)["mrr@10"], abs=1e-9)
    # an index of other documents: named, with the command that builds the right one
    pl.DataFrame({"doc_id": ["x"], "document": ["another corpus"]}).write_parquet(tmp_path / "other.parquet")
    assert cli("index", tmp_path / "other.parquet", "--runs-dir", run_with_both, "--id-col", "doc_id", "--name",
               "other").exit_code == 0
    res = cli("evaluate", ev, "--runs-dir", run_with_both, "--index", "other")
    assert res.exit_code != 0 and "not in" in res.stderr and "--id-col doc_id --name other" in res.stderr

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


@pytest.mark.parametrize("chunk,range_entries", [(700, 5000), (3000, 1 << 20), (1, 100)])
def test_postings_written_in_chunks_equal_the_rows_inverted_in_memory(chunk, range_entries):
    rows, buckets = random_rows(1, 900, 3000), 3000
    whole = from_rows(rows.indptr, rows.buckets, rows.weights, buckets)
    with tempfile.TemporaryDirectory() as d:
        writer = PostingsWriter(Path(d), buckets, range_entries=range_entries)
        for s in range(0, len(rows), chunk):
            part = rows.take(np.arange(s, min(len(rows), s + chunk)))
            writer.add(part.indptr, part.buckets, part.weights)
        assert writer.close() == rows.buckets.size
        read = Postings.load(Path(d), len(rows), buckets)
        for name in ("indptr", "docs", "weights"):
            np.testing.assert_array_equal(np.asarray(getattr(read, name)), getattr(whole, name))
        assert sorted(p.name for p in Path(d).iterdir()) == [f"postings.{n}.npy" for n in ("docs", "indptr", "weights")]


def test_postings_scores_are_the_rows_exact_dot_products():
    rows, buckets = random_rows(2, 2000, 500), 500
    postings = from_rows(rows.indptr, rows.buckets, rows.weights, buckets)
    query = random_rows(3, 1, buckets)
    exact = rows.dots(query, 0, np.arange(len(rows)), np.zeros(buckets, np.float32))
    found, values = postings.scores(query.buckets, query.weights, len(rows))
    full = np.zeros(len(rows), np.float32)
    full[found] = values
    np.testing.assert_allclose(full, exact, rtol=1e-6, atol=1e-7)
    assert set(found.tolist()) == set(np.flatnonzero(exact).tolist())
    some = np.sort(np.random.default_rng(4).choice(len(rows), 300, replace=False))
    np.testing.assert_allclose(postings.at(query.buckets, query.weights, some), exact[some], rtol=1e-6, atol=1e-7)
    # the first pass without the long lists: exactly what the short lists give
    longest = int(np.median(postings.lengths(query.buckets)))
    short = query.buckets[postings.lengths(query.buckets) <= longest]
    found, values = postings.scores(query.buckets, query.weights, len(rows), longest=longest)
    lists = [postings.docs[postings.indptr[b]:postings.indptr[b + 1]] for b in short]
    assert set(found.tolist()) == set(np.concatenate(lists).tolist()) and len(short) < len(query.buckets)


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
            # (a fusion normalises over each side's best 100: the full layout's first pass is not exact that deep)
            tolerance = 0.01 if mode == "hybrid" else 1e-5
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
    assert meta["layout"] == "compact" and meta["format_version"] == 4 and meta["dim"] == 32
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
    weights[len(weights) // 2] = np.nan
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

"""Pieces of the model that are pure functions: a document's opening, sparse rows, the choice of weights."""

from __future__ import annotations

import numpy as np


def test_an_opening_is_cut_before_a_word_it_would_split():
    from twotower_cli.model.numpy_encoder import lead_tokens

    is_word = np.zeros(8, dtype=bool)
    is_word[3:] = True  # 0 pads, 1 and 2 are spaces and dots, 3.. letters
    a = np.array([[3, 4, 1, 5, 6, 1, 7, 3, 0, 0]])  # "ab cd ea"
    assert lead_tokens(a, 5, is_word).tolist() == [[3, 4, 1, 5, 6]]  # ends where a word ends: kept
    assert lead_tokens(a, 4, is_word).tolist() == [[3, 4, 1, 0]]  # "c" of "cd" would be a word: dropped
    assert lead_tokens(a, 3, is_word).tolist() == [[3, 4, 1]]
    assert lead_tokens(np.array([[3, 4, 5, 6, 7]]), 3, is_word).tolist() == [[3, 4, 5]]  # one long word: kept
    assert lead_tokens(a[:, :4], 6, is_word).tolist() == [[3, 4, 1, 5]]  # shorter than the opening: whole
    both = lead_tokens(np.concatenate([a, a[:, ::-1]]), 4, is_word)
    assert both.tolist() == [[3, 4, 1, 0], [0, 0, 3, 7]]  # rows are cut independently


def test_sparse_rows_plus_is_the_sum_of_the_dense_rows():
    from twotower_cli.model.sparse_rows import SparseRows

    rng = np.random.default_rng(3)

    def rows(n, buckets):
        text = rng.integers(0, n, 40)
        return SparseRows.from_features(rng.integers(0, buckets, 40), rng.random(40), text, n)

    def dense(r, buckets):
        out = np.zeros((len(r), buckets))
        for i in range(len(r)):
            np.add.at(out[i], r.buckets[r.indptr[i]:r.indptr[i + 1]], r.weights[r.indptr[i]:r.indptr[i + 1]])
        return out

    a, b = rows(6, 30), rows(6, 30)
    got = a.plus(b, 0.35)
    np.testing.assert_allclose(dense(got, 30), dense(a, 30) + 0.35 * dense(b, 30), atol=1e-6)
    assert all((np.diff(got.buckets[s:e]) > 0).all() for s, e in zip(got.indptr[:-1], got.indptr[1:]))
    empty = SparseRows(np.zeros(4, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    assert len(empty.plus(empty, 1.0)) == 3


def test_the_openings_weight_is_above_zero_only_beyond_a_tie():
    from twotower_cli.training.choices import TIE, pick_lead

    assert pick_lead({0.0: 0.40, 0.1: 0.40 + TIE / 2, 0.2: 0.40 + TIE * 0.9}) == 0.0
    assert pick_lead({0.0: 0.40, 0.1: 0.42, 0.2: 0.43, 0.35: 0.43}) == 0.2  # the best; on a tie the smaller
    assert pick_lead({0.0: 0.40, 0.1: 0.39}) == 0.0
    assert pick_lead({0.0: 0.40}) == 0.0

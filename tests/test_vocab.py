import json

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower_cli.data.vocab import PAD, UNK, Vocab, visible
from twotower_cli.errors import ArtifactError


def build(texts, **kw):
    return Vocab.build([pl.Series(texts)], **kw)


def test_ids_by_frequency_with_pad_and_unknown():
    v = build(["aab", "ab"], min_freq=1)
    assert v.chars == ["a", "b"] and len(v) == 4
    ids = v.encode(pl.Series(["abz", ""]), 5)
    assert ids.tolist() == [[2, 3, UNK, PAD, PAD], [0, 0, 0, 0, 0]]  # unknown 'z' maps to 1, not dropped


def test_min_freq_max_size_lowercase():
    v = build(["AAAbbc"], min_freq=2)
    assert v.chars == ["a", "b"]
    v = build(["aaabbc"], min_freq=1, max_size=3)
    assert v.chars == ["a"]
    v = build(["AB"], lowercase=False)
    assert set(v.chars) == {"A", "B"}
    assert v.encode(pl.Series(["ab"]), 2).tolist() == [[UNK, UNK]]


def test_truncation_and_padding():
    v = build(["abcdef"])
    assert v.encode(pl.Series(["abcdef"]), 3).shape == (1, 3)
    assert (v.encode(pl.Series(["ab"]), 4)[0, 2:] == PAD).all()


def test_vectorised_equals_a_per_character_loop(sample_df):
    docs = sample_df["document"].head(300)
    v = Vocab.build([docs], min_freq=2)
    stoi = {c: i + 2 for i, c in enumerate(v.chars)}
    fast = v.encode(docs, 128)
    for row, text in zip(fast, docs.str.to_lowercase().to_list()):
        slow = [stoi.get(c, UNK) for c in text[:128]] + [PAD] * max(0, 128 - len(text))
        assert row.tolist() == slow


def test_json_round_trip_and_corruption(tmp_path):
    v = build(["héllo wörld\t"])
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(v.to_json()))
    w = Vocab.load(path)
    assert w.chars == v.chars and w.counts == v.counts
    obj = v.to_json()
    obj["chars"][0]["id"] = 99
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match="vocab.json"):
        Vocab.load(path)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Vocab.load(path)
    obj = v.to_json()
    obj["format_version"] = 99
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match="newer"):
        Vocab.load(path)


def test_visible_marks():
    assert visible(" ") == "␠" and visible("\x07") == "U+0007" and visible("é") == "é"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=5), st.integers(1, 40))
def test_any_unicode_encodes_with_lengths_and_padding(texts, max_len):
    v = build(["abc def ĳ 字"])
    ids = v.encode(pl.Series(texts, dtype=pl.String), max_len)
    assert ids.shape == (len(texts), max_len) and ids.dtype == np.int32
    for row, text in zip(ids, texts):
        n = min(len(text), max_len)
        assert (row[n:] == PAD).all() and (row[:n] != PAD).all()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc def字"))))
def test_known_characters_round_trip(text):
    v = build(["abc def字"])
    assert v.decode(v.encode(pl.Series([text]), max(len(text), 1))[0]) == text


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.none()), min_size=1, max_size=12))
def test_tokens_on_demand_equal_tokens_up_front(texts):
    import torch

    from twotower_cli.data.tokens import TokenTable

    series = pl.Series(texts, dtype=pl.String)
    v = build(["Abc déf ☃ \x00 𝄞 ab", "xyz"], min_freq=1, max_size=12)
    upfront, on_demand = TokenTable(series, v, 16, eager=True), TokenTable(series, v, 16, eager=False)
    idx = torch.arange(len(texts)).flip(0)
    assert torch.equal(on_demand[idx], upfront[idx]) and torch.equal(on_demand[1:], upfront[1:])
    assert torch.equal(on_demand.subset(idx)[0:len(texts)], upfront.subset(idx)[0:len(texts)])
    assert on_demand.rows_tokenised == 2 * len(texts) - 1 and on_demand.shape == upfront.shape


def test_characters_counted_in_slices_equal_one_count_of_the_whole_column():
    """Vocab.build counts a slice of rows at a time (bounded memory); slices must change nothing."""
    import numpy as np
    import polars as pl

    from twotower_cli.data.vocab import codepoint_counts

    texts = pl.Series(["héllo wörld ☃", "", "abc\tdef", "日本語のテキスト", "x" * 50, "😀 emoji", "line\nbreak"] * 3)
    whole = np.bincount(np.frombuffer("".join(texts.to_list()).encode("utf-32-le"), dtype=np.uint32),
                        minlength=0x110000)
    for rows in (1, 2, 5, 8192):
        assert (codepoint_counts(texts, rows=rows) == whole).all()
    vocab = Vocab.build([texts], min_freq=1, max_size=100, lowercase=False)
    assert vocab.chars[0] == "x" and "☃" in vocab.chars and len(vocab.chars) == len(set("".join(texts.to_list())))

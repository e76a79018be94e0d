"""The ngram towers in NumPy, straight from `model.safetensors` mapped into memory: hashing, a weighted sum of table
rows, a norm and a projection (and the lexical half). Used to answer queries without importing torch, which takes
longer to import than a search takes; `tests/test_api_serve.py` holds it equal to the torch towers.

Every integer step is the same int64 arithmetic as `towers.NgramEncoder.features`, so the n-gram buckets are
identical; only the order of float sums differs (~1e-7)."""

from __future__ import annotations

import math

import numpy as np

from twotower_cli.model.config import BASE, MIX, MOD, ModelConfig, hash_powers


class NumpyTowers:
    def __init__(self, cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "model.safetensors"):
        if cfg.encoder != "ngram":
            raise ValueError("the NumPy path covers the ngram encoder only")
        self.cfg = cfg
        self.t = tensors
        check_shapes(cfg, tensors, where)
        table = "query_tower.bag.weight"
        self.tables = {"query": tensors[table],
                       "document": tensors[table] if cfg.shared_embeddings else tensors["document_tower.bag.weight"]}
        self.idf = tensors.get("query_tower.idf")
        self.mean_words = float(tensors["query_tower.mean_words"][0]) if "query_tower.mean_words" in tensors else 1.0
        is_word = np.zeros(cfg.vocab_size, dtype=bool)
        is_word[np.asarray(cfg.word_chars, dtype=np.int64)] = True
        self.is_word = is_word
        self.powers(max(cfg.max_query_length, cfg.max_document_length) + 2)  # longer rows (tests) grow them

    def powers(self, n: int) -> None:
        """BASE^i and its inverse mod MOD for i < n (a cold search builds them for its queries' length only)."""
        self.pow, self.inv_pow = (np.array(p, dtype=np.int64) for p in hash_powers(n))

    # -- features: (bucket, weight) per distinct n-gram, grouped by text --------------------------------------------
    def raw_features(self, ids: np.ndarray):
        ids = ids.astype(np.int64)
        B, L = ids.shape
        if L + 2 > len(self.pow):
            self.powers(L + 2)
        ext = np.pad(ids, ((0, 0), (1, 1)))
        tri = (ext[:, :-2] * BASE + ext[:, 1:-1]) * BASE + ext[:, 2:]
        word = self.is_word[ids]
        prefix = np.cumsum(ids * self.pow[:L] % MOD, axis=1) % MOD
        prev_word = np.pad(word, ((0, 0), (1, 0)))[:, :L]
        next_word = np.pad(word, ((0, 0), (0, 1)))[:, 1:]
        starts, ends = word & ~prev_word, word & ~next_word
        pos = np.broadcast_to(np.arange(L), (B, L))
        start_pos = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
        before = np.take_along_axis(np.pad(prefix, ((0, 0), (1, 0))), start_pos, axis=1)
        wh = (prefix - before) % MOD * self.inv_pow[start_pos] % MOD + 7919
        feats, oks = [tri % MOD, wh], [word if self.idf is not None else ids > 0, ends]
        if self.cfg.word_bigrams:
            last_end = np.maximum.accumulate(np.where(ends, pos, -1), axis=1)
            prev_end = np.take_along_axis(np.pad(last_end, ((0, 0), (1, 0)), constant_values=-1), start_pos, axis=1)
            prev_wh = np.take_along_axis(wh, np.maximum(prev_end, 0), axis=1)
            feats.append((prev_wh * 1000033 + wh) % MOD + 104729)
            oks.append(ends & (prev_end >= 0))
        return np.concatenate(feats, 1), np.concatenate(oks, 1), ends.sum(1)

    def features(self, ids: np.ndarray):
        """(buckets, weights, text of each feature), as `NgramEncoder.features` builds them; and word counts."""
        raw, ok, words = self.raw_features(ids)
        B, n = ok.shape
        buckets_n = self.cfg.ngram_buckets
        text = np.broadcast_to(np.arange(B)[:, None], (B, n))[ok]
        if self.idf is None:  # models without idf: every occurrence, weighted 1/sqrt(features of the text)
            counts = ok.sum(1)
            hashes = raw[ok] * MIX % (1 << 32) % buckets_n
            w = (1.0 / np.sqrt(np.maximum(counts, 1))).astype(np.float32)[text]
            return hashes, w, text, words
        L = n // (3 if self.cfg.word_bigrams else 2)
        kind = np.broadcast_to(np.arange(n)[None, :] // L, (B, n))[ok]
        buckets = (raw[ok] + kind * 0x3C6EF372) * 0x5BD1E995 % MOD % buckets_n
        group = text * 3 + kind
        key, tf = np.unique(group * buckets_n + buckets, return_counts=True)
        group, buckets = key // buckets_n, key % buckets_n
        idf = self.idf[buckets] if self.cfg.idf_power == 1.0 else self.idf[buckets] ** np.float32(self.cfg.idf_power)
        w = ((1.0 + np.log(tf.astype(np.float32))) * idf).astype(np.float32)
        norm = np.sqrt(np.bincount(group, weights=w.astype(np.float64) ** 2, minlength=B * 3)).astype(np.float32)
        share = self.cfg.word_share
        shares = np.array([1.0 - share, share / 2, share / 2] if self.cfg.word_bigrams else [1.0 - share, share, 0.0],
                          dtype=np.float32)
        w = w / np.maximum(norm[group], 1e-6) * np.sqrt(shares)[group % 3]
        return buckets, w.astype(np.float32), group // 3, words

    def lexical_rows(self, ids: np.ndarray, side: str):
        """The exact lexical half (`retrieval.lexical.SparseRows`), as `encode.lexical_rows` computes it."""
        from twotower_cli.model.sparse_rows import SparseRows

        buckets, w, text, words = self.features(ids)
        cfg = self.cfg
        scale = None
        if side == "document" and cfg.length_power:
            scale = (np.maximum(words, 1) / self.mean_words) ** cfg.length_power
        rows = SparseRows.from_features(buckets, w, text, ids.shape[0], scale, math.sqrt(cfg.lexical_weight))
        if side == "document" and cfg.lead_characters and cfg.lead_weight:
            buckets, w, text, _ = self.features(lead_tokens(ids, cfg.lead_characters, self.is_word))
            rows = rows.plus(SparseRows.from_features(buckets, w, text, ids.shape[0], None,
                                                      math.sqrt(cfg.lexical_weight)), cfg.lead_weight)
        return rows

    # -- the towers --------------------------------------------------------------------------------------------------
    def encode(self, ids: np.ndarray, side: str) -> np.ndarray:
        """Embeddings [B, output_dim] (float32) of token rows ``ids`` for ``side`` "query" or "document"."""
        cfg, B = self.cfg, ids.shape[0]
        buckets, w, text, words = self.features(ids)
        uniq, inverse = np.unique(buckets, return_inverse=True)
        rows = np.asarray(self.tables[side][uniq], dtype=np.float32)
        bag = segment_sum(rows[inverse] * w[:, None], text, B)
        prefix = f"{side}_tower."
        mean = bag.mean(1, keepdims=True)
        var = ((bag - mean) ** 2).mean(1, keepdims=True)
        x = (bag - mean) / np.sqrt(var + 1e-5) * self.t[prefix + "norm.weight"] + self.t[prefix + "norm.bias"]
        x = x @ np.asarray(self.t[prefix + "proj.weight"]).T + self.t[prefix + "proj.bias"]
        learned = normalize(x.astype(np.float32))
        if not cfg.lexical_dim:
            return learned
        lex = lexical(buckets, w, text, B, cfg.lexical_dim)
        if side == "document" and cfg.length_power:
            lex = lex * ((np.maximum(words, 1) / self.mean_words) ** cfg.length_power).astype(np.float32)[:, None]
        wt = cfg.lexical_weight
        return np.concatenate([math.sqrt(wt) * lex, math.sqrt(1.0 - wt) * learned], 1).astype(np.float32)


def lead_tokens(ids: np.ndarray, n: int, is_word: np.ndarray) -> np.ndarray:
    """The first ``n`` characters of each token row, less a word that runs past them (its first letters would be
    another word): a document's opening, which the exact lexical half counts a second time (`lead_weight`)."""
    lead = np.array(ids[:, :n])
    if ids.shape[1] > n and n > 0:
        cut = is_word[ids[:, n - 1]] & is_word[ids[:, n]]
        pos = np.arange(n)
        last_gap = np.where(~is_word[lead], pos, -1).max(1)  # the last character that is not part of a word
        drop = cut & (last_gap >= 0)  # (a row that is one long word keeps its first n characters)
        lead[drop] = np.where(pos > last_gap[drop, None], 0, lead[drop])
    return lead


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The weights an ngram model of this configuration has, and their shapes (what `TwoTower.weights()` saves)."""
    out = {}
    for side in ("query", "document"):
        p = f"{side}_tower."
        if side == "query" or not cfg.shared_embeddings:
            out[p + "bag.weight"] = (cfg.ngram_buckets, cfg.hidden_dim)
        out.update({p + "norm.weight": (cfg.hidden_dim,), p + "norm.bias": (cfg.hidden_dim,),
                    p + "proj.weight": (cfg.embedding_dim, cfg.hidden_dim), p + "proj.bias": (cfg.embedding_dim,)})
    if cfg.idf:
        out.update({"query_tower.idf": (cfg.ngram_buckets,), "query_tower.mean_words": (1,)})
    return out


def check_shapes(cfg: ModelConfig, tensors: dict, where: str) -> None:
    from twotower_cli.errors import ArtifactError

    want = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ArtifactError(f"{where}: weights do not match config.json (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); the files come from different models")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{where}: weight '{name}' has shape {tuple(tensors[name].shape)} but "
                                f"config.json implies {shape}; the files come from different models")


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def lexical(buckets: np.ndarray, w: np.ndarray, text: np.ndarray, n: int, dim: int) -> np.ndarray:
    """`towers.lexical` in NumPy: the weighted buckets hashed into ``dim`` signed columns, unit rows."""
    mixed = (buckets * 40503 + 12345) % MOD
    col, sign = mixed % dim, 1.0 - 2.0 * ((mixed // dim) % 2)
    out = np.bincount(text * dim + col, weights=(w * sign).astype(np.float64), minlength=n * dim)
    return normalize(out.astype(np.float32).reshape(n, dim))


def segment_sum(values: np.ndarray, text: np.ndarray, n: int) -> np.ndarray:
    """Sums of the rows of ``values`` per text; ``text`` is non-decreasing (features come grouped by text)."""
    out = np.zeros((n, values.shape[1]), dtype=np.float32)
    if values.shape[0] == 0:
        return out
    present, starts = np.unique(text, return_index=True)
    out[present] = np.add.reduceat(values, starts, axis=0)
    return out

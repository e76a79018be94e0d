"""A text's hashed character trigrams and words, weighted by idf: what the n-gram encoder embeds, and what the exact
lexical half of every model with one is made of (`encode.lexical_rows`, `retrieval/lexical.py`). Computed from the
character ids on the fly; no tokenizer state, no parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower_cli.model.config import BASE, MIX, MOD, ModelConfig, hash_powers


def powers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(p, dtype=torch.long) for p in hash_powers(n))


class NgramFeatures(nn.Module):
    """A text's hashed character trigrams and words, weighted (by idf when the model has it): what the n-gram
    encoder embeds, and what the exact lexical half of any model is made of. No parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets = cfg.ngram_buckets
        self.word_bigrams = cfg.word_bigrams
        is_word = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        is_word[torch.tensor(cfg.word_chars, dtype=torch.long)] = True
        self.register_buffer("is_word", is_word, persistent=False)
        pw, ipw = powers(max(cfg.max_query_length, cfg.max_document_length) + 2)  # longer rows grow them
        self.register_buffer("pow", pw, persistent=False)
        self.register_buffer("inv_pow", ipw, persistent=False)
        self.word_share = cfg.word_share
        self.idf_power = cfg.idf_power
        if cfg.idf:  # set from the training documents by ``set_idf``; all ones until then
            self.register_buffer("idf", torch.ones(cfg.ngram_buckets))
            self.register_buffer("mean_words", torch.ones(1))  # words in a training document, on average
        else:
            self.idf = self.mean_words = None

    def grow_powers(self, length: int) -> None:
        """Powers for rows of ``length`` (the exact lexical half may read more of a document than the towers)."""
        if length + 2 > self.pow.numel():
            pw, ipw = powers(length + 2)
            self.pow, self.inv_pow = pw.to(self.pow.device), ipw.to(self.pow.device)

    def word_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Words in each text (runs of word characters), as floats [B]."""
        word = self.is_word[ids.long()]
        return (word & ~F.pad(word, (0, 1))[:, 1:]).sum(1).float()

    def features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every trigram and word of each text as one 1-D bag: bucket ids and weights of the real features
        (padded positions, most of a [B, 2L] matrix for short texts, are dropped), and where each text starts."""
        ids = ids.long()
        if self.idf is not None:
            return self.tfidf_features(*self.selected_features(ids))
        B, L = ids.shape
        self.grow_powers(L)
        ext = F.pad(ids, (1, 1))  # padding doubles as the boundary mark before and after the text
        tri = (ext[:, :-2] * BASE + ext[:, 1:-1]) * BASE + ext[:, 2:]
        # Words: polynomial prefix hashes; a word's hash is read off at its last character.
        word = self.is_word[ids]
        tri_ok = ids > 0
        pw = self.pow[:L]
        prefix = torch.cumsum(ids * pw % MOD, 1) % MOD
        prev_word = F.pad(word, (1, 0))[:, :L]
        next_word = F.pad(word, (0, 1))[:, 1:]
        starts = word & ~prev_word
        ends = word & ~next_word
        pos = torch.arange(L, device=ids.device).expand(B, L)
        start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        before = torch.gather(F.pad(prefix, (1, 0)), 1, start_pos)  # prefix sum before the word starts
        wh = (prefix - before) % MOD * self.inv_pow[start_pos] % MOD + 7919  # salt keeps words off trigrams
        feats, oks = [tri % MOD, wh], [tri_ok, ends]
        if self.word_bigrams:  # the previous word's hash, read at the end of the previous word
            last_end = torch.where(ends, pos, torch.full_like(pos, -1)).cummax(1).values
            prev_end = torch.gather(F.pad(last_end, (1, 0), value=-1), 1, start_pos)  # last end before my start
            prev_wh = torch.gather(wh, 1, prev_end.clamp(min=0))
            feats.append((prev_wh * 1000033 + wh) % MOD + 104729)
            oks.append(ends & (prev_end >= 0))
        ok = torch.cat(oks, 1)
        counts = ok.sum(1)
        hashes = torch.cat(feats, 1)[ok] * MIX % (1 << 32) % self.buckets
        weights = (ok / counts.unsqueeze(1).clamp(min=1).sqrt())[ok]  # 1/sqrt(features of the text)
        return hashes, weights, F.pad(counts.cumsum(0)[:-1], (1, 0))

    def selected_features(self, ids: torch.Tensor):
        """The n-grams of an idf model, computed at the positions that have one only (the same values as
        ``features`` of older models, which computes every position of a [B, 2L] matrix, then selects): trigrams
        centred on a word character (within a word and its boundaries, as scikit-learn's char_wb: spans across words
        measured as noise), words, and with ``word_bigrams`` pairs of consecutive words. Returns the raw values,
        their kind (0, 1, 2) and their text, and the batch size."""
        B, L = ids.shape
        self.grow_powers(L)
        word = self.is_word[ids]
        ext = F.pad(ids, (1, 1))  # padding doubles as the boundary mark before and after the text
        tr, tc = word.nonzero(as_tuple=True)
        tri = ((ext[tr, tc] * BASE + ext[tr, tc + 1]) * BASE + ext[tr, tc + 2]) % MOD
        # words: polynomial prefix hashes, read off at a word's last character. Without the modulus inside the
        # sum, ids x powers < 2**42 and a row's sum < 2**52: exact, and one modulus per word instead of per position
        prefix = torch.cumsum(ids * self.pow[:L], 1)
        starts = word & ~F.pad(word, (1, 0))[:, :L]
        ends = word & ~F.pad(word, (0, 1))[:, 1:]
        pos = torch.arange(L, device=ids.device).expand(B, L)
        start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        er, ec = ends.nonzero(as_tuple=True)
        sp = start_pos[er, ec]
        before = torch.where(sp > 0, prefix[er, (sp - 1).clamp(min=0)], torch.zeros_like(sp))
        wh = (prefix[er, ec] - before) % MOD * self.inv_pow[sp] % MOD + 7919
        raws, kinds, texts = [tri, wh], [torch.zeros_like(tr), torch.ones_like(er)], [tr, er]
        if self.word_bigrams:  # a word and the one before it in the same text (ends are listed in text order)
            same = F.pad(er[1:] == er[:-1], (1, 0))
            raws.append(((F.pad(wh, (1, 0))[:-1] * 1000033 + wh) % MOD + 104729)[same])
            kinds.append(torch.full_like(er[same], 2))
            texts.append(er[same])
        return torch.cat(raws), torch.cat(kinds), torch.cat(texts), B

    def bucket(self, raw: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        # a multiplication modulo the prime 2**31 - 1 spreads every bit of the value over the low bits that pick the
        # bucket (the older x * MIX % 2**32 % buckets kept x % buckets for power-of-two buckets: no mixing at all)
        return (raw + kind * 0x3C6EF372) * 0x5BD1E995 % MOD % self.buckets

    def tfidf_features(self, raw: torch.Tensor, kind: torch.Tensor, text: torch.Tensor, B: int):
        """The bag of an idf model: each distinct feature of a text once, weighted by (1 + ln tf) x idf^power; the
        trigrams and the words of a text are each scaled to unit length, then weighted so that words carry
        ``word_share`` of the squared norm (words are what BM25 matches; trigrams catch spelling and morphology).
        Buckets come from a mix that separates the kinds of feature (the older hash did not)."""
        buckets = self.bucket(raw, kind)
        group = text * 3 + kind
        key, tf = torch.unique(group * self.buckets + buckets, return_counts=True)  # sorted: grouped by text
        group, buckets = key // self.buckets, key % self.buckets
        idf = self.idf[buckets]
        w = (1.0 + torch.log(tf.float())) * (idf if self.idf_power == 1.0 else idf.pow(self.idf_power))
        norm = torch.zeros(B * 3, dtype=w.dtype, device=w.device).index_add_(0, group, w * w).sqrt()
        share = torch.tensor([1.0 - self.word_share, self.word_share, 0.0], device=w.device)
        if self.word_bigrams:
            share = torch.tensor([1.0 - self.word_share, self.word_share / 2, self.word_share / 2], device=w.device)
        w = w / norm[group].clamp(min=1e-6) * share.sqrt()[group % 3]
        counts = torch.bincount(group // 3, minlength=B)  # (the unique keys above are sorted: grouped by text)
        return buckets, w, F.pad(counts.cumsum(0)[:-1], (1, 0))

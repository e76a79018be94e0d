"""The two towers. Each maps a [batch, length] tensor of character ids (0 = padding) to an L2-normalised embedding.

Encoders:
- mean:  mean of character embeddings, Linear-ReLU-Linear (the original exercise's model).
- cnn:   character embeddings, 1-D convolutions of a few widths, max-pool over valid positions, projection.
- ngram: DSSM-style hashed character trigrams (padding marks the word/text boundary) plus hashed whole words,
         computed from the ids on the fly (no tokeniser state), summed in one EmbeddingBag with sparse gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from twotower_cli.model.config import BASE, MIX, MOD, ModelConfig, hash_powers  # noqa: F401  (re-exported)
from twotower_cli.model.ngrams import NgramFeatures, powers  # noqa: F401  (re-exported)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class MeanEncoder(nn.Module):
    table = "emb"  # the embedding table a TwoTower may share between its towers

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.ReLU(),
                                 nn.Linear(cfg.hidden_dim, cfg.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(self.emb(ids), ids > 0))


class CNNEncoder(nn.Module):
    table = "emb"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.hidden_dim, cfg.hidden_dim, w, padding=w // 2)
                                   for w in cfg.cnn_widths)
        self.proj = nn.Linear(cfg.hidden_dim * len(cfg.cnn_widths), cfg.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(1)  # [B, 1, L]
        x = self.emb(ids).transpose(1, 2)  # [B, H, L]
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x))[..., : ids.shape[1]]
            pooled.append(h.masked_fill(~mask, float("-inf")).amax(-1).clamp(min=0.0))
        return self.proj(torch.cat(pooled, -1))


class NgramEncoder(NgramFeatures):
    """The n-gram features summed over a table of learned vectors (sparse gradients), a norm and a projection."""
    table = "bag"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bag = nn.EmbeddingBag(cfg.ngram_buckets, cfg.hidden_dim, mode="sum", sparse=True)
        nn.init.normal_(self.bag.weight, std=0.1)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(*pooled_lookup(self.bag.weight, [self.features(ids)]))

    def head(self, bag: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(bag))


def lexical(features: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, dim: int) -> torch.Tensor:
    """The texts' weighted n-gram vectors hashed into ``dim`` dimensions with random signs (the hashing trick):
    the inner product of two such vectors is their TF-IDF inner product plus collision noise of order
    1/sqrt(dim). Deterministic, no parameters. Returns [n, dim], unit rows."""
    hashes, weights, offsets = features
    counts = torch.diff(offsets, append=torch.tensor([hashes.numel()], device=offsets.device))
    text = torch.repeat_interleave(torch.arange(n, device=hashes.device), counts)
    mixed = (hashes * 40503 + 12345) % MOD  # another hash of the bucket: its column and its sign
    col, sign = mixed % dim, 1.0 - 2.0 * ((mixed // dim) % 2).to(weights.dtype)
    out = torch.zeros(n * dim, dtype=torch.float32, device=hashes.device)
    out.index_add_(0, text * dim + col, (weights * sign).float())
    return F.normalize(out.view(n, dim), dim=-1)


def pooled_lookup(table: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list:
    """Weighted sums of ``table`` rows for each 1-D bag (hashes, weights, offsets) of ``features``.

    Each distinct bucket is looked up once, so the sparse gradient has one row per distinct n-gram in the batch,
    not one per occurrence (10-50x fewer rows for SparseAdam), and the two towers of a shared table yield one
    gradient with no duplicate rows."""
    uniq, inverse = torch.unique(torch.cat([h for h, _, _ in parts]), return_inverse=True)
    rows = F.embedding(uniq, table, sparse=True)
    out, start = [], 0
    for h, w, offsets in parts:
        inv = inverse[start:start + h.numel()]
        out.append(F.embedding_bag(inv, rows, offsets, mode="sum", per_sample_weights=w.to(rows.dtype)))
        start += h.numel()
    return out


ENCODERS = {"mean": MeanEncoder, "cnn": CNNEncoder, "ngram": NgramEncoder}


class TwoTower(nn.Module):
    """A query tower and a document tower, both ending in L2-normalised embeddings.

    With ``shared_embeddings`` the towers look n-grams (or characters) up in one table and differ in their norm
    and projection: a query word seen in training only inside documents still has a trained embedding on the
    query side. A transformer model (`model.transformer`) is both towers' learned half.
    """

    def __init__(self, cfg: ModelConfig, transformer: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.transformer = transformer
        if cfg.encoder == "transformer":  # its learned half is `transformer`; both towers read the same features
            if transformer is None:
                raise ValueError("a transformer model is built with its encoder (model.transformer)")
            self.query_tower = self.document_tower = NgramFeatures(cfg)
            return
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {cfg.encoder!r}")
        self.query_tower = ENCODERS[cfg.encoder](cfg)
        self.document_tower = ENCODERS[cfg.encoder](cfg)
        # same initial weights, separate thereafter: at step 0 a text and its copy embed identically, so the
        # model starts as a (random-projection) lexical matcher instead of from nothing
        self.document_tower.load_state_dict(self.query_tower.state_dict())
        if cfg.shared_embeddings:
            table = self.query_tower.table
            setattr(self.document_tower, table, getattr(self.query_tower, table))
        if getattr(self.query_tower, "idf", None) is not None:  # one idf vector for both towers
            self.document_tower.idf = self.query_tower.idf
            self.document_tower.mean_words = self.query_tower.mean_words

    def aliases(self) -> dict[str, str]:
        """State-dict keys that name the same tensor as another key: {alias: source}. Files store the source."""
        out = {}
        if self.cfg.shared_embeddings and hasattr(self.query_tower, "table"):
            t = self.query_tower.table
            out[f"document_tower.{t}.weight"] = f"query_tower.{t}.weight"
        if getattr(self.query_tower, "idf", None) is not None:
            out["document_tower.idf"] = "query_tower.idf"
            out["document_tower.mean_words"] = "query_tower.mean_words"
        return out

    @torch.no_grad()
    def set_idf(self, d_tokens, rows: torch.Tensor, batch_size: int = 4096, share=None) -> None:
        """Inverse document frequencies of the n-gram buckets over the documents ``d_tokens[rows]``:
        ln((1 + N) / (1 + df)) + 1, the smoothed idf of scikit-learn. Both towers share it. ``share``: (rank,
        world, sum) under torchrun: each process counts every world-th document, and ``sum`` adds the counts of
        all processes in place (integers in float64: the same idf as one process counting them all)."""
        enc = self.document_tower
        n_docs = int(rows.numel())
        mine = rows[share[0]::share[1]] if share else rows
        # [document frequency of each bucket..., words]
        counts = torch.zeros(enc.buckets + 1, dtype=torch.float64, device=enc.idf.device)
        for s in range(0, len(mine), batch_size):
            ids = d_tokens[mine[s:s + batch_size]].to(enc.idf.device).long()
            counts[-1] += enc.word_counts(ids).clamp(min=1.0).sum().double()
            raw, kind, text, _ = enc.selected_features(ids)  # the buckets only: weights are what idf sets
            uniq = torch.unique(text * enc.buckets + enc.bucket(raw, kind))  # each (text, bucket) once
            counts[:-1] += torch.bincount(uniq % enc.buckets, minlength=enc.buckets).double()
        if share:
            share[2](counts)
        enc.idf.copy_((torch.log((1.0 + n_docs) / (1.0 + counts[:-1])) + 1.0).float())
        enc.mean_words.fill_(float(counts[-1]) / max(n_docs, 1))

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict without aliases: what a safetensors file holds (it refuses shared tensors)."""
        drop = self.aliases()
        return {k: v for k, v in self.state_dict().items() if k not in drop}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.transformer is not None:
            self.transformer.forget()
        full = dict(tensors)
        for alias, source in self.aliases().items():
            full[alias] = full[source]
        self.load_state_dict(full)

    def forward(self, query_ids: torch.Tensor, document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers in one call: what DistributedDataParallel wraps. A shared n-gram table is looked up once
        for the two (one sparse gradient with unique rows, as with separate tables)."""
        if isinstance(self.query_tower, NgramEncoder):
            qt, dt = self.query_tower, self.document_tower
            fq, fd = qt.features(query_ids), dt.features(document_ids)
            if self.cfg.shared_embeddings:
                q, d = pooled_lookup(qt.bag.weight, [fq, fd])
            else:
                q, d = pooled_lookup(qt.bag.weight, [fq])[0], pooled_lookup(dt.bag.weight, [fd])[0]
            return self.finish(qt.head(q), fq, query_ids), self.finish(dt.head(d), fd, document_ids, dt)
        return self.encode_queries(query_ids), self.encode_documents(document_ids)

    def finish(self, learned: torch.Tensor, features, ids: torch.Tensor, document_tower=None) -> torch.Tensor:
        """The embedding: the learned vector, unit length, after the lexical half when the model has one (for a
        document, scaled by its length relative to the mean when ``length_power`` is set)."""
        learned = F.normalize(learned.float(), dim=-1)
        cfg = self.cfg
        if not cfg.lexical_dim:
            return learned
        lex = lexical(features, ids.shape[0], cfg.lexical_dim)
        if document_tower is not None and cfg.length_power:
            words = document_tower.word_counts(ids).clamp(min=1.0)
            lex = lex * (words / document_tower.mean_words).pow(cfg.length_power).unsqueeze(1)
        w = cfg.lexical_weight
        return torch.cat([math.sqrt(w) * lex, math.sqrt(1.0 - w) * learned], -1)

    def encode(self, tower, ids: torch.Tensor, side: str | None = None) -> torch.Tensor:
        side = side or ("query" if tower is self.query_tower else "document")
        if self.transformer is not None:
            features = tower.features(ids) if self.cfg.lexical_dim else None
            return self.finish(self.transformer(ids, side), features, ids, tower if side == "document" else None)
        if isinstance(tower, NgramEncoder):
            feats = tower.features(ids)
            learned = tower.head(*pooled_lookup(tower.bag.weight, [feats]))
            return self.finish(learned, feats, ids, tower if tower is self.document_tower else None)
        return F.normalize(tower(ids).float(), dim=-1)

    def encode_queries(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(self.query_tower, ids, "query")

    def encode_documents(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(self.document_tower, ids, "document")

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [m.weight for m in self.modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding)) and m.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


"""Turning token rows into embeddings, batch by batch: what validation, indexing, search and mining share."""

from __future__ import annotations

import torch


@torch.no_grad()
def embed_tokens(encode, tokens: torch.Tensor, device, batch_size: int = 2048, progress=None) -> torch.Tensor:
    """Embed a token matrix batch by batch; the result stays on ``device``."""
    parts = []
    for s in range(0, tokens.shape[0], batch_size):
        parts.append(encode(tokens[s:s + batch_size].to(device, non_blocking=True)).float())
        if progress:
            progress(min(s + batch_size, tokens.shape[0]))
    return torch.cat(parts) if parts else torch.zeros(0, 1, device=device)


@torch.no_grad()
def lexical_rows(model, tokens, side: str, device, batch_size: int = 2048):
    """The exact lexical half of token rows (a `SparseRows`, weighted as in the embedding): the sparse TF-IDF
    vectors that `model.towers.lexical` sketches, for models with ``lexical_exact``. A document's row adds its
    opening's row times ``lead_weight``."""
    from twotower_cli.model.sparse_rows import SparseRows

    cfg = model.cfg
    weight = cfg.lead_weight if side == "document" and cfg.lead_characters else 0.0
    return SparseRows.concat([whole if opening is None else whole.plus(opening, weight)
                              for whole, opening in batch_rows(model, tokens, side, device, batch_size, bool(weight))])


@torch.no_grad()
def document_and_opening_rows(model, tokens, device, batch_size: int = 2048):
    """Documents' exact lexical rows without their openings, and the openings' rows (what `training.choices`
    weighs against each other), from one pass over the token rows."""
    from twotower_cli.model.sparse_rows import SparseRows

    pairs = list(batch_rows(model, tokens, "document", device, batch_size, True))
    return SparseRows.concat([w for w, _ in pairs]), SparseRows.concat([o for _, o in pairs])


def batch_rows(model, tokens, side: str, device, batch_size: int, opening: bool):
    """(rows, the openings' rows or None) a batch of token rows at a time: an opening is a document's first
    ``lead_characters`` (`numpy_encoder.lead_tokens`), a unit row without the length scaling."""
    import math

    from twotower_cli.model.numpy_encoder import lead_tokens
    from twotower_cli.model.sparse_rows import SparseRows

    tower = model.query_tower if side == "query" else model.document_tower
    cfg = model.cfg

    def rows(ids, scale):
        hashes, weights, offsets = tower.features(ids)
        counts = torch.diff(offsets, append=torch.tensor([hashes.numel()], device=offsets.device))
        text = torch.repeat_interleave(torch.arange(ids.shape[0], device=ids.device), counts)
        return SparseRows.from_features(hashes.cpu().numpy(), weights.float().cpu().numpy(), text.cpu().numpy(),
                                        ids.shape[0], scale, math.sqrt(cfg.lexical_weight))

    is_word = tower.is_word.cpu().numpy() if opening else None
    for s in range(0, tokens.shape[0], batch_size):
        ids = tokens[s:s + batch_size].to(device)
        scale = None
        if side == "document" and cfg.length_power:
            scale = (tower.word_counts(ids).clamp(min=1.0) / tower.mean_words).pow(cfg.length_power).cpu().numpy()
        first = None
        if opening:
            first = rows(torch.from_numpy(lead_tokens(ids.cpu().numpy(), cfg.lead_characters, is_word)).to(device),
                         None)
        yield rows(ids, scale), first


def document_tokens(vocab, texts, length: int) -> torch.Tensor:
    """Token rows of documents (a Polars Series or a list) cut at ``length`` characters, only as wide as the
    longest needs: lowercasing lengthens a text at most twice ('İ' becomes two characters), so a width of twice
    the longest text cuts none sooner than ``length`` would, and the rest would be padding (memory and time grew
    with ``length`` instead of the texts)."""
    if isinstance(texts, list):
        longest = max((len(t or "") for t in texts), default=0)
        return torch.from_numpy(vocab.encode_list(texts, max(1, min(length, 2 * longest))))
    longest = int(texts.str.len_chars().max() or 0) if len(texts) else 0
    return torch.from_numpy(vocab.encode(texts, max(1, min(length, 2 * longest))))


class LexicalTable:
    """Texts (a Polars Series, a `TextStore`) as token rows of the exact lexical half's length, tokenised a batch
    at a time when `lexical_rows` asks for a slice: memory holds a batch's rows, not every text's."""

    def __init__(self, texts, vocab, length: int, device="cpu"):
        self.texts, self.vocab, self.length, self.device = texts, vocab, length, device

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.texts), self.length)

    def __getitem__(self, idx: slice) -> torch.Tensor:
        from twotower_cli.data.tokens import text_list

        return document_tokens(self.vocab, text_list(self.texts, idx), self.length).to(self.device)


def lexical_tokens(model, table):
    """The token rows that documents' exact lexical rows read: ``table``'s own (a `data.tokens.TokenTable`) when
    it reads as many characters, else the same texts tokenised to ``cfg.lexical_length`` a batch at a time."""
    length = model.cfg.lexical_length
    return table if table.max_len == length else LexicalTable(table.texts, table.vocab, length, table.device)

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

"""The two losses, a few lines of math each. Both take L2-normalised embeddings.

Documents are identified by integer ids so that a copy of a query's own positive elsewhere in the batch is
masked rather than counted as a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(q, d, d_ids, q_ids, neg=None, neg_ids=None, temperature: float = 0.05):
    """Softmax over the batch's documents (positives of other pairs and extra negatives). Returns (loss, stats)."""
    docs = d if neg is None or neg.shape[0] == 0 else torch.cat([d, neg])
    ids = d_ids if neg is None or neg.shape[0] == 0 else torch.cat([d_ids, neg_ids])
    sims = q @ docs.T  # [B, B + M] cosine similarities
    b = q.shape[0]
    eye = torch.zeros_like(sims, dtype=torch.bool)
    eye[:, :b] = torch.eye(b, dtype=torch.bool, device=q.device)
    same_doc = ids.unsqueeze(0) == d_ids.unsqueeze(1)  # another copy of my positive
    same_query = torch.zeros_like(eye)
    same_query[:, :b] = q_ids.unsqueeze(0) == q_ids.unsqueeze(1)  # another positive of my query
    masked = (same_doc | same_query) & ~eye
    logits = (sims / temperature).masked_fill(masked, float("-inf"))
    loss = F.cross_entropy(logits, torch.arange(b, device=q.device))
    return loss, similarity_stats(sims, eye, masked)


def triplet(q, d_pos, d_neg, margin: float = 0.2):
    """The seed's cosine margin loss over one sampled negative per positive."""
    pos = (q * d_pos).sum(-1)
    neg = (q * d_neg).sum(-1)
    loss = F.relu(margin - pos + neg).mean()
    return loss, {"pos_sim": pos.mean().detach(), "neg_sim": neg.mean().detach()}


def similarity_stats(sims, eye, masked):
    sims = sims.detach()
    pos = sims[eye].mean()
    others = ~eye & ~masked
    neg = sims[others].mean() if others.any() else torch.zeros((), device=sims.device)
    return {"pos_sim": pos, "neg_sim": neg}

"""The two losses, a few lines of math each. Both take L2-normalised embeddings.

Documents are identified by integer ids so that a copy of a query's own positive elsewhere in the batch is
masked rather than counted as a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(q, d, d_ids, q_ids, neg=None, neg_ids=None, temperature: float = 0.05, offset: int = 0,
            known=None):
    """Softmax over the batch's documents: the positives of all pairs, then the extra negatives.

    ``q`` holds this process's queries; row j's positive is column ``offset + j`` of ``d`` (offset > 0 when ``d``
    was gathered from several processes). ``d_ids``/``q_ids`` name each positive column's document and query, so
    another copy of a row's positive, or another positive of the same query, is masked, not counted as a negative;
    ``known(query ids [b], document ids [n]) -> bool [b, n]`` masks every pair the file says is relevant too.
    Similarities and logits are float32 even under bf16 autocast (1/temperature magnifies rounding).
    Returns (loss, stats)."""
    docs = d if neg is None or neg.shape[0] == 0 else torch.cat([d, neg])
    ids = d_ids if neg is None or neg.shape[0] == 0 else torch.cat([d_ids, neg_ids])
    with torch.autocast(q.device.type, enabled=False):
        sims = q.float() @ docs.float().T  # [b, B + M] cosine similarities
    b, n_pos = q.shape[0], d.shape[0]
    cols = torch.arange(b, device=q.device) + offset
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[torch.arange(b, device=q.device), cols] = True
    same_doc = ids.unsqueeze(0) == d_ids[cols].unsqueeze(1)  # another copy of my positive
    same_query = torch.zeros_like(own)
    same_query[:, :n_pos] = q_ids.unsqueeze(0) == q_ids[cols].unsqueeze(1)  # another positive of my query
    masked = same_doc | same_query
    if known is not None:
        masked = masked | known(q_ids[cols], ids)
    masked = masked & ~own
    logits = (sims / temperature).masked_fill(masked, float("-inf"))  # float32
    loss = F.cross_entropy(logits, cols)
    return loss, similarity_stats(sims, own, masked)


def triplet(q, d_pos, d_neg, margin: float = 0.2):
    """The cosine margin loss (the original exercise's) over one sampled negative per positive."""
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

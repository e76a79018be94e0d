"""Hard negatives: for each training query, documents ranked high by BM25 or by the model itself, minus the known
positives and their near-duplicates (which would be false negatives).

`bm25` mines once, before training; `model` mines at the start of every epoch after the first with the model as
it stands (a first pass, then the model's own mistakes). Mined lists are saved in the run folder so a resumed run
uses exactly the same negatives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from twotower_cli.model.encode import embed_tokens
from twotower_cli.retrieval.topk import exact_topk
from twotower_cli.runs import atomic_write_bytes

PER_QUERY = 3  # negatives kept per query
DEPTH = 20  # ranks searched
NEAR_DUPLICATE = 0.95  # cosine to the positive above which a document counts as a copy of it


def known_positives(train_set) -> dict[int, set[int]]:
    pos: dict[int, set[int]] = {}
    for q, d in zip(train_set.pos_q.tolist(), train_set.pos_d.tolist()):
        pos.setdefault(q, set()).add(d)
    return pos


def select(queries: np.ndarray, ranked: np.ndarray, positives: dict[int, set[int]], duplicate) -> tuple:
    """Keep the first PER_QUERY ranked documents that are neither positives nor near-duplicates of one."""
    out_q, out_d = [], []
    for q, row in zip(queries.tolist(), ranked.tolist()):
        kept = 0
        for d in row:
            if d < 0 or d in positives[q] or duplicate(q, d):
                continue
            out_q.append(q)
            out_d.append(d)
            kept += 1
            if kept == PER_QUERY:
                break
    return np.asarray(out_q, dtype=np.int64), np.asarray(out_d, dtype=np.int64)


@torch.no_grad()
def mine_with_model(model, train_set, device, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    was = model.training
    model.eval()
    queries = torch.unique(train_set.pos_q.cpu())
    de = embed_tokens(model.encode_documents, train_set.d_tokens, device)
    qe = embed_tokens(model.encode_queries, train_set.q_tokens.subset(queries), device)
    _, ranked = exact_topk(qe, de, DEPTH)
    model.train(was)
    positives = known_positives(train_set)
    q_np, r_np = queries.numpy(), ranked.cpu().numpy()
    # near-duplicates: the highest cosine of a candidate to any positive of its query (unit vectors: document
    # embeddings with a length-scaled lexical half are not)
    dn = torch.nn.functional.normalize(de.float(), dim=-1)
    most = max(len(p) for p in positives.values())
    pos = torch.full((len(q_np), most), -1, dtype=torch.long)
    for i, q in enumerate(q_np.tolist()):
        ps = sorted(positives[q])
        pos[i, :len(ps)] = torch.tensor(ps)
    sims = np.zeros(r_np.shape, dtype=np.float32)
    for s in range(0, len(q_np), chunk):
        p, c = pos[s:s + chunk].to(dn.device), ranked[s:s + chunk].to(dn.device)
        cos = torch.einsum("qpd,qkd->qpk", dn[p.clamp(min=0)], dn[c]).masked_fill((p < 0).unsqueeze(2), -2.0)
        sims[s:s + chunk] = cos.amax(1).cpu().numpy()
    row_of = {q: i for i, q in enumerate(q_np.tolist())}
    col = {(i, d): j for i, row in enumerate(r_np.tolist()) for j, d in enumerate(row)}
    return select(q_np, r_np, positives, lambda q, d: sims[row_of[q], col[(row_of[q], d)]] >= NEAR_DUPLICATE)


def mine_with_bm25(train_set) -> tuple[np.ndarray, np.ndarray]:
    """BM25's top documents for each training query; a candidate that equals a positive once case and spacing are
    ignored counts as that positive (the documents are distinct as strings, not as texts)."""
    from twotower_cli.retrieval.bm25 import BM25

    bm = BM25.build(train_set.documents)
    queries = np.unique(train_set.pos_q.cpu().numpy())
    _, ranked = bm.search([train_set.queries[int(q)] for q in queries], DEPTH)
    positives = known_positives(train_set)
    docs = train_set.documents

    def key(d: int) -> str:
        return " ".join(docs[int(d)].lower().split())

    pos_keys = {q: {key(d) for d in p} for q, p in positives.items()}
    return select(queries, ranked, positives, lambda q, d: key(d) in pos_keys[q])


def cached(run_dir: Path, epoch: int, mine) -> tuple[np.ndarray, np.ndarray]:
    """The negatives mined for ``epoch``, from the run folder if an earlier (interrupted) process mined them."""
    path = Path(run_dir) / f"hard_negatives_epoch{epoch}.safetensors"
    if path.exists():
        t = load_file(path)
        return t["query"].numpy(), t["document"].numpy()
    q, d = mine()
    atomic_write_bytes(path, save({"query": torch.from_numpy(q), "document": torch.from_numpy(d)}))
    return q, d

"""What a person wants to see of a trained run: retrieval examples and similarity distributions (JSON)."""

from __future__ import annotations

from pathlib import Path

import torch

from twotower_cli.model.encode import embed_tokens
from twotower_cli.retrieval.topk import exact_topk
from twotower_cli.runs import atomic_write_json


@torch.no_grad()
def retrieval_examples(run_dir: Path, model, ts, device, doc_embeddings: torch.Tensor | None = None,
                       n_queries: int = 20, k: int = 5) -> None:
    """``doc_embeddings``: the documents' embeddings if already computed (the default index), else embedded here."""
    if len(ts.val_q) == 0:
        atomic_write_json(run_dir / "retrieval_examples.json", [])
        atomic_write_json(run_dir / "similarities.json", {"positive": [], "negative": []})
        return
    # the default index's rows stay where they are (a mapped file, maybe larger than memory): exact_topk reads
    # them in chunks, and only the rows compared below are copied
    de = embed_tokens(model.encode_documents, ts.d_tokens, device) if doc_embeddings is None else doc_embeddings
    allq = ts.val_q[:2000]
    all_qe = embed_tokens(model.encode_queries, ts.q_tokens[allq.to(ts.q_tokens.device)], device)
    qsel, qe = allq[:n_queries], all_qe[:n_queries]
    scores, idx = exact_topk(qe, de, k)
    rows = []
    for r, q in enumerate(qsel.tolist()):
        rel = ts.val_qrels[r]
        rows.append({"query": ts.queries[q],
                     "found": any(int(d) in rel for d in idx[r].tolist()),
                     "relevant": [ts.documents[d][:300] for d in rel][:1],
                     "results": [{"rank": j + 1, "score": round(float(s), 4), "document": ts.documents[int(d)][:300],
                                  "relevant": int(d) in rel} for j, (s, d) in enumerate(zip(scores[r], idx[r]))]})
    atomic_write_json(run_dir / "retrieval_examples.json", rows)
    # cosine of each validation query to its relevant document and to a random document
    pos_docs = torch.tensor([next(iter(rel)) for rel in ts.val_qrels[:2000]], device=de.device)
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, de.shape[0], (len(allq),), generator=g).to(de.device)
    pos = (all_qe * de[pos_docs].to(all_qe.device).float()).sum(-1).cpu().tolist()
    neg = (all_qe * de[rnd].to(all_qe.device).float()).sum(-1).cpu().tolist()
    atomic_write_json(run_dir / "similarities.json", {"positive": [round(x, 4) for x in pos],
                                                      "negative": [round(x, 4) for x in neg]})

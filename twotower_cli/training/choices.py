"""What training decides on its validation queries once the best epoch is known: the weight of the embedding's
lexical half, then the default search (the model alone, BM25, or their fusion at a weight), chosen by running the
run's own search (`retrieval.search`) on the index it ships. Both are stored in the run, so `search`, `evaluate`
and the Python API use them without being told. The run's figures come from the test queries, which no choice saw.
"""

from __future__ import annotations

import math

import torch

from twotower_cli.evaluation.metrics import retrieval_metrics
from twotower_cli.model.encode import embed_tokens, lexical_tokens
from twotower_cli.retrieval.fusion import WEIGHTS, fused
from twotower_cli.retrieval.search import Search, SearchPlan
from twotower_cli.retrieval.topk import exact_topk


# weights of the lexical half tried on validation: not 1.0 (see `exact_halves`); 0.95 because on manuals, where
# the learned half is weak, validation still rose from 0.8 to 0.9
LEXICAL_WEIGHTS = [w for w in WEIGHTS if w < 1] + [0.95]
# weights of a document's opening in its exact lexical row (``lead_characters``): on the development splits the
# best was 0.1-0.5 where openings are titles or summaries (manuals, docstrings, package descriptions) and 0 on
# the dictionaries
LEAD_WEIGHTS = [0.0, 0.1, 0.2, 0.35, 0.5]
TIE = 0.005  # MRR@10 differences smaller than this count as ties


def pick(scores: dict[float, float]) -> float:
    top = max(scores.values())
    return min((w for w, v in scores.items() if v >= top - TIE), key=lambda w: (abs(w - 0.5), -scores[w]))


def pick_lead(by_lead: dict[float, float]) -> float:
    """The weight of documents' openings, from the best MRR@10 at each: above 0 only when it beats 0 by more than
    ``TIE`` (100 to 1,000 validation queries are a noisy estimate, and 0 is the model as trained); of those the
    best, the smaller on a tie."""
    return max((b for b in by_lead if b == 0 or by_lead[b] > by_lead[0.0] + TIE), key=lambda b: (by_lead[b], -b))


@torch.no_grad()
def choose_lexical_weight(model, train_set, device, val_docs, val_qrels, chunk: int = 256) -> dict:
    """The weight of the lexical half with the best MRR@10 on the validation queries (the learned half was trained
    beside it at the configured weight), and the weight of a document's opening in that half: one above 0 only
    when it gains more than ``TIE`` (an opening is not special in every corpus). Each half's scores are computed
    once; the grid only re-mixes them."""

    n_lex, trained_weight = model.cfg.lexical_dim, model.cfg.lexical_weight
    corpus = train_set.d_tokens if val_docs is None else train_set.d_tokens.subset(val_docs)
    qrels = train_set.val_qrels if val_docs is None else val_qrels
    de = embed_tokens(model.encode_documents, corpus, device)
    qe = embed_tokens(model.encode_queries, train_set.q_tokens[train_set.val_q], device)
    if model.cfg.lexical_exact:  # the lexical half as search scores it: exact, on the sketch's best rows
        ranked = exact_halves(model, qe, de, train_set.q_tokens[train_set.val_q], corpus, device, chunk)
    else:
        halves = [(qe[:, :n_lex] / math.sqrt(trained_weight), de[:, :n_lex] / math.sqrt(trained_weight)),
                  (qe[:, n_lex:] / math.sqrt(1 - trained_weight), de[:, n_lex:] / math.sqrt(1 - trained_weight))]
        ranked = {(0.0, w): [] for w in sorted({*LEXICAL_WEIGHTS, *WEIGHTS})}  # 1.0: no exact re-scoring here
        for s in range(0, qe.shape[0], chunk):
            lex, learned = ((q[s:s + chunk] @ d.T) for q, d in halves)
            for _, w in ranked:
                score = w * lex + (1 - w) * learned
                ranked[0.0, w].append(torch.topk(score, min(10, de.shape[0]), dim=1).indices.cpu())
    scores = {k: retrieval_metrics(torch.cat(r).numpy(), qrels, ("mrr@10",))["mrr@10"] for k, r in ranked.items()}
    by_lead = {b: max(v for (bb, _), v in scores.items() if bb == b) for b in sorted({b for b, _ in scores})}
    lead = pick_lead(by_lead)
    mine = {w: v for (b, w), v in scores.items() if b == lead}
    best = max(mine, key=lambda w: (round(mine[w], 4), -abs(w - trained_weight)))
    out = {"weight": best, "val_mrr@10": {str(w): v for w, v in mine.items()}}
    if model.cfg.lead_characters and model.cfg.lexical_exact:
        out.update({"lead_weight": lead, "lead_val_mrr@10": {str(b): v for b, v in by_lead.items()}})
    return out


def exact_halves(model, qe, de, q_tokens, d_tokens, device, chunk: int) -> dict[tuple, list[torch.Tensor]]:
    """Top 10 rows per query at every (opening weight, lexical weight) of the grids, the lexical half exact
    (`retrieval.lexical`), among the ``RERANK`` best rows of the embeddings as trained."""
    import numpy as np

    from twotower_cli.model.encode import document_and_opening_rows, lexical_rows
    from twotower_cli.retrieval.lexical import RERANK, candidate_rows, first_pass

    n_lex, trained_weight = model.cfg.lexical_dim, model.cfg.lexical_weight
    # the first pass as search ranks it
    first = torch.from_numpy(first_pass(qe.float().cpu().numpy(), n_lex, trained_weight)).to(qe.device)
    found = torch.cat([exact_topk(first[s:s + chunk], de, min(RERANK, de.shape[0]))[1].cpu()
                       for s in range(0, first.shape[0], chunk)]).numpy()
    n = qe.shape[0]
    cand = candidate_rows(found[:n], found[n:] if found.shape[0] > n else None)
    cand = np.sort(cand, 1)
    repeat = torch.from_numpy(np.pad(cand[:, 1:] == cand[:, :-1], ((0, 0), (1, 0))))  # a row twice: counted once
    tokens = lexical_tokens(model, d_tokens)
    if model.cfg.lead_characters:  # the rows without the opening, and the opening's, to weigh on the grid
        d_rows, lead_rows = document_and_opening_rows(model, tokens, device)
    else:
        d_rows, lead_rows = lexical_rows(model, tokens, "document", device), None
    q_rows = lexical_rows(model, q_tokens, "query", device)
    learned_d, learned_q = de[:, n_lex:].float().cpu().numpy(), qe[:, n_lex:].float().cpu().numpy()
    table = np.zeros(model.cfg.ngram_buckets, dtype=np.float32)
    # not 1.0: the index keeps the learned half at sqrt(1 - weight), and at 0 the first pass (`lexical.first_pass`)
    # would rank by the sketch alone, whose noise loses rows of the exact top 10 on short queries
    leads = LEAD_WEIGHTS if lead_rows is not None else [0.0]
    ranked = {(b, w): [] for b in leads for w in LEXICAL_WEIGHTS}
    for s in range(0, cand.shape[0], chunk):
        c = cand[s:s + chunk]  # [q, K]: every query has K candidates
        learned = torch.from_numpy(
            np.einsum("qkd,qd->qk", learned_d[c], learned_q[s:s + chunk]) / (1 - trained_weight))
        lex = torch.from_numpy(
            np.stack([d_rows.dots(q_rows, s + j, c[j], table) for j in range(len(c))]) / trained_weight)
        opening = torch.zeros_like(lex) if lead_rows is None else torch.from_numpy(
            np.stack([lead_rows.dots(q_rows, s + j, c[j], table) for j in range(len(c))]) / trained_weight)
        for b, w in ranked:
            score = (w * (lex + b * opening) + (1 - w) * learned).masked_fill(repeat[s:s + chunk], float("-inf"))
            top = torch.topk(score, min(10, c.shape[1]), dim=1).indices
            ranked[b, w].append(torch.gather(torch.from_numpy(c), 1, top))
    return ranked


def choose_search(encoder, index, queries: list[str], qrels: list[dict[int, float]]) -> tuple[SearchPlan, dict]:
    """The default search of a run (its `RunEncoder` and default index), chosen on ``queries``:
    the fusion weight (1: the model alone, 0: BM25 alone) with the best MRR@10, or of those within ``TIE`` of it the
    one closest to an even mix (a curve flat to within 0.01 was seen on 100 queries: the estimate is noisy, and an
    even mix is the safer bet on unseen queries). Returns the plan and what each weight scored."""
    plan = SearchPlan(mode="hybrid")
    cands = Search(plan, encoder, index, encoder.device).candidates(queries)
    scores = {w: mrr_at_10(fused(cands, w, 10)[1], qrels) for w in WEIGHTS}
    w = pick(scores)
    mode = "dense" if w == 1.0 else "bm25" if w == 0.0 else "hybrid"
    best = max(scores, key=lambda x: (scores[x], -abs(x - 0.5)))
    why = (f"the best val/mrr@10 on {len(qrels)} validation queries" if w == best else
           f"within {TIE:g} of the best val/mrr@10 on {len(qrels)} validation queries ({scores[best]:.4f} at weight "
           f"{best:g}), the one closest to an even mix")
    record = {"queries": len(qrels), "reason": f"{why}: model alone {scores[1.0]:.4f}, BM25 {scores[0.0]:.4f}, "
                                                f"fused at weight {w:g} {scores[w]:.4f}",
              "val_mrr@10": {str(k): v for k, v in scores.items()}}
    return SearchPlan(mode=mode, hybrid_weight=w), record


def measure(encoder, index, plan: SearchPlan, queries: list[str], qrels: list[dict[int, float]],
            k: int = 100) -> dict:
    """The run's figures on held-out queries: the model alone, BM25 and the default search, as `search` ranks
    them (``test/mrr@10``, ``test/bm25/mrr@10``, ``test/search/mrr@10``, ...)."""
    out = {}
    for prefix, p in (("test/", plan.forced("dense")), ("test/bm25/", plan.forced("bm25")), ("test/search/", plan)):
        _, rows = Search(p, encoder, index, encoder.device).rank(queries, k)
        out.update({prefix + name: v for name, v in retrieval_metrics(padded(rows, k), qrels).items()})
    return out


def mrr_at_10(rows: list[list[int]], qrels) -> float:
    return retrieval_metrics(padded(rows, 10), qrels, ("mrr@10",))["mrr@10"]


def padded(rows: list[list[int]], k: int) -> list[list[int]]:
    return [list(r[:k]) + [-1] * (k - len(r[:k])) for r in rows]

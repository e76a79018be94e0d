"""What the report and W&B show of a finished run: what its search returns for some held-out queries, and how
similar queries are to their relevant documents against random ones (JSON files in the run folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twotower_cli.runs import atomic_write_json

SHOWN = 20  # queries whose results are shown
COMPARED = 2000  # queries whose similarities are compared


def retrieval_examples(run_dir: Path, encoder, index, plan, train_set, k: int = 5) -> None:
    """What the run's default search (``plan`` with its `RunEncoder` on its default index) returns, and the
    similarities. The queries are the test split's (else validation's): none of them was trained on."""
    from twotower_cli.retrieval.search import Search

    split, qrels = train_set.test_q, train_set.test_qrels
    if len(split) == 0:  # (no test split: the validation queries)
        split, qrels = train_set.val_q, train_set.val_qrels
    if len(split) == 0:
        atomic_write_json(run_dir / "retrieval_examples.json", [])
        atomic_write_json(run_dir / "similarities.json", {"positive": [], "negative": []})
        return
    queries = [str(q) for q in train_set.queries.gather(split[:COMPARED].cpu().numpy()).to_list()]
    shown = queries[:SHOWN]
    scores, found = Search(plan, encoder, index, encoder.device).rank(shown, k)
    rows = []
    for query, ss, rr, rel in zip(shown, scores, found, qrels):  # (the index's rows are the training documents)
        rows.append({"query": query, "found": any(r in rel for r in rr),
                     "relevant": [str(train_set.documents[d])[:300] for d in rel][:1],
                     "results": [{"rank": j + 1, "score": round(float(s), 4), "document": doc["document"][:300],
                                  "relevant": r in rel}
                                 for j, (s, r, doc) in enumerate(zip(ss, rr, index.documents(rr))) if r >= 0]})
    atomic_write_json(run_dir / "retrieval_examples.json", rows)
    # the model's score (as its search ranks) of each query with its relevant document and with a random one
    search = Search(plan, encoder, index, encoder.device)
    positives = np.array([next(iter(rel)) for rel in qrels[:COMPARED]])
    random = np.random.default_rng(0).integers(0, index.count, len(queries))
    pos, neg = search.pair_scores(queries, positives), search.pair_scores(queries, random)
    atomic_write_json(run_dir / "similarities.json", {"positive": [round(float(x), 4) for x in pos],
                                                      "negative": [round(float(x), 4) for x in neg]})

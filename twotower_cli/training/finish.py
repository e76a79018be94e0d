"""Finishing a run: the best weights back in, the choices made on validation, the default index, the examples the
report shows, then `complete` and `runs/latest`. A model that collapsed is never marked complete."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from twotower_cli.errors import TrainingError
from twotower_cli.model.artifacts import read_model_tensors, save_model
from twotower_cli.retrieval.search import RUN_FORMAT, SearchPlan, plan_digest
from twotower_cli.runs import atomic_write_json, read_json, set_latest
from twotower_cli.training.choices import choose_lexical_weight, choose_search, measure

CHUNK = 65536  # documents embedded into the default index at a time
HARMONIC_10 = sum(1.0 / r for r in range(1, 11))


def chance_mrr(n_docs: int) -> float:
    """MRR@10 of a random ranking with one relevant document among ``n_docs``."""
    return min(1.0, HARMONIC_10 / max(n_docs, 1))


def check_not_collapsed(run_dir: Path, out, doc_emb: torch.Tensor | None, n_docs: int) -> None:
    """Refuse to mark a run complete when its model maps every document to the same point, or when its best
    validation MRR@10 is at the level of a random ranking (with enough documents for that to mean something)."""
    why = None
    if n_docs < 50:  # too few documents to tell a collapse from tiny data (training already said it is tiny)
        return
    # a strided sample of at most ~65k rows: the index may be larger than memory (a mapped file)
    sample = doc_emb[:: max(1, len(doc_emb) // 65536)].float() if doc_emb is not None else None
    if sample is not None and len(sample) > 1 and float(sample.std(0).max()) < 1e-6:
        why = "every document has the same embedding"
    mrr = out.best.get("val/mrr@10")
    if why is None and mrr is not None and mrr <= 2 * chance_mrr(n_docs):
        why = f"its best val/mrr@10 {mrr:.4f} is at the level of a random ranking ({chance_mrr(n_docs):.4f})"
    if why:
        raise TrainingError(f"the model collapsed: {why}. {run_dir} is kept but not marked complete, and "
                            "runs/latest is unchanged; lower --learning-rate (for --encoder cnn try 1e-3) or check "
                            "the data with twotower validate-data")


def finish_run(run_dir: Path, runs_dir: Path, model, vocab, train_set, device, out, hooks, val_docs, val_qrels,
               cfg) -> dict:
    """Returns what run.json records of the finished run: the default search (its plan, and why) and the test
    figures."""
    from twotower_cli.model.run_encoder import RunEncoder
    from twotower_cli.retrieval.build import build_index
    from twotower_cli.retrieval.index import load_index
    from twotower_cli.training.report_samples import retrieval_examples

    last = out.history[-1]["epoch"] if out.history else out.best_epoch
    # the weights as saved (large n-gram tables in float16); a transformer's are saved as they are, and when the
    # best epoch was the last its document embeddings from that validation are remembered: not reloaded then
    if out.best_epoch != last or model.transformer is None:
        tensors, _ = read_model_tensors(run_dir, model.transformer is not None)
        model.load_weights(tensors)
    model.eval()
    if model.cfg.lexical_dim and len(train_set.val_q):
        hooks.message("choosing the weight of the lexical half of the embedding on the validation queries")
        lex = choose_lexical_weight(model, train_set, device, val_docs, val_qrels)
        model.cfg.lexical_weight = lex["weight"]
        model.cfg.lead_weight = lex.get("lead_weight", 0.0)
        save_model(run_dir, model)
        config = read_json(run_dir / "config.json")
        config["model"] = model.cfg.to_dict()
        config["lexical_choice"] = lex
        atomic_write_json(run_dir / "config.json", config)
    hooks.message("embedding the training documents into the default index")
    chunks = ((train_set.documents[a:a + CHUNK], None) for a in range(0, len(train_set.documents), CHUNK))
    folder = build_index(run_dir, model, vocab, chunks, "default", device=device, bm25=True)
    # the training documents are unique, so the index's rows are theirs: reuse them, don't embed twice (mapped
    # from the file, read-only, rather than a second copy of the index in memory)
    embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not writable: only read
        doc_emb = torch.from_numpy(embeddings) if len(embeddings) == len(train_set.documents) else None
    check_not_collapsed(run_dir, out, doc_emb, len(train_set.documents) if val_docs is None else len(val_docs))
    encoder = RunEncoder(run_dir, str(device))
    index = load_index(run_dir, "default", model=encoder.fingerprint)  # as `search` loads them
    if len(train_set.val_q):
        hooks.message("choosing the default search on the validation queries (the model, BM25 or both)")
        plan, record = choose_search(encoder, index, texts_of(train_set, train_set.val_q), train_set.val_qrels)
    else:
        plan = SearchPlan(mode="hybrid", hybrid_weight=cfg.search.hybrid_weight)
        record = {"reason": "no validation split: a fusion at the configured weight"}
    test = {}
    if len(train_set.test_q):
        test = measure(encoder, index, plan, texts_of(train_set, train_set.test_q), train_set.test_qrels)
    retrieval_examples(run_dir, encoder, index, plan, train_set)
    run_record = read_json(run_dir / "run.json")
    run_record.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), best_epoch=out.best_epoch,
                      best=out.best, search={**plan.to_dict(), **record}, search_sha256=plan_digest(plan), test=test,
                      test_queries=len(train_set.test_q), format_version=RUN_FORMAT)
    atomic_write_json(run_dir / "run.json", run_record)
    set_latest(runs_dir, run_dir)
    if not cfg.train.keep_checkpoint:  # the model is complete; the resumable state is not needed any more
        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)
    return {"search": run_record["search"], "test": test}


def texts_of(train_set, rows: torch.Tensor) -> list[str]:
    return [str(t) for t in train_set.queries.gather(rows.cpu().numpy()).to_list()]

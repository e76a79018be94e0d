"""`twotower train` from end to end: data, vocabulary, run folder, the loop, the default index, `runs/latest`.

The run folder is created only once the data has loaded, and `runs/latest` moves to it only when it is
complete, so a failed or killed run never becomes "latest".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from twotower_cli.config import Config
from twotower_cli.data.pairs import load_pairs, require_trainable
from twotower_cli.data.vocab import Vocab
from twotower_cli.errors import ArtifactError, TrainingError, UsageError
from twotower_cli.model.artifacts import (
    header_metadata,
    read_config,
    read_tensors,
    save_model,
    write_config,
)
from twotower_cli.model.towers import ModelConfig, TwoTower
from twotower_cli.runs import (
    atomic_write_json,
    new_run_id,
    read_json,
    resolve_run,
    set_latest,
)
from twotower_cli.tracking.metrics_log import MetricsLog, NullTracker, Tracker
from twotower_cli.training.batches import TrainingSet, build
from twotower_cli.training.choices import choose_lexical_weight, choose_search
from twotower_cli.training.loop import Hooks, Validation, fit, resolve_device

LOSSES, ENCODERS, PRECISIONS = ("infonce", "triplet"), ("ngram", "cnn", "mean"), ("fp32", "bf16")


@dataclass
class TrainSummary:
    run_dir: Path
    interrupted: bool
    best_epoch: int
    best: dict
    history: list
    written: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)


def check_settings(cfg: Config) -> None:
    t, m, d = cfg.train, cfg.model, cfg.data
    for name, value in (("--epochs", t.epochs), ("--batch-size", t.batch_size), ("--embedding-dim", m.embedding_dim),
                        ("--hidden-dim", m.hidden_dim), ("--max-query-length", d.max_query_length),
                        ("--max-document-length", d.max_document_length)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if not t.learning_rate > 0:
        raise UsageError(f"--learning-rate must be positive, got {t.learning_rate}")
    if not 0 <= t.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {t.val_fraction}")
    if t.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {t.temperature}")
    for name, value, allowed in (("--loss", t.loss, LOSSES), ("--encoder", m.encoder, ENCODERS),
                                 ("--hard-negatives", t.hard_negatives, ("none", "bm25", "model")),
                                 ("--precision", t.precision, PRECISIONS),
                                 ("--tokenize", d.tokenize, ("auto", "upfront", "on-demand"))):
        if value not in allowed:
            raise UsageError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def model_config(cfg: Config, vocab: Vocab) -> ModelConfig:
    widths = [int(w) for w in str(cfg.model.cnn_widths).split(",") if w.strip()]
    word_chars = [i + 2 for i, c in enumerate(vocab.chars) if c.isalnum()]
    return ModelConfig(encoder=cfg.model.encoder, vocab_size=len(vocab), embedding_dim=cfg.model.embedding_dim,
                       hidden_dim=cfg.model.hidden_dim, ngram_buckets=cfg.model.ngram_buckets, cnn_widths=widths,
                       max_query_length=cfg.data.max_query_length, max_document_length=cfg.data.max_document_length,
                       word_chars=word_chars, word_bigrams=cfg.model.word_bigrams,
                       shared_embeddings=cfg.model.shared_embeddings, idf=cfg.model.idf and cfg.model.encoder == "ngram",
                       lexical_dim=cfg.model.lexical_dim if cfg.model.encoder == "ngram" else 0,
                       lexical_weight=cfg.model.lexical_weight, word_share=cfg.model.word_share)


def sample_val_corpus(ts: TrainingSet, size: int, seed: int):
    """A deterministic sample of documents that always keeps the validation positives."""
    n = ts.d_tokens.shape[0]
    if size <= 0 or size >= n:
        return None, None
    positives = sorted({d for rel in ts.val_qrels for d in rel})
    g = torch.Generator().manual_seed(seed + 1)
    rest = torch.randperm(n, generator=g)
    keep = torch.ones(n, dtype=torch.bool)
    keep[positives] = False
    others = rest[keep[rest]][: max(0, size - len(positives))]
    docs = torch.cat([torch.tensor(positives, dtype=torch.long), others]).sort().values
    remap = {int(d): i for i, d in enumerate(docs.tolist())}
    return docs, [{remap[d]: g for d, g in rel.items()} for rel in ts.val_qrels]


def run_train(cfg: Config, data: Path | None, hooks: Hooks, should_stop, resume: str | None = None,
              eval_dir: Path | None = None) -> TrainSummary:
    runs_dir = Path(cfg.train.runs_dir)
    if resume:
        run_dir = resolve_run(runs_dir, resume)
        stored = read_config(run_dir)
        cfg = Config({s: dict(v) for s, v in stored["settings"].items()}, cfg.sources).with_overrides(
            {("train", "device"): cfg.train.device, ("train", "runs_dir"): str(runs_dir)}, "flag")
        cfg.values["wandb"]["api_key"] = ""
        data = Path(data or stored["data"]["path"])
    check_settings(cfg)
    from twotower_cli.training import distributed

    ddp = distributed.setup(cfg.train.device)
    try:
        return train_in_process(cfg, data, hooks, should_stop, resume, eval_dir, ddp, runs_dir,
                                run_dir if resume else None)
    finally:
        if ddp:
            ddp.close()


def train_in_process(cfg, data, hooks, should_stop, resume, eval_dir, ddp, runs_dir, run_dir):
    main = ddp is None or ddp.main
    if not main:
        hooks = Hooks()  # progress and messages come from rank 0 only
    device = ddp.device if ddp else resolve_device(cfg.train.device)
    if data is None:
        raise UsageError("no training data given: twotower train DATA")
    pairs = load_pairs(data, cfg.data.query_col, cfg.data.document_col, cfg.data.label_col)
    df = require_trainable(pairs)
    messages = []
    if df.height < pairs.df.height:
        messages.append(f"dropped {pairs.df.height - df.height} rows with an empty query or document")
    if resume:
        vocab = Vocab.load(run_dir / "vocab.json")
    else:
        vocab = Vocab.build([df["query"], df["document"]], cfg.vocab.min_freq, cfg.vocab.max_size,
                            cfg.vocab.lowercase)
    t, d = cfg.train, cfg.data
    # auto: one process tokenises everything up front; under torchrun each tokenises only its slices of the batches
    eager = d.tokenize == "upfront" or (d.tokenize == "auto" and ddp is None)
    ts = build(df, vocab, d.max_query_length, d.max_document_length, t.val_fraction, t.seed, eager=eager)
    world = ddp.world if ddp else 1
    if t.batch_size * world > ts.n_train:
        raise UsageError(f"--batch-size {t.batch_size}{f' x {world} processes' if ddp else ''} is larger than the "
                         f"{ts.n_train} training pairs; use a smaller batch")
    extra = None
    if eval_dir is not None:
        from twotower_cli.evaluation.eval_sets import load_eval

        ev = load_eval(eval_dir)
        extra = SimpleNamespace(q_tokens=torch.from_numpy(vocab.encode(ev.queries, d.max_query_length)),
                                d_tokens=torch.from_numpy(vocab.encode(ev.documents, d.max_document_length)),
                                qrels=ev.qrels)
    mcfg = model_config(cfg, vocab)
    torch.manual_seed(t.seed)
    model = TwoTower(mcfg).to(device)
    if device.type == "cuda":
        ts.to(device)
    if mcfg.idf and not resume:  # from the training documents only: validation positives stay unseen
        val_docs_all = {d for rel in ts.val_qrels for d in rel}
        rows = torch.tensor([i for i in range(len(ts.documents)) if i not in val_docs_all], dtype=torch.long)
        model.set_idf(ts.d_tokens, rows)

    if not resume:
        run_dir = runs_dir / new_run_id(t.run_name)
        if ddp:
            run_dir = Path(ddp.broadcast(str(run_dir)))  # one run folder, named by rank 0
    if not resume and main:
        if run_dir.exists():
            raise UsageError(f"{run_dir} already exists; choose another --run-name")
        run_dir.mkdir(parents=True)
        atomic_write_json(run_dir / "vocab.json", vocab.to_json())
        write_config(run_dir, mcfg, cfg.to_dict(), {"data": {"path": str(Path(data).resolve()), "rows": pairs.df.height,
                                                        "train_pairs": ts.n_train, "val_queries": len(ts.val_q),
                                                        "documents": len(ts.documents)}})
        atomic_write_json(run_dir / "run.json", {"id": run_dir.name, "complete": False, "created": now()})
        write_examples(run_dir, df)
    if ddp:
        ddp.barrier()  # rank 0 has created the run folder
    sinks = []
    if cfg.wandb.enabled and main:
        sinks.append(wandb_sink(cfg, run_dir, messages, hooks))
    keep_until = checkpoint_step(run_dir) if resume else None  # resume: drop records past the checkpoint
    tracker = Tracker(MetricsLog(run_dir / "metrics.jsonl", keep_until_step=keep_until), sinks) if main else NullTracker()
    val_docs, val_qrels = sample_val_corpus(ts, t.val_corpus_size, t.seed)
    interrupted = True
    try:
        try:
            out = fit(model, ts, t, run_dir, device, tracker, hooks, should_stop, resume=bool(resume),
                      validation=Validation(val_docs, val_qrels, extra), ddp=ddp)
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(f"the GPU ran out of memory at --batch-size {t.batch_size}; try --batch-size "
                                f"{max(1, t.batch_size // 2)} (or a smaller --max-document-length); the last "
                                f"checkpoint in {run_dir} is kept") from None
        interrupted = out.interrupted
        summary = TrainSummary(run_dir, out.interrupted, out.best_epoch, out.best, out.history, messages=messages)
        if not out.interrupted and main:
            finish_run(run_dir, runs_dir, model, vocab, ts, device, out, hooks, val_docs, val_qrels,
                       cfg.search.hybrid_weight)
            tracker.log_artifacts(run_dir, {**out.best, "step": out.global_step})
            summary.written = {"run": run_dir, "model": run_dir / "model.safetensors",
                               "metrics": run_dir / "metrics.jsonl", "index": run_dir / "index" / "default",
                               "latest": runs_dir / "latest"}
    finally:
        tracker.close(interrupted)
    for sink in sinks:
        if sink.mode == "offline":
            messages.append(f"W&B run saved offline in {sink.offline_dir}; upload it later with: "
                            f"{sink.sync_command()}")
    if ddp:
        ddp.barrier()  # the others wait until rank 0 has finished the run folder
    if not out.interrupted and t.report and main:
        from twotower_cli.tracking.html_report import write_html_report

        summary.written["report"] = write_html_report(run_dir)
        for sink in sinks:
            if sink.mode == "online":  # the seed published a W&B report after every run
                messages.append(publish_wandb_report(cfg, run_dir, sink))
    return summary


def publish_wandb_report(cfg: Config, run_dir: Path, sink) -> str:
    if not cfg.wandb.entity:
        return ("W&B report not published: no W&B entity is set (wandb.entity / WANDB_ENTITY); publish it later "
                f"with: twotower report --run-id {run_dir.name} --entity ENTITY")
    from twotower_cli.tracking.wandb_report import build_report

    try:
        report = build_report(sink.run.id, sink.run.project, cfg.wandb.entity, f"twotower run {run_dir.name}",
                              "Two-tower retrieval model: training curves, similarities, timing and retrieval results.")
        report.save()
        return f"W&B report: {report.url}"
    except Exception as exc:  # the run itself is safe; only the report failed
        return (f"W&B report not published ({type(exc).__name__}); retry with: twotower report --run-id "
                f"{run_dir.name}")


def wandb_sink(cfg: Config, run_dir: Path, messages: list, hooks: Hooks):
    from twotower_cli.tracking.wandb_sink import WandbSink, choose_mode

    w = cfg.wandb
    choice = choose_mode(w.api_key, w.mode)
    if choice.mode == "offline":
        hooks.message(f"W&B: logging offline ({choice.reason})")
    sink = WandbSink(run_dir, cfg.to_dict(mask_secrets=True), w.project, w.entity, w.run_name, w.api_key, choice,
                     w.init_timeout, notify=hooks.message)
    return sink


def finish_run(run_dir: Path, runs_dir: Path, model, vocab, ts, device, out, hooks: Hooks, val_docs=None,
               val_qrels=None, default_weight: float = 0.5) -> None:
    """Best weights back in, default index, examples, then mark complete and move runs/latest."""
    from twotower_cli.retrieval.index import build_index
    from twotower_cli.training.examples import retrieval_examples

    tensors, _ = read_tensors(run_dir / "model.safetensors")
    model.load_weights(tensors)
    model.eval()
    if model.cfg.lexical_dim and len(ts.val_q):
        hooks.message("choosing the weight of the lexical half of the embedding on the validation queries")
        lex = choose_lexical_weight(model, ts, device, val_docs, val_qrels)
        model.cfg.lexical_weight = lex["weight"]
        save_model(run_dir, model)
        cfg = read_json(run_dir / "config.json")
        cfg["model"] = model.cfg.to_dict()
        cfg["lexical_choice"] = lex
        atomic_write_json(run_dir / "config.json", cfg)
    hooks.message("embedding the training documents into the default index")
    index = build_index(run_dir, model, vocab, [(ts.documents, None)], "default", device=device)
    # ts.documents are unique, so the index's rows are ts.documents' rows: reuse them, don't embed twice
    embeddings = np.load(index / "embeddings.npy")
    doc_emb = torch.from_numpy(embeddings) if len(embeddings) == len(ts.documents) else None
    retrieval_examples(run_dir, model, ts, device, doc_emb)
    hooks.message("choosing the default search on the validation queries (dense, BM25 or both)")
    search = choose_search(model, ts, device, doc_emb, index, val_docs, val_qrels, default_weight)
    run = read_json(run_dir / "run.json")
    run.update(complete=True, finished=now(), best_epoch=out.best_epoch, best=out.best, search=search)
    atomic_write_json(run_dir / "run.json", run)
    set_latest(runs_dir, run_dir)


def checkpoint_step(run_dir: Path) -> int:
    path = run_dir / "checkpoint.safetensors"
    if not path.exists():
        return 0
    meta = header_metadata(path)  # the counters only: the tensors are loaded once, by fit
    try:
        return int(json.loads(meta["state"])["global_step"])
    except (KeyError, ValueError):
        raise ArtifactError(f"{path}: checkpoint metadata is damaged; start a new run") from None


def write_examples(run_dir: Path, df) -> None:
    rows = df.head(10).to_dicts()
    atomic_write_json(run_dir / "data_examples.json", [{k: (v[:500] if isinstance(v, str) else v)
                                                        for k, v in r.items()} for r in rows])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

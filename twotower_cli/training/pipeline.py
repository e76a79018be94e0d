"""`twotower train` from end to end: prepare the data, open the run folder, train, finish the run.

The run folder is created only once the data has loaded, and `runs/latest` moves to it only when it is
complete, so a failed or killed run never becomes "latest". The folder is locked while it is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twotower_cli.compat import BEFORE_SETTING
from twotower_cli.config import FIELDS, Config
from twotower_cli.errors import ArtifactError, TrainingError, UsageError
from twotower_cli.model.artifacts import header_metadata, new_model, read_config, write_config
from twotower_cli.model.towers import ModelConfig
from twotower_cli.runs import Lock, atomic_write_json, is_complete, new_run_id, remove_stale, resolve_run
from twotower_cli.tracking.metrics_log import MetricsLog, NullTracker, Tracker
from twotower_cli.training.batches import TrainingSet
from twotower_cli.training.finish import finish_run
from twotower_cli.training.loop import Hooks, Validation, fit, resolve_device
from twotower_cli.training.prepare import (HELD_OUT, TEXT_ORDER, Prepared, model_config, prepare,
                                            with_base_model_defaults)


@dataclass
class TrainSummary:
    run_dir: Path
    interrupted: bool
    best_epoch: int
    best: dict
    history: list
    written: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    search: dict = field(default_factory=dict)  # the default search: its plan, and why
    test: dict = field(default_factory=dict)  # the run's figures on the test queries
    size_bytes: int = 0


def sample_val_corpus(train_set: TrainingSet, size: int, seed: int):
    """A deterministic sample of documents that always keeps the validation positives."""
    n = train_set.d_tokens.shape[0]
    if size <= 0 or size >= n:
        return None, None
    positives = sorted({d for rel in train_set.val_qrels for d in rel})
    g = torch.Generator().manual_seed(seed + 1)
    rest = torch.randperm(n, generator=g)
    keep = torch.ones(n, dtype=torch.bool)
    keep[positives] = False
    others = rest[keep[rest]][: max(0, size - len(positives))]
    docs = torch.cat([torch.tensor(positives, dtype=torch.long), others]).sort().values
    remap = {int(d): i for i, d in enumerate(docs.tolist())}
    return docs, [{remap[d]: g for d, g in rel.items()} for rel in train_set.val_qrels]


def stored_settings(stored: dict) -> dict:
    """A run's saved settings, completed with what each setting added since it was saved meant for it."""
    out = {s: dict(v) for s, v in stored.items() if isinstance(v, dict)}
    for section, keys in FIELDS.items():
        for key, (default, _) in keys.items():
            out.setdefault(section, {}).setdefault(key, BEFORE_SETTING.get((section, key), default))
    return out


def run_train(cfg: Config, data: Path | None, hooks: Hooks, should_stop, resume: str | None = None,
              eval_dir: Path | None = None) -> TrainSummary:
    runs_dir = Path(cfg.train.runs_dir)
    run_dir = None
    if resume:
        run_dir = resolve_run(runs_dir, resume, write=True)
        if is_complete(run_dir):
            raise UsageError(f"run {run_dir.name} is already complete: there is nothing to resume; search it, or "
                             "train a new run")
        stored = read_config(run_dir)
        if not isinstance(stored.get("settings"), dict) or not isinstance(stored.get("data"), dict):
            raise ArtifactError(f"{run_dir / 'config.json'}: has no 'settings' or 'data' section; this run cannot "
                                "be resumed: train a new one")
        cfg = Config(stored_settings(stored["settings"]), cfg.sources).with_overrides(
            {("train", "device"): cfg.train.device, ("train", "runs_dir"): str(runs_dir)}, "flag")
        cfg.values["wandb"]["api_key"] = ""
        data = Path(data or stored["data"]["path"])
    if data is None:
        raise UsageError("no training data given: twotower train DATA")
    if not resume:
        cfg = with_base_model_defaults(cfg)
    base = None
    if cfg.model.base_model and not resume:  # found (or refused) before the data is read
        from twotower_cli.model.transformer import resolve

        base = resolve(cfg.model.base_model)
    from twotower_cli.training import distributed

    ddp = distributed.setup(cfg.train.device)
    try:
        return train_in_process(cfg, data, hooks if ddp is None or ddp.main else Hooks(), should_stop, run_dir,
                                eval_dir, ddp, base)
    finally:
        if ddp:
            ddp.close()


def open_run(cfg: Config, p: Prepared, mcfg: ModelConfig, data: Path, ddp, base: Path | None = None
             ) -> tuple[Path, Lock | None]:
    """Create and lock a new run folder (rank 0), write what describes it; every process gets its path."""
    runs_dir = Path(cfg.train.runs_dir)
    run_dir = runs_dir / new_run_id(cfg.train.run_name)
    if ddp:
        run_dir = Path(ddp.broadcast(str(run_dir)))  # one run folder, named by rank 0
    lock = None
    if ddp is None or ddp.main:
        if run_dir.exists():
            raise UsageError(f"{run_dir} already exists; choose another --run-name")
        run_dir.mkdir(parents=True)
        lock = Lock(run_dir / ".lock", f"run {run_dir.name}")
        atomic_write_json(run_dir / "vocab.json", p.vocab.to_json())
        data_info = {"path": str(Path(data).resolve()), "name": Path(data).name, "rows": p.file_rows,
                     "train_pairs": p.train_set.n_train, "val_queries": len(p.train_set.val_q),
                     "test_queries": len(p.train_set.test_q), "documents": len(p.train_set.documents),
                     "text_order": TEXT_ORDER, "held_out": HELD_OUT}
        write_config(run_dir, mcfg, cfg.to_dict(), {"data": data_info})
        if base is not None:  # the encoder's folder: the base model's config and tokenizer, its weights to come
            from twotower_cli.model.transformer import copy_model_files

            copy_model_files(base, run_dir / "encoder", mcfg)
        atomic_write_json(run_dir / "run.json", {"id": run_dir.name, "complete": False, "created": now()})
        write_examples(run_dir, p.examples)
    if ddp:
        ddp.barrier()  # rank 0 has created the run folder
    return run_dir, lock


def train_in_process(cfg: Config, data: Path, hooks: Hooks, should_stop, resume_dir: Path | None, eval_dir,
                     ddp, base: Path | None = None) -> TrainSummary:
    main = ddp is None or ddp.main
    lock = Lock(resume_dir / ".lock", f"run {resume_dir.name}") if resume_dir and main else None
    if lock:
        remove_stale(resume_dir)  # what a killed process left: half-written checkpoints and files
    device = ddp.device if ddp else resolve_device(cfg.train.device)
    try:
        p = prepare(cfg, data, ddp, resume_dir, eval_dir)
        try:
            return train_prepared(cfg, p, data, hooks, should_stop, resume_dir, ddp, device, base)
        finally:
            p.close()
    finally:
        if lock:
            lock.release()


def train_prepared(cfg: Config, p: Prepared, data: Path, hooks: Hooks, should_stop, resume_dir, ddp, device,
                   base: Path | None = None):
    t = cfg.train
    if p.batch_size != t.batch_size:
        cfg = cfg.with_overrides({("train", "batch_size"): p.batch_size}, "fitted to the data")
        t = cfg.train
    mcfg = model_config(cfg, p.vocab, base)
    if resume_dir:  # rebuilt from the model config it saved (keys added since take ModelConfig's defaults: what
        # older models did); with the lexical weight it was trained at and no opening weight (a stop while
        # finishing may have stored the ones it chose)
        mcfg = ModelConfig(**{**read_config(resume_dir)["model"], "lexical_weight": mcfg.lexical_weight,
                              "lead_weight": 0.0})
    torch.manual_seed(t.seed)
    model = new_model(mcfg, p.vocab, base if not resume_dir else resume_dir / "encoder")
    model = model.to(device)
    train_set = p.train_set.to(device) if device.type == "cuda" else p.train_set
    if mcfg.idf and not resume_dir:  # from the training documents only: held-out positives stay unseen
        from twotower_cli.model.encode import lexical_tokens

        keep = torch.ones(len(train_set.documents), dtype=torch.bool)
        keep[train_set.held_out_documents()] = False
        # counted over the characters that the exact lexical half reads, whose weights and length factor they are;
        # under torchrun each process counts its share of the documents, and the counts are added up
        model.set_idf(lexical_tokens(model, train_set.d_tokens), torch.nonzero(keep).flatten(),
                      share=(ddp.rank, ddp.world, ddp.add_up) if ddp else None)
    hooks.message(plan(p, t, device, ddp, resume_dir))
    for m in p.messages:  # said before training, where they explain what follows
        hooks.message(f"note: {m}")
    run_dir, lock = (resume_dir, None) if resume_dir else open_run(cfg, p, mcfg, data, ddp, base)
    if hasattr(should_stop, "arm"):  # from here a stop request finishes a step and writes a checkpoint
        should_stop.arm()
    try:
        return train_and_finish(cfg, p, model, run_dir, device, hooks, should_stop, resume_dir is not None, ddp)
    finally:
        if lock:
            lock.release()


def train_and_finish(cfg: Config, p: Prepared, model, run_dir: Path, device, hooks: Hooks, should_stop,
                     resume: bool, ddp) -> TrainSummary:
    main, t, runs_dir = ddp is None or ddp.main, cfg.train, Path(cfg.train.runs_dir)
    sinks = [wandb_sink(cfg, run_dir, hooks)] if cfg.wandb.enabled and main else []
    keep_until = checkpoint_step(run_dir) if resume else None  # resume: drop records past the checkpoint
    tracker = Tracker(MetricsLog(run_dir / "metrics.jsonl", keep_until_step=keep_until), sinks) if main \
        else NullTracker()
    val_docs, val_qrels = sample_val_corpus(p.train_set, t.val_corpus_size, t.seed)
    summary = TrainSummary(run_dir, True, -1, {}, [])
    try:
        try:
            out = fit(model, p.train_set, t, run_dir, device, tracker, hooks, should_stop, resume=resume,
                      validation=Validation(val_docs, val_qrels, p.extra), ddp=ddp)
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(f"the GPU ran out of memory at --batch-size {t.batch_size}; try --batch-size "
                                f"{max(1, t.batch_size // 2)} (or a smaller --max-document-length); the last "
                                f"checkpoint in {run_dir} is kept") from None
        summary = TrainSummary(run_dir, out.interrupted, out.best_epoch, out.best, out.history)
        if not out.interrupted and main:
            if hasattr(should_stop, "finishing"):  # from here a stop request stops at once (`--resume` finishes)
                should_stop.finishing(run_dir.name)
            summary.interrupted = True  # until finished: W&B closes a run stopped here with exit code 1
            finished = finish_run(run_dir, runs_dir, model, p.vocab, p.train_set, device, out, hooks, val_docs,
                                  val_qrels, cfg)
            summary.search, summary.test = finished["search"], finished["test"]
            summary.interrupted = False
            if summary.test:
                tracker.log({"step": out.global_step, **summary.test})
            tracker.log_artifacts(run_dir, {**out.best, **summary.test, "step": out.global_step})
            summary.written = {"run": run_dir, "model": run_dir / "model.safetensors",
                               "metrics": run_dir / "metrics.jsonl", "index": run_dir / "index" / "default",
                               "latest": runs_dir / "latest"}
    finally:
        tracker.close(summary.interrupted)
    for sink in sinks:
        if sink.mode == "offline":
            summary.messages.append(f"W&B run saved offline in {sink.offline_dir}; upload it later with: "
                                    f"{sink.sync_command()}")
    if ddp:
        ddp.barrier()  # the others wait until rank 0 has finished the run folder
    if not summary.interrupted and main:
        if t.report:
            from twotower_cli.tracking.html_report import write_html_report

            summary.written["report"] = write_html_report(run_dir)
        for sink in sinks:
            if sink.mode == "online":  # a W&B report after every online run, as the original exercise had
                summary.messages.append(publish_wandb_report(cfg, run_dir, sink))
        from twotower_cli.runs import folder_size

        summary.size_bytes = folder_size(run_dir)
    return summary


def plan(p: Prepared, t, device, ddp, resume_dir) -> str:
    train_set = p.train_set
    where = f"{device}" + (f" x {ddp.world} processes" if ddp else "")
    n_val, n_test = len(train_set.val_q), len(train_set.test_q)
    held = (f"{n_val:,} validation and {n_test:,} test queries held out" if n_test else
            f"{n_val:,} validation queries held out")
    return (f"{'resuming' if resume_dir else 'training on'} {train_set.n_train:,} pairs ({held}), "
            f"{len(train_set.documents):,} documents, {len(p.vocab):,} characters; {where}, batch {t.batch_size}, "
            f"{t.epochs} {'epoch' if t.epochs == 1 else 'epochs'}"
            + (f", at most {t.max_steps} steps" if t.max_steps else ""))


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


def wandb_sink(cfg: Config, run_dir: Path, hooks: Hooks):
    from twotower_cli.tracking.wandb_sink import WandbSink, choose_mode

    w = cfg.wandb
    choice = choose_mode(w.api_key, w.mode)
    if choice.mode == "offline":
        hooks.message(f"W&B: logging offline ({choice.reason})")
    return WandbSink(run_dir, cfg.to_dict(mask_secrets=True), w.project, w.entity, w.run_name, w.api_key, choice,
                     w.init_timeout, notify=hooks.message)


def checkpoint_step(run_dir: Path) -> int:
    path = run_dir / "checkpoint.safetensors"
    if not path.exists():
        return 0
    meta = header_metadata(path)  # the counters only: the tensors are loaded once, by fit
    try:
        return int(json.loads(meta["state"])["global_step"])
    except (KeyError, ValueError, TypeError):
        raise ArtifactError(f"{path}: checkpoint metadata is damaged; start a new run") from None


def write_examples(run_dir: Path, rows: list[dict]) -> None:
    atomic_write_json(run_dir / "data_examples.json", [{k: (v[:500] if isinstance(v, str) else v)
                                                        for k, v in r.items()} for r in rows])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

"""`twotower train`: progress, interrupts and the closing table around the library's training run."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import err, interactive, note
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, DocumentColOpt, LabelColOpt, QueryColOpt, RunsDirOpt, setting

PLAIN_EVERY_S = 30.0  # outside a terminal, a long epoch still reports this often


def bar_hooks(console):
    """Progress bars, for a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from twotower_cli.training.loop import Hooks

    class BarHooks(Hooks):
        def __init__(self):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}  {task.fields[rate]} pairs/s"),
                                     TimeRemainingColumn(), console=console, transient=False)
            self.task = None

        def epoch_start(self, epoch, epochs, steps, done):
            self.progress.start()
            self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, completed=done,
                                               loss="-", rate="-")

        def step(self, record):
            fields = {"rate": f"{record['perf/running_pairs_per_s']:,.0f}"}
            if "train/loss" in record:
                fields["loss"] = f"{record['train/loss']:.4f}"
            self.progress.update(self.task, advance=1, **fields)

        def epoch_end(self, record):
            self.progress.stop()
            console.print(epoch_line(record), highlight=False)

        def message(self, text):
            console.print(text, highlight=False)

    return BarHooks()


def plain_hooks():
    """One line per epoch (and one every PLAIN_EVERY_S seconds of a long epoch), for a log file or a pipe."""
    from twotower_cli.training.loop import Hooks

    class PlainHooks(Hooks):
        def epoch_start(self, epoch, epochs, steps, done):
            self.epoch, self.epochs, self.steps, self.done = epoch, epochs, steps, done
            self.last, self.loss = time.monotonic(), None

        def step(self, record):
            self.done += 1
            self.loss = record.get("train/loss", self.loss)
            if time.monotonic() - self.last >= PLAIN_EVERY_S:
                self.last = time.monotonic()
                loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
                self.write(f"epoch {self.epoch + 1}/{self.epochs}: step {self.done}/{self.steps}{loss}, "
                           f"{record['perf/running_pairs_per_s']:,.0f} pairs/s")

        def epoch_end(self, record):
            self.write(epoch_line(record) + f" ({record.get('perf/epoch_train_s', 0):.1f} s, "
                       f"{record.get('perf/epoch_pairs_per_s', 0):,.0f} pairs/s)")

        def message(self, text):
            self.write(text)

        def write(self, text):
            sys.stderr.write(text + "\n")  # looked up now: tests and wrappers replace sys.stderr
            sys.stderr.flush()

    return PlainHooks()


def epoch_line(record: dict) -> str:
    vals = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("val/", "eval/"))
                     and isinstance(v, float))
    e = record["epoch"]  # a fraction when --max-steps ends an epoch early
    at = f"{e:g}" if e == int(e) else f"{e:.3g} (step {record.get('step', '?')})"
    return f"epoch {at}: loss {record['epoch/loss']:.4f}  {vals}".rstrip()


def resume_command(run_id: str, runs_dir: str) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # a DDP checkpoint resumes with as many processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = f" --nnodes {world // local} (and the same rendezvous options)" if world != local else ""
    launcher = f"torchrun --nproc_per_node {local}{nodes} -m twotower_cli" if world > 1 else "twotower"
    cmd = f"{launcher} train --resume " + shlex.quote(run_id)
    return cmd + (" --runs-dir " + shlex.quote(str(runs_dir)) if runs_dir != "runs" else "")


class StopFlag:
    """Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130/143. A second Ctrl-C stops at once. Before training
    has started (`arm`: the run folder exists) there is nothing to checkpoint: the first one stops at once, while
    the file is still being read (which takes minutes for a large file), and what was written is removed. After
    training (`finishing`: the default index and the choices, an hour for 10M documents on a CPU) it stops at once
    too: the trained model's checkpoint is kept, and `--resume` finishes the run."""

    def __init__(self, runs_dir: str = "runs"):
        self.signum = None
        self.armed = False
        self.finishing_run = None
        self.runs_dir = runs_dir

    def __call__(self) -> bool:
        return self.signum is not None

    def arm(self) -> None:
        self.armed = True

    def finishing(self, run_id: str) -> None:
        self.finishing_run = run_id

    def install(self):
        def handler(signum, frame):
            if self.finishing_run is not None:
                self.signum = signum
                note(f"\n[yellow]{signal.Signals(signum).name}: stopped while finishing the run[/] (the default "
                     "index, the choices on validation); the trained model's checkpoint is kept. Finish it with: "
                     f"{resume_command(self.finishing_run, self.runs_dir)}")
                raise typer.Exit(143) if signum == signal.SIGTERM else KeyboardInterrupt

            if not self.armed or (self.signum is not None and signum == signal.SIGINT):
                self.signum = signum
                if signum == signal.SIGTERM:
                    note("SIGTERM before training started: stopped; nothing was written")
                    raise typer.Exit(143)
                raise KeyboardInterrupt
            self.signum = signum
            note(f"\n[yellow]{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                 "(Ctrl-C again to stop at once)[/]")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


Opt = typer.Option


@command(app, "train", short_help="Train a model on a pairs file into runs/<id>/", help="Train a two-tower model on a pairs file; writes runs/<id>/ and moves runs/latest.")
def train(
    data: Annotated[Optional[Path], typer.Argument(readable=False, metavar="DATA", show_default=False, help="Pairs file (.tsv, .csv, .parquet, .jsonl); not needed with --resume.")] = None,
    epochs: Annotated[Optional[int], setting("train", "epochs", "--epochs")] = None,
    batch_size: Annotated[Optional[int], setting("train", "batch_size", "--batch-size", "--batch_size", help="Positive pairs per step; fitted to small files.")] = None,
    learning_rate: Annotated[Optional[float], setting("train", "learning_rate", "--learning-rate", "--learning_rate", "--lr", help="Peak learning rate.", metavar="LR")] = None,
    max_steps: Annotated[Optional[int], setting("train", "max_steps", "--max-steps")] = None,
    device: Annotated[Optional[str], setting("train", "device", "--device", metavar="DEVICE")] = None,
    precision: Annotated[Optional[str], setting("train", "precision", "--precision", metavar="fp32|bf16")] = None,
    loss: Annotated[Optional[str], setting("train", "loss", "--loss", metavar="infonce|triplet")] = None,
    encoder: Annotated[Optional[str], setting("model", "encoder", "--encoder", metavar="ngram|cnn|mean")] = None,
    base_model: Annotated[Optional[str], setting("model", "base_model", "--base-model", metavar="NAME_OR_FOLDER", help="Start from a pretrained Hugging Face encoder (a model folder or a hub name; pip install -e '.[hf]').")] = None,
    max_query_tokens: Annotated[Optional[int], setting("model", "max_query_tokens", "--max-query-tokens", help="With --base-model: tokens of a query the encoder reads.")] = None,
    max_document_tokens: Annotated[Optional[int], setting("model", "max_document_tokens", "--max-document-tokens", help="With --base-model: tokens of a document the encoder reads.")] = None,
    embedding_dim: Annotated[Optional[int], setting("model", "embedding_dim", "--embedding-dim", "--embedding_dim", help="Size of the learned embedding.")] = None,
    hidden_dim: Annotated[Optional[int], setting("model", "hidden_dim", "--hidden-dim", "--hidden_dim", help="Size of the n-gram/character embeddings and hidden layers.")] = None,
    lexical_dim: Annotated[Optional[int], setting("model", "lexical_dim", "--lexical-dim")] = None,
    max_query_length: Annotated[Optional[int], setting("data", "max_query_length", "--max-query-length", help="Characters of a query the model reads.")] = None,
    max_document_length: Annotated[Optional[int], setting("data", "max_document_length", "--max-document-length", help="Characters of a document the model reads.")] = None,
    lexical_document_length: Annotated[Optional[int], setting("data", "lexical_document_length", "--lexical-document-length", help="Characters of a document the exact lexical half reads (0: --max-document-length).")] = None,
    lead_characters: Annotated[Optional[int], setting("model", "lead_characters", "--lead-characters", help="A document's first N characters count again in the exact lexical half, at a weight chosen on validation (0: never).")] = None,
    tokenize: Annotated[Optional[str], setting("data", "tokenize", "--tokenize", metavar="MODE")] = None,
    temperature: Annotated[Optional[float], setting("train", "temperature", "--temperature", help="Softmax temperature of infonce.")] = None,
    margin: Annotated[Optional[float], setting("train", "margin", "--margin", help="Margin of the triplet loss.")] = None,
    seed: Annotated[Optional[int], setting("train", "seed", "--seed", help="Seed of the split, batch order, negatives and initial weights.")] = None,
    val_fraction: Annotated[Optional[float], setting("train", "val_fraction", "--val-fraction", help="Share of queries held out for validation.")] = None,
    val_max_queries: Annotated[Optional[int], setting("train", "val_max_queries", "--val-max-queries", help="Most queries held out for validation (0: no cap).")] = None,
    val_corpus_size: Annotated[Optional[int], setting("train", "val_corpus_size", "--val-corpus-size", help="Documents searched in validation: all up to N, else a sample of N keeping the positives (0: all).")] = None,
    eval_dir: Annotated[Optional[Path], Opt("--eval", readable=False, metavar="EVAL", show_default=False, help="Extra evaluation folder (BEIR or Parquet layout), scored each epoch.")] = None,
    runs_dir: RunsDirOpt = None,
    run_name: Annotated[Optional[str], setting("train", "run_name", "--run-name", metavar="NAME", help="Name prefix of the run folder (letters, digits, . _ -).")] = None,
    resume: Annotated[Optional[str], Opt("--resume", metavar="RUN", show_default=False, help="Continue an interrupted run (id or folder).")] = None,
    keep_checkpoint: Annotated[Optional[bool], setting("train", "keep_checkpoint", "--keep-checkpoint/--no-keep-checkpoint")] = None,
    wandb: Annotated[Optional[bool], setting("wandb", "enabled", "--wandb/--no-wandb", help="Log to Weights & Biases.")] = None,
    wandb_project: Annotated[Optional[str], setting("wandb", "project", "--wandb-project", "--wandb_project", metavar="NAME")] = None,
    wandb_entity: Annotated[Optional[str], setting("wandb", "entity", "--wandb-entity", "--wandb_entity", metavar="NAME")] = None,
    wandb_run_name: Annotated[Optional[str], setting("wandb", "run_name", "--wandb-run-name", "--wandb_run_name", metavar="NAME")] = None,
    hard_negatives: Annotated[Optional[str], setting("train", "hard_negatives", "--hard-negatives", metavar="none|bm25|model")] = None,
    shared_embeddings: Annotated[Optional[bool], setting("model", "shared_embeddings", "--shared-embeddings/--separate-embeddings", help="One n-gram table for both towers (or one each).")] = None,
    gather_negatives: Annotated[Optional[bool], setting("train", "gather_negatives", "--gather-negatives/--no-gather-negatives", help="Under torchrun: InfoNCE over every process's documents.")] = None,
    report: Annotated[Optional[bool], setting("train", "report", "--report/--no-report", help="Write the HTML report at the end.")] = None,
    log_level: Annotated[Optional[str], setting("train", "log_level", "--log-level", "--log_level", metavar="LEVEL")] = None,
    query_col: QueryColOpt = None,
    document_col: DocumentColOpt = None,
    label_col: LabelColOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.errors import UsageError
    from twotower_cli.training.pipeline import run_train

    if data is None and resume is None:
        raise UsageError("give the pairs file to train on: twotower train DATA (or --resume RUN to continue one)")
    overrides = {
        ("train", "epochs"): epochs, ("train", "batch_size"): batch_size, ("train", "learning_rate"): learning_rate,
        ("train", "max_steps"): max_steps, ("train", "device"): device, ("train", "precision"): precision,
        ("train", "loss"): loss, ("model", "encoder"): encoder, ("model", "embedding_dim"): embedding_dim,
        ("model", "base_model"): base_model, ("model", "max_query_tokens"): max_query_tokens,
        ("model", "max_document_tokens"): max_document_tokens,
        ("model", "hidden_dim"): hidden_dim, ("model", "lexical_dim"): lexical_dim,
        ("model", "shared_embeddings"): shared_embeddings,
        ("data", "max_query_length"): max_query_length, ("data", "max_document_length"): max_document_length,
        ("data", "lexical_document_length"): lexical_document_length, ("model", "lead_characters"): lead_characters,
        ("data", "tokenize"): tokenize, ("train", "temperature"): temperature, ("train", "margin"): margin,
        ("train", "seed"): seed, ("train", "val_fraction"): val_fraction, ("train", "val_corpus_size"): val_corpus_size,
        ("train", "val_max_queries"): val_max_queries,
        ("train", "runs_dir"): str(runs_dir) if runs_dir else None, ("train", "run_name"): run_name,
        ("train", "keep_checkpoint"): keep_checkpoint,
        ("wandb", "enabled"): wandb, ("wandb", "project"): wandb_project, ("wandb", "entity"): wandb_entity,
        ("wandb", "run_name"): wandb_run_name, ("train", "report"): report,
        ("train", "gather_negatives"): gather_negatives, ("train", "hard_negatives"): hard_negatives,
        ("train", "log_level"): log_level,
        ("data", "query_col"): query_col, ("data", "document_col"): document_col, ("data", "label_col"): label_col,
    }
    cfg = settings(config, overrides)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks
    quiet = cfg.train.log_level in ("warning", "error") or rank != 0
    from twotower_cli.training.loop import Hooks

    hooks = Hooks() if quiet else bar_hooks(err) if interactive() else plain_hooks()
    stop = StopFlag(cfg.train.runs_dir)
    stop.install()
    summary = run_train(cfg, data, hooks, stop, resume=resume, eval_dir=eval_dir)
    if rank != 0:
        if summary.interrupted:
            raise typer.Exit(143 if stop.signum == signal.SIGTERM else 130)
        return
    for m in summary.messages:
        note(f"[yellow]note:[/] {m}")
    if summary.interrupted:
        note(f"[yellow]stopped[/]: checkpoint written to {summary.run_dir / 'checkpoint.safetensors'}")
        note(f"resume with: {resume_command(summary.run_dir.name, cfg.train.runs_dir)}")
        raise typer.Exit(143 if stop.signum == signal.SIGTERM else 130)
    from twotower_cli.cli.train_summary import show_summary, warn_if_weak

    warn_if_weak(summary, cfg)
    show_summary(summary)

"""`twotower train`: progress bars, interrupts and the closing table around the library's training run."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import err, note, out
from twotower_cli.cli.main import app
from twotower_cli.cli.options import (
    ConfigOpt,
    DocumentColOpt,
    LabelColOpt,
    QueryColOpt,
    RunsDirOpt,
)

Opt = typer.Option


def progress_hooks(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from twotower_cli.training.loop import Hooks

    class RichHooks(Hooks):
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
            fields = {}
            if "train/loss" in record:
                fields = {"loss": f"{record['train/loss']:.4f}", "rate": f"{record['perf/pairs_per_s']:,.0f}"}
            self.progress.update(self.task, advance=1, **fields)

        def epoch_end(self, record):
            self.progress.stop()
            vals = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("val/", "eval/"))
                             and isinstance(v, float))
            console.print(f"epoch {int(record['epoch'])}: loss {record['epoch/loss']:.4f}  {vals}", highlight=False)

        def message(self, text):
            console.print(text, highlight=False)

    return RichHooks()


class StopFlag:
    """Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130/143. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self):
        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
            note(f"\n[yellow]{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                 "(Ctrl-C again to stop at once)[/]")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


@command(app, "train", help="Train a two-tower model on a pairs file; writes runs/<id>/ and runs/latest.")
def train(
    data: Annotated[Optional[Path], typer.Argument(help="Pairs file (.tsv, .csv, .parquet, .jsonl).", show_default=False)] = None,
    epochs: Annotated[Optional[int], Opt("--epochs", help="Passes over the data.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", "--batch_size", help="Positive pairs per step.", show_default=False)] = None,
    learning_rate: Annotated[Optional[float], Opt("--learning-rate", "--learning_rate", "--lr", help="Peak learning rate.", show_default=False)] = None,
    device: Annotated[Optional[str], Opt("--device", help="cpu, cuda, cuda:N or auto.", show_default=False)] = None,
    precision: Annotated[Optional[str], Opt("--precision", help="fp32 or bf16 (CUDA only).", show_default=False)] = None,
    loss: Annotated[Optional[str], Opt("--loss", help="infonce or triplet.", show_default=False)] = None,
    encoder: Annotated[Optional[str], Opt("--encoder", help="ngram, cnn or mean.", show_default=False)] = None,
    embedding_dim: Annotated[Optional[int], Opt("--embedding-dim", "--embedding_dim", show_default=False)] = None,
    hidden_dim: Annotated[Optional[int], Opt("--hidden-dim", "--hidden_dim", show_default=False)] = None,
    max_query_length: Annotated[Optional[int], Opt("--max-query-length", show_default=False)] = None,
    max_document_length: Annotated[Optional[int], Opt("--max-document-length", show_default=False)] = None,
    tokenize: Annotated[Optional[str], Opt("--tokenize", help="upfront, on-demand or auto (on-demand under torchrun).", show_default=False)] = None,
    temperature: Annotated[Optional[float], Opt("--temperature", help="InfoNCE temperature.", show_default=False)] = None,
    margin: Annotated[Optional[float], Opt("--margin", help="Triplet margin.", show_default=False)] = None,
    seed: Annotated[Optional[int], Opt("--seed", show_default=False)] = None,
    val_fraction: Annotated[Optional[float], Opt("--val-fraction", help="Share of queries held out.", show_default=False)] = None,
    val_corpus_size: Annotated[Optional[int], Opt("--val-corpus-size", help="Documents searched in validation (0: all).", show_default=False)] = None,
    eval_dir: Annotated[Optional[Path], Opt("--eval", help="Extra evaluation folder (BEIR or Parquet layout), scored each epoch.", show_default=False)] = None,
    runs_dir: RunsDirOpt = None,
    run_name: Annotated[Optional[str], Opt("--run-name", help="Name prefix of the run folder.", show_default=False)] = None,
    resume: Annotated[Optional[str], Opt("--resume", help="Continue an interrupted run (id or folder).", show_default=False)] = None,
    wandb: Annotated[Optional[bool], Opt("--wandb/--no-wandb", help="Log to Weights & Biases.", show_default=False)] = None,
    wandb_project: Annotated[Optional[str], Opt("--wandb-project", "--wandb_project", show_default=False)] = None,
    wandb_entity: Annotated[Optional[str], Opt("--wandb-entity", "--wandb_entity", show_default=False)] = None,
    wandb_run_name: Annotated[Optional[str], Opt("--wandb-run-name", "--wandb_run_name", show_default=False)] = None,
    hard_negatives: Annotated[Optional[str], Opt("--hard-negatives", help="none, bm25 or model: mined negatives added to each query's.", show_default=False)] = None,
    shared_embeddings: Annotated[Optional[bool], Opt("--shared-embeddings/--separate-embeddings", help="One embedding table for both towers (default) or one each.", show_default=False)] = None,
    gather_negatives: Annotated[Optional[bool], Opt("--gather-negatives/--no-gather-negatives", help="Under torchrun: InfoNCE over every process's documents (default on).", show_default=False)] = None,
    report: Annotated[Optional[bool], Opt("--report/--no-report", help="Write the HTML report at the end.", show_default=False)] = None,
    log_level: Annotated[Optional[str], Opt("--log-level", "--log_level", help="debug, info, warning, error.", show_default=False)] = None,
    query_col: QueryColOpt = None,
    document_col: DocumentColOpt = None,
    label_col: LabelColOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.training.pipeline import run_train

    if data is None and resume is None:
        raise typer.BadParameter("give the pairs file to train on (or --resume RUN)", param_hint="DATA")
    overrides = {
        ("train", "epochs"): epochs, ("train", "batch_size"): batch_size, ("train", "learning_rate"): learning_rate,
        ("train", "device"): device, ("train", "precision"): precision, ("train", "loss"): loss,
        ("model", "encoder"): encoder, ("model", "embedding_dim"): embedding_dim, ("model", "hidden_dim"): hidden_dim,
        ("model", "shared_embeddings"): shared_embeddings,
        ("data", "max_query_length"): max_query_length, ("data", "max_document_length"): max_document_length,
        ("data", "tokenize"): tokenize,
        ("train", "temperature"): temperature, ("train", "margin"): margin, ("train", "seed"): seed,
        ("train", "val_fraction"): val_fraction, ("train", "val_corpus_size"): val_corpus_size,
        ("train", "runs_dir"): str(runs_dir) if runs_dir else None, ("train", "run_name"): run_name,
        ("wandb", "enabled"): wandb, ("wandb", "project"): wandb_project, ("wandb", "entity"): wandb_entity,
        ("wandb", "run_name"): wandb_run_name, ("train", "report"): report,
        ("train", "gather_negatives"): gather_negatives, ("train", "hard_negatives"): hard_negatives, ("train", "log_level"): log_level,
        ("data", "query_col"): query_col, ("data", "document_col"): document_col, ("data", "label_col"): label_col,
    }
    cfg = settings(config, overrides)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks
    quiet = cfg.train.log_level in ("warning", "error") or rank != 0
    hooks = progress_hooks(err) if not quiet else None
    stop = StopFlag()
    stop.install()
    if hooks is None:
        from twotower_cli.training.loop import Hooks

        hooks = Hooks()
    summary = run_train(cfg, data, hooks, stop, resume=resume, eval_dir=eval_dir)
    if rank != 0:
        if summary.interrupted:
            raise typer.Exit(143 if stop.signum == signal.SIGTERM else 130)
        return
    for m in summary.messages:
        note(f"[yellow]note:[/] {m}")
    if summary.interrupted:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # a DDP checkpoint resumes with as many processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = f" --nnodes {world // local} (and the same rendezvous options)" if world != local else ""
        launcher = f"torchrun --nproc_per_node {local}{nodes} -m twotower_cli" if world > 1 else "twotower"
        cmd = f"{launcher} train --resume " + shlex.quote(summary.run_dir.name)
        if cfg.train.runs_dir != "runs":
            cmd += " --runs-dir " + shlex.quote(str(cfg.train.runs_dir))
        note(f"[yellow]stopped[/]: checkpoint written to {summary.run_dir / 'checkpoint.safetensors'}")
        note(f"resume with: {cmd}")
        raise typer.Exit(143 if stop.signum == signal.SIGTERM else 130)
    show_summary(summary)


def show_summary(summary) -> None:
    from rich.table import Table

    table = Table(title=f"Best epoch {summary.best_epoch} (by val/mrr@10)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.best.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    paths = Table(title="Written", title_justify="left", show_header=False)
    for k, v in summary.written.items():
        paths.add_row(k, str(v))
    out.print(paths)
    out.print(f"search it: twotower search \"your query\"{'' if summary.run_dir.parent.name == 'runs' else ' --runs-dir ' + str(summary.run_dir.parent)}")
    sys.stdout.flush()

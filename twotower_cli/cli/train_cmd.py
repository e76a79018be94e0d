"""`twotower train`: progress, interrupts and the closing table around the library's training run."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import err, interactive, note
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, DocumentColOpt, LabelColOpt, QueryColOpt, RunsDirOpt
from twotower_cli.cli import train_options as flags

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



@command(app, "train", short_help="Train a model on a pairs file into runs/<id>/",
         help="Train a two-tower model on a pairs file; writes runs/<id>/ and moves runs/latest.")
def train(
    data: flags.Data = None,
    epochs: flags.Epochs = None,
    batch_size: flags.BatchSize = None,
    learning_rate: flags.LearningRate = None,
    max_steps: flags.MaxSteps = None,
    device: flags.Device = None,
    precision: flags.Precision = None,
    loss: flags.Loss = None,
    encoder: flags.Encoder = None,
    base_model: flags.BaseModel = None,
    max_query_tokens: flags.MaxQueryTokens = None,
    max_document_tokens: flags.MaxDocumentTokens = None,
    embedding_dim: flags.EmbeddingDim = None,
    hidden_dim: flags.HiddenDim = None,
    lexical_dim: flags.LexicalDim = None,
    max_query_length: flags.MaxQueryLength = None,
    max_document_length: flags.MaxDocumentLength = None,
    lexical_document_length: flags.LexicalDocumentLength = None,
    lead_characters: flags.LeadCharacters = None,
    tokenize: flags.Tokenize = None,
    temperature: flags.Temperature = None,
    margin: flags.Margin = None,
    seed: flags.Seed = None,
    val_fraction: flags.ValFraction = None,
    val_max_queries: flags.ValMaxQueries = None,
    val_corpus_size: flags.ValCorpusSize = None,
    eval_dir: flags.EvalDir = None,
    runs_dir: RunsDirOpt = None,
    run_name: flags.RunName = None,
    resume: flags.Resume = None,
    keep_checkpoint: flags.KeepCheckpoint = None,
    wandb: flags.Wandb = None,
    wandb_project: flags.WandbProject = None,
    wandb_entity: flags.WandbEntity = None,
    wandb_run_name: flags.WandbRunName = None,
    hard_negatives: flags.HardNegatives = None,
    shared_embeddings: flags.SharedEmbeddings = None,
    gather_negatives: flags.GatherNegatives = None,
    report: flags.Report = None,
    log_level: flags.LogLevel = None,
    query_col: QueryColOpt = None,
    document_col: DocumentColOpt = None,
    label_col: LabelColOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.errors import UsageError
    from twotower_cli.training.pipeline import run_train

    if data is None and resume is None:
        raise UsageError("give the pairs file to train on: twotower train DATA (or --resume RUN to continue one)")
    overrides = flags.setting_overrides(train, locals())
    overrides[("train", "runs_dir")] = str(runs_dir) if runs_dir else None
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

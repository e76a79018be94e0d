"""`twotower report`: the HTML report always; the W&B report when online (or its specification with --dry-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, run_of
from twotower_cli.cli.console import note, out
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, RunOpt, RunsDirOpt

Opt = typer.Option


def check_output(output: Path, run_dir: Path) -> None:
    """The report may go anywhere the user can write an .html file, but never over an artifact of a run."""
    from twotower_cli.errors import UsageError

    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--output {output}: the report is HTML; give a file name ending in .html")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist; create it first")
    if output.exists() and not output.is_file():
        raise UsageError(f"--output {output}: is not a file")
    if output.exists() and output.resolve() != (run_dir / "report.html").resolve():
        head = output.read_bytes()[:200].lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise UsageError(f"--output {output}: exists and is not an HTML report; choose another name")


@command(app, "report", short_help="Write a run's HTML report (and its W&B report)",
         help="Write a run's self-contained HTML report (and its W&B report when online).")
def report_command(
    run: RunOpt = None,
    title: Annotated[Optional[str], Opt(
        "--title", metavar="TEXT", show_default=False, help="Title of the report.")] = None,
    description: Annotated[Optional[str], Opt(
        "--description", metavar="TEXT", show_default=False, help="Text under the title.")] = None,
    project: Annotated[Optional[str], Opt(
        "--project", metavar="NAME", show_default=False, help="W&B project.")] = None,
    entity: Annotated[Optional[str], Opt(
        "--entity", metavar="NAME", show_default=False, help="W&B entity.")] = None,
    output: Annotated[Optional[Path], Opt(
        "--output", "-o", readable=False, metavar="PATH", show_default=False,
        help="HTML path (default: runs/<id>/report.html).")] = None,
    dry_run: Annotated[bool, Opt(
        "--dry-run", metavar="",
        help="Build the W&B report and write its specification as JSON; no network.")] = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.runs import atomic_write_json, read_json_or
    from twotower_cli.tracking.html_report import write_html_report

    cfg, run_dir = run_of(runs_dir, run, config, {("wandb", "project"): project, ("wandb", "entity"): entity},
                          write=output is None or dry_run)  # (what it writes by default goes into the run)
    if output is not None:
        check_output(output, run_dir)
    title = title or f"twotower run {run_dir.name}"
    path = write_html_report(run_dir, output, title, description)  # no description: the model and the file's name
    description = description or ("Two-tower retrieval model: training curves, similarities, timing and retrieval "
                                  "results.")
    out.print(f"HTML report: {path}", highlight=False)
    run = read_json_or(run_dir / "run.json", {})
    wandb_id = run.get("wandb_id") or run_dir.name
    project = cfg.wandb.project or run.get("wandb_project") or "twotower"
    from twotower_cli.tracking.wandb_report import build_report, spec

    if dry_run:
        report = build_report(wandb_id, project, cfg.wandb.entity or "your-entity", title, description)
        spec_path = run_dir / "wandb_report.json"
        atomic_write_json(spec_path, spec(report))
        out.print(f"W&B report specification: {spec_path}", highlight=False)
        return
    if not run.get("wandb_id"):
        note("W&B report not published: this run was trained without --wandb, so W&B has no run to report on; "
             "train with --wandb to log one")
        return
    from twotower_cli.tracking.wandb_sink import choose_mode

    choice = choose_mode(cfg.wandb.api_key, cfg.wandb.mode)
    if choice.mode != "online" or not cfg.wandb.entity:
        why = choice.reason if choice.mode != "online" else "no W&B entity is set (--entity or WANDB_ENTITY)"
        upload = ""
        if run.get("wandb_mode") == "offline" and run.get("wandb_dir"):
            offline = run_dir / "wandb" / Path(run["wandb_dir"]).name  # (inside the run, wherever it was trained)
            upload = f"wandb sync {shown_path(offline if offline.exists() else Path(run['wandb_dir']))}, then "
        runs = "" if Path(cfg.train.runs_dir) == Path("runs") else f" --runs-dir {cfg.train.runs_dir}"
        note(f"W&B report not published: {why}. Once online: {upload}twotower report --run {run_dir.name}{runs} "
             f"--entity ENTITY --project {project}")
        return
    report = build_report(wandb_id, project, cfg.wandb.entity, title, description)
    try:
        report.save()
    except Exception as exc:
        from twotower_cli.errors import TwotowerError

        raise TwotowerError(f"could not publish the W&B report ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); the HTML report is at {path}") from None
    out.print(f"W&B report: {report.url}", highlight=False)


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it, else absolute: what a user can paste."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())

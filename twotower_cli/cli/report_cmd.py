"""`twotower report`: the HTML report always; the W&B report when online (or its specification with --dry-run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import note, out
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, RunsDirOpt

Opt = typer.Option


@command(app, "report", help="Write a run's self-contained HTML report (and its W&B report when online).")
def report_command(
    run_id: Annotated[Optional[str], Opt("--run-id", help="Local or W&B run id (default: runs/latest).", show_default=False)] = None,
    title: Annotated[Optional[str], Opt("--title", show_default=False)] = None,
    description: Annotated[Optional[str], Opt("--description", show_default=False)] = None,
    project: Annotated[Optional[str], Opt("--project", help="W&B project.", show_default=False)] = None,
    entity: Annotated[Optional[str], Opt("--entity", help="W&B entity.", show_default=False)] = None,
    output: Annotated[Optional[Path], Opt("--output", "-o", help="HTML path (default: runs/<id>/report.html).", show_default=False)] = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Build the W&B report and write its specification as JSON; no network.")] = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.runs import atomic_write_json, resolve_run
    from twotower_cli.tracking.html_report import write_html_report

    cfg = settings(config, {("train", "runs_dir"): str(runs_dir) if runs_dir else None,
                            ("wandb", "project"): project, ("wandb", "entity"): entity})
    run_dir = resolve_run(cfg.train.runs_dir, run_id)
    title = title or f"twotower run {run_dir.name}"
    description = description or "Two-tower retrieval model: training curves, similarities, timing and retrieval results."
    path = write_html_report(run_dir, output, title, description)
    out.print(f"HTML report: {path}")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    wandb_id = run.get("wandb_id") or run_dir.name
    project = cfg.wandb.project or run.get("wandb_project") or "twotower"
    from twotower_cli.tracking.wandb_report import build_report, spec

    if dry_run:
        report = build_report(wandb_id, project, cfg.wandb.entity or "your-entity", title, description)
        spec_path = run_dir / "wandb_report.json"
        atomic_write_json(spec_path, spec(report))
        out.print(f"W&B report specification: {spec_path}")
        return
    from twotower_cli.tracking.wandb_sink import choose_mode

    choice = choose_mode(cfg.wandb.api_key, cfg.wandb.mode)
    if choice.mode != "online" or not cfg.wandb.entity:
        why = choice.reason if choice.mode != "online" else "no W&B entity is set (--entity or WANDB_ENTITY)"
        note(f"W&B report not published: {why}. Once online: wandb sync the run "
             f"({run.get('wandb_dir') or 'runs/<id>/wandb/offline-run-*'}), then "
             f"twotower report --run-id {run_dir.name} --entity ENTITY --project {project}")
        return
    report = build_report(wandb_id, project, cfg.wandb.entity, title, description)
    try:
        report.save()
    except Exception as exc:
        from twotower_cli.errors import TwotowerError

        raise TwotowerError(f"could not publish the W&B report ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); the HTML report is at {path}") from None
    out.print(f"W&B report: {report.url}")

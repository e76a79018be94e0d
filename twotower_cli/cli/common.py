"""Helpers the commands share: registration under the one error handler, the effective configuration, the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twotower_cli.cli.errors import guarded


def command(app, name: str, **kwargs):
    """Register ``fn`` as a command, wrapped by the one error handler."""

    def deco(fn):
        from twotower_cli.cli.main import Command

        app.command(name, cls=Command, **kwargs)(guarded(fn))
        return fn

    return deco


def settings(config_path: Path | None, overrides: dict[tuple[str, str], Any] | None = None):
    from twotower_cli.config import load_config

    return load_config(config_path, overrides or {})


def run_of(runs_dir, run, config, overrides: dict | None = None, write: bool = False):
    """The effective configuration and the run folder the user named (default: runs/latest); ``write``: the
    command writes into the run, which must then be a run of the runs folder."""
    from twotower_cli.runs import resolve_run

    cfg = settings(config, {("train", "runs_dir"): str(runs_dir) if runs_dir else None, **(overrides or {})})
    return cfg, resolve_run(cfg.train.runs_dir, run, write)

"""Helpers the commands share: the effective configuration, run lookup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twotower_cli.cli.errors import guarded


def command(app, name: str, **kwargs):
    """Register ``fn`` as a command, wrapped by the one error handler."""

    def deco(fn):
        app.command(name, **kwargs)(guarded(fn))
        return fn

    return deco


def settings(config_path: Path | None, overrides: dict[tuple[str, str], Any] | None = None):
    from twotower_cli.config import load_config

    return load_config(config_path, overrides or {})

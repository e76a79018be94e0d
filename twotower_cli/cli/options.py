"""Options shared by several commands, declared once; options that set a configuration value show its built-in
default (config.toml, the environment and `twotower config` may change it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from twotower_cli.config import FIELDS

METAVARS = {int: "N", float: "X", str: "TEXT"}


def setting(section: str, key: str, *decls: str, help: str | None = None, metavar: str | None = None) -> Any:
    """A flag for a setting of config.toml; its help ends with the built-in default."""
    default, doc = FIELDS[section][key]
    # a sentence, capitalised; but a list of the values the flag takes ("cpu, cuda, cuda:N or auto") keeps them
    # as they are typed
    text = help or ((doc if re.match(r"[a-z0-9_-]+(,| or | \()", doc) else doc[0].upper() + doc[1:]) + ".")
    if isinstance(default, bool):
        option = typer.Option(*decls, help=f"{text} [default: {'on' if default else 'off'}]", metavar="",
                              show_default=False)
    else:
        shown = repr(default) if isinstance(default, str) and default else (default if default != "" else "none")
        option = typer.Option(*decls, help=f"{text} [default: {shown}]",
                              metavar=metavar or METAVARS[type(default)], show_default=False)
    option.twotower_setting = (section, key)  # (what a command's flag sets: `train_options.setting_overrides`)
    return option


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", readable=False, metavar="PATH", show_default=False,
    help="config.toml to read (default: ./config.toml or TWOTOWER_CONFIG).")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="",
                                        help="Print machine-readable JSON on stdout instead of tables.")]
RunOpt = Annotated[Optional[str], typer.Option(
    "--run", "--run-id", metavar="RUN", show_default=False,
    help="Run id, id prefix, W&B id or run folder (default: runs/latest).")]
RunsDirOpt = Annotated[Optional[Path], typer.Option("--runs-dir", readable=False, metavar="PATH", show_default=False,
                                                    help="Folder holding the runs. [default: runs]")]
QueryColOpt = Annotated[Optional[str], setting("data", "query_col", "--query-col", metavar="NAME")]
DocumentColOpt = Annotated[Optional[str], setting("data", "document_col", "--document-col", metavar="NAME")]
LabelColOpt = Annotated[Optional[str], setting("data", "label_col", "--label-col", metavar="NAME")]
DataArg = Annotated[Path, typer.Argument(
    readable=False, metavar="DATA", show_default=False,
    help="Pairs file: .tsv, .csv, .parquet or .jsonl with query, document[, label].")]

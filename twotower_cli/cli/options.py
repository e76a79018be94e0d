"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="config.toml to read (default: ./config.toml or TWOTOWER_CONFIG).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="Run id or folder (default: runs/latest).", show_default=False)]
RunsDirOpt = Annotated[Optional[Path], typer.Option("--runs-dir", help="Folder holding the runs.", show_default=False)]
QueryColOpt = Annotated[Optional[str], typer.Option("--query-col", help="Column holding queries.", show_default=False)]
DocumentColOpt = Annotated[Optional[str], typer.Option("--document-col", help="Column holding documents.", show_default=False)]
LabelColOpt = Annotated[Optional[str], typer.Option("--label-col", help="Column holding labels.", show_default=False)]
DataArg = Annotated[Path, typer.Argument(help="Pairs file: .tsv, .csv, .parquet or .jsonl with query, document[, label].", show_default=False)]

"""`twotower`: the Typer application. Commands live one module per concern and import heavy libraries lazily."""

from __future__ import annotations

from typing import Annotated

import typer

from twotower_cli import __version__

app = typer.Typer(
    name="twotower",
    help="Train, search, evaluate and report on two-tower retrieval models from your own query/document pairs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"twotower {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=show_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Train, search, evaluate and report on two-tower retrieval models from your own query/document pairs."""


# Registering commands imports only typer-level code; each command imports torch/polars/wandb when it runs.
from twotower_cli.cli import config_cmd, data_cmds, report_cmd, search_cmds, train_cmd  # noqa: E402,F401


def main() -> None:
    app(prog_name="twotower")

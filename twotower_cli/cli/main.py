"""`twotower`: the Typer application. Commands live one module per concern and import heavy libraries lazily.

Usage errors (a missing argument, an unknown option, a value out of range) are one line on stderr, exit 2, like
every other error; help printed into a pipe or file is plain text, never cut to a terminal's width.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from twotower_cli import __version__


def no_label(opt):
    if opt is not None:
        opt.metavar = ""  # -h/--help shows no type label, like every other flag
    return opt


def plain_help() -> bool:
    """Help as plain text, wrapped to the width: outside a terminal (nothing is cut when piped) and on a terminal
    too narrow for Rich's panels (which cut long option names and defaults with an ellipsis)."""
    return not sys.stdout.isatty() or shutil.get_terminal_size((80, 24)).columns < 110


class Command(TyperCommand):
    def get_help_option(self, ctx):
        return no_label(super().get_help_option(ctx))

    def format_help(self, ctx, formatter):
        if plain_help():
            self.rich_markup_mode = None
        return super().format_help(ctx, formatter)


class Group(TyperGroup):
    """The command group, with one place that turns Typer's parse errors into one line and exit code 2."""

    def get_help_option(self, ctx):
        return no_label(super().get_help_option(ctx))

    def format_help(self, ctx, formatter):
        if plain_help():
            self.rich_markup_mode = None
        return super().format_help(ctx, formatter)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Exit as exc:
            rv = exc.exit_code
        except typer.Abort:
            sys.stderr.write("error: interrupted\n")
            rv = 130
        except Exception as exc:
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise  # not a parse error: guarded() already handled command errors
            if type(exc).__name__ == "NoArgsIsHelpError":
                sys.stdout.write(exc.format_message() + "\n")
                rv = 0
            else:
                sys.stderr.write(usage_line(exc) + "\n")
                rv = exc.exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def usage_line(exc) -> str:
    """What was wrong, and how the command is used, on one line."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    named = re.search(r"No such option: (--run-id|--run)\b", message)
    if named and ctx is not None and ctx.command.name == "train":  # the flag of the commands that read a run
        message = (f"No such option: {named.group(1)}; train makes a new run: name it with --run-name NAME, or "
                   "continue an interrupted one with --resume RUN")
    match = re.search(r"\(Possible options: ([^)]*)\)|Did you mean (.*)\?$", message)
    if match:  # keep the closest suggestion only (Click lists loose matches too)
        typed = re.search(r"No such option: (\S+)|No such command '([^']*)'", message)
        options = re.findall(r"-{1,2}[\w-]+|'[\w-]+'", match.group(0))
        if typed and options:
            word = typed.group(1) or typed.group(2)
            best = difflib.get_close_matches(word, [o.strip("'") for o in options], n=1, cutoff=0.0)
            message = message[: match.start()].rstrip(". ") + f"; did you mean {best[0]}?"
    usage = ""
    if ctx is not None:
        usage = " ".join(ctx.get_usage().split()).replace("Usage: ", "")
        usage = f" (usage: {usage}; see {ctx.command_path} --help)"
    return f"error: {message.rstrip('.')}{usage}"


app = typer.Typer(
    cls=Group,
    name="twotower",
    help="Train, search, evaluate and report on two-tower retrieval models from your own query/document pairs.",
    # piped help is as wide as it needs to be: nothing is cut (a terminal's width wraps it)
    context_settings={"help_option_names": ["-h", "--help"],
                      **({} if sys.stdout.isatty() else {"max_content_width": 200, "terminal_width": 200})},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"twotower {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=show_version, is_eager=True, metavar="",
                                          help="Show the version and exit.")] = False,
) -> None:
    """Train, search, evaluate and report on two-tower retrieval models from your own query/document pairs."""


# Registering commands imports only typer-level code; each command imports torch/polars/wandb when it runs.
from twotower_cli.cli import (config_cmd, data_cmds, report_cmd, search_cmds, serve_cmd,  # noqa: E402,F401
                              train_cmd, verify_cmd)


def main() -> None:
    if not sys.stdout.isatty() and not os.environ.get("TWOTOWER_RICH_HELP"):
        app.rich_markup_mode = None  # plain help in a pipe or a file: every flag name whole, no box to cut
    app(prog_name="twotower")

"""The one place where exceptions become user messages and exit codes."""

from __future__ import annotations

import functools
import os

import typer

from twotower_cli.cli.console import error_line
from twotower_cli.errors import TwotowerError


def debug() -> bool:
    return os.environ.get("TWOTOWER_DEBUG", "") not in ("", "0", "false")


def guarded(fn):
    """Run a command; turn its failures into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TwotowerError as exc:
            if debug():
                raise
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            if debug():
                raise
            error_line("out of memory; use a smaller --batch-size or a smaller file")
            raise typer.Exit(1) from None
        except OSError as exc:
            if debug():
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            error_line(f"{where}{exc.strerror or exc}; check the path, its permissions and free disk space")
            raise typer.Exit(1) from None
        except Exception as exc:  # anything else is our bug: say so, without a traceback
            if debug():
                raise
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
                error_line("the GPU ran out of memory; use a smaller --batch-size (or --max-document-length), "
                           "or --device cpu")
                raise typer.Exit(1) from None
            first = (str(exc).strip().splitlines() or [""])[0]
            error_line(f"internal error ({type(exc).__name__}: {first}); rerun with TWOTOWER_DEBUG=1 "
                       "for the traceback and report it")
            raise typer.Exit(1) from None

    return wrapper

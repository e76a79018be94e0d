"""The one place where exceptions from the commands become user messages and exit codes (parse errors are turned
into one line by `main.Group`)."""

from __future__ import annotations

import errno
import functools
import os

import typer

from twotower_cli.cli.console import error_line
from twotower_cli.errors import TwotowerError


def debug() -> bool:
    return os.environ.get("TWOTOWER_DEBUG", "") not in ("", "0", "false")


def os_message(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free some disk space and retry"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied; check the permissions of the file or folder"
    if exc.errno == errno.EROFS:
        return f"{where}the file system is read-only; use a writable folder (--runs-dir, --output)"
    return f"{where}{exc.strerror or exc}; check the path, its permissions and free disk space"


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
            error_line(os_message(exc))
            raise typer.Exit(1) from None
        except Exception as exc:
            if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
                raise  # a usage error raised by Typer itself (BadParameter...): main.Group prints it, exit 2
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

"""Where output goes: results on stdout, progress and messages on stderr; secrets never printed.

Outside a terminal (a pipe, a file) nothing is cut to 80 columns: tables take the width their cells need, and
progress is plain lines instead of redrawn bars."""

from __future__ import annotations

import os
import sys

from rich.console import Console

WIDE = 100_000  # "as wide as the content": rich tables never shrink their columns below it


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else WIDE, highlight=tty)


out = console()
err = console(stderr=True)


def interactive() -> bool:
    """True when progress can be drawn as bars (stderr is a terminal)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def secrets() -> list[str]:
    """Values that must never be shown: the W&B key from the environment or .env."""
    found = []
    key = os.environ.get("WANDB_API_KEY") or os.environ.get("TWOTOWER_WANDB_API_KEY")
    if key:
        found.append(key)
    try:
        from dotenv import dotenv_values

        for name in ("WANDB_API_KEY", "TWOTOWER_WANDB_API_KEY"):
            value = dotenv_values(".env").get(name) if os.path.isfile(".env") else None
            if value:
                found.append(value)
    except Exception:  # a broken .env must not hide the original error
        pass
    return [s for s in found if len(s) >= 4]


def redact(text: str) -> str:
    for s in secrets():
        text = text.replace(s, "****")
    return text


def error_line(message: str) -> None:
    """One line on stderr, never wrapped, never coloured in a way that breaks grep."""
    line = " ".join(redact(message).split())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def note(message: str) -> None:
    err.print(redact(message), highlight=False)


def print_json(obj) -> None:
    """Machine-readable output: strict JSON (NaN and infinity are refused, never printed), one document."""
    import json

    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")

"""Where output goes: results on stdout, progress and messages on stderr; secrets never printed."""

from __future__ import annotations

import os
import sys

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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

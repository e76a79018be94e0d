"""Run folders: ids, atomic writes, `runs/latest`, and finding a run from what the user typed.

A run folder is complete once `model.safetensors`, `config.json` and `vocab.json` exist and `complete` is true
in `run.json`; `runs/latest` is only ever switched (atomically) to a complete run.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from twotower_cli.errors import ArtifactError

UMASK = os.umask(0o022)
os.umask(UMASK)


def new_run_id(name: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = secrets.token_hex(2)
    return f"{name}-{stamp}-{suffix}" if name else f"{stamp}-{suffix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: Path, what: str = "file") -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing {what}; the folder is incomplete") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object; the file is corrupt")
    return obj


def read_json_or(path: Path, default):
    """An optional JSON file of a run (examples, similarities): ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def set_latest(runs_dir: Path, run_dir: Path) -> None:
    """Point runs/latest at ``run_dir`` with an atomic symlink swap."""
    link = Path(runs_dir) / "latest"
    tmp = Path(runs_dir) / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(run_dir).name, tmp)
    os.replace(tmp, link)


def is_complete(run_dir: Path) -> bool:
    try:
        return bool(json.loads((Path(run_dir) / "run.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def resolve_run(runs_dir: Path | str, run: str | None) -> Path:
    """A run from an id, a W&B id, a path, or (None) runs/latest."""
    runs_dir = Path(runs_dir)
    if run:
        candidates = [Path(run), runs_dir / run]
        for c in candidates:
            if c.is_dir() and (c / "config.json").exists():
                return c
        if runs_dir.is_dir():  # a W&B id or a unique prefix of a run id
            matches = [d for d in runs_dir.iterdir() if d.is_dir() and not d.is_symlink()
                       and (d.name.startswith(run) or wandb_id(d) == run)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ArtifactError(f"run '{run}' is ambiguous in {runs_dir}: "
                                    + ", ".join(sorted(m.name for m in matches)[:5]))
        raise ArtifactError(f"run '{run}' not found in {runs_dir}; list runs with `ls {runs_dir}`")
    latest = runs_dir / "latest"
    if not latest.exists():
        raise ArtifactError(f"no trained run in {runs_dir} (no {latest}); train one first: twotower train DATA")
    return latest.resolve()


def wandb_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("wandb_id")
    except (OSError, ValueError):
        return None

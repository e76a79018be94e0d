"""Run folders: ids, atomic writes, locks, stale temporary files, `runs/latest`, and finding a run from what the
user typed.

A run folder is complete once `model.safetensors`, `config.json` and `vocab.json` exist and `complete` is true
in `run.json`; `runs/latest` is only ever switched (atomically) to a complete run inside the runs folder.
Writers of a run folder or an index hold a lock (like git's `index.lock`, but released by the kernel when the
process dies, so a killed writer never leaves a stale lock); the temporary files a killed writer leaves are
removed by the next writer that takes the lock.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from twotower_cli.errors import ArtifactError, UsageError

UMASK = os.umask(0o022)
os.umask(UMASK)


def new_run_id(name: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = secrets.token_hex(2)
    return f"{name}-{stamp}-{suffix}" if name else f"{stamp}-{suffix}"


def disk_full(path: Path, exc: OSError) -> ArtifactError:
    return ArtifactError(f"{path}: no space left on the device while writing it; free some disk space and retry "
                         "(nothing already written was changed)")


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes beside ``path`` when the disk cannot hold them."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return
    if needed > free:
        raise ArtifactError(f"{path}: needs about {needed / 2**20:,.0f} MiB but only {free / 2**20:,.0f} MiB are "
                            "free on its disk; free some space and retry")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, len(data))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)  # the rename itself survives a power loss only once the folder is synced
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(path, exc) from None
        raise


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


def file_stamp(path: Path) -> tuple:
    """A file's identity and state (inode, size, modification and change times): any write or replacement moves
    the change time, whatever the modification time says."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp_or_none(path: Path):
    try:
        return file_stamp(path)
    except OSError:
        return None


def read_json(path: Path, what: str = "file") -> dict:
    try:
        if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
            raise ArtifactError(f"{path}: not a regular file (a device or a pipe), expected the {what}")
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing {what}; the folder is incomplete") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a folder, expected the {what} (a JSON file)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object; the file is corrupt")
    return obj


def read_json_or(path: Path, default):
    """An optional JSON file of a run (examples, similarities): ``default`` when it is missing, unreadable or not of
    the same JSON type as ``default``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return obj if isinstance(obj, type(default)) else default


# -- locks and stale temporary files ------------------------------------------------------------------------------

class Lock:
    """An exclusive lock on ``path`` (a file created beside what it guards), held until ``release`` or exit."""

    def __init__(self, path: Path, what: str):
        import fcntl

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            pid = self.fh.read().strip() or "?"
            self.fh.close()
            if pid == str(os.getpid()):  # (flock locks are per open file: a thread of this process holds it)
                raise ArtifactError(f"{what} is being written by this process already (another thread, lock "
                                    f"{self.path}); wait for that write to finish") from None
            raise ArtifactError(f"{what} is being written by another twotower process (pid {pid}, lock "
                                f"{self.path}); wait for it to finish or stop it") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()

    def release(self) -> None:
        if not self.fh.closed:
            self.fh.close()  # closing drops the lock; the file stays (removing it would race a waiting writer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def scratch_dir(parent: Path, prefix: str, name: str | None = None) -> tuple[Path, Lock]:
    """A new folder ``parent/<prefix><name>`` (name: ``<pid>-<random>`` unless given), held by a lock inside it
    until the Lock is released (the caller removes the folder). Folders of the same prefix that nobody holds any
    more were left by killed processes: removed first. A lock, not a process id, tells the living from the dead: ids
    mean nothing across containers and machines sharing a folder."""
    parent = Path(parent)
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is a file, not a folder; choose another --runs-dir")
    remove_abandoned(parent, prefix)
    folder = parent / f"{prefix}{name or f'{os.getpid()}-{secrets.token_hex(4)}'}"
    try:
        folder.mkdir(parents=True)
        return folder, Lock(folder / ".lock", f"folder {folder.name}")
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"cannot write in {parent} ({exc.strerror or exc}); check its permissions and free space, "
                         "or choose another --runs-dir") from None


def remove_abandoned(parent: Path, prefix: str, grace_s: float = 60.0) -> list[Path]:
    """Remove ``parent/<prefix>*`` folders whose lock nobody holds, older than ``grace_s`` (a folder being created
    has no lock yet for an instant)."""
    removed = []
    for p in Path(parent).glob(f"{prefix}*") if Path(parent).is_dir() else []:
        try:
            young = time.time() - p.stat().st_mtime < grace_s
        except OSError:
            continue
        if p.is_dir() and not p.is_symlink() and not young and not is_locked(p / ".lock"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def is_locked(path: Path) -> bool:
    """True while another process holds the lock file ``path``."""
    import fcntl

    if not Path(path).exists():
        return False
    try:
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def remove_stale(folder: Path) -> list[Path]:
    """Remove what killed writers leave in ``folder`` (call with the folder's lock held): temporary files
    (`.NAME.*.tmp`) and temporary folders (`.NAME.tmp-PID`, `.bm25.tmp-PID`). Returns what was removed."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or ".tmp-" in p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# -- runs/latest and finding runs -----------------------------------------------------------------------------------

def set_latest(runs_dir: Path, run_dir: Path) -> None:
    """Point runs/latest at ``run_dir`` (a folder of ``runs_dir``) with an atomic symlink swap."""
    if Path(run_dir).resolve().parent != Path(runs_dir).resolve():
        raise ArtifactError(f"{run_dir} is not a folder of {runs_dir}; runs/latest only points inside it")
    link = Path(runs_dir) / "latest"
    tmp = Path(runs_dir) / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(run_dir).name, tmp)
    os.replace(tmp, link)


def is_complete(run_dir: Path) -> bool:
    try:
        obj = json.loads((Path(run_dir) / "run.json").read_text())
        return isinstance(obj, dict) and bool(obj.get("complete"))
    except (OSError, ValueError):
        return False


def inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def resolve_run(runs_dir: Path | str, run: str | None, write: bool = False) -> Path:
    """A run from an id, a unique prefix of one, a W&B id, a run's folder, or (None) runs/latest. A command that
    writes into the run (``write``: an index, a report, a resumed training) takes only a run of the runs folder:
    naming a folder elsewhere reads it, and never makes twotower write outside the runs folder."""
    runs_dir = Path(runs_dir)
    if run:
        if "\n" in run or "\x00" in run:
            raise UsageError(f"run {run!r} contains control characters; give a run id or folder")
        for c in (Path(run), runs_dir / run):
            if c.is_dir() and (c / "config.json").exists():
                if write and (not inside(c, runs_dir) or c.resolve() == runs_dir.resolve()):
                    raise UsageError(f"run folder {c} is outside the runs folder {runs_dir}, and this command "
                                     f"writes into the run; pass --runs-dir {c.resolve().parent} to use it")
                return c.resolve()
        if Path(run).is_dir() and (Path(run) / "latest").exists():
            raise UsageError(f"{run} is a runs folder, not a run: pass --runs-dir {run} (its latest run), or one of "
                             "its runs")
        holder = next((p for p in Path(run).parents if (p / "run.json").is_file() or (p / "config.json").is_file()),
                      None) if "/" in run else None
        if holder is not None:
            what = f"the index '{Path(run).name}' of" if Path(run).parent.name == "index" else "inside"
            raise UsageError(f"{run} is {what} the run {holder}, not a run: pass --run {holder}")
        if runs_dir.is_dir() and "/" not in run:  # a W&B id or a unique prefix of a run id
            matches = [d for d in runs_dir.iterdir() if d.is_dir() and not d.is_symlink()
                       and not d.name.startswith(".") and (d.name.startswith(run) or wandb_id(d) == run)]
            if len(matches) == 1:
                return matches[0].resolve()
            if len(matches) > 1:
                raise ArtifactError(f"run '{run}' is ambiguous in {runs_dir}: "
                                    + ", ".join(sorted(m.name for m in matches)[:5]))
        where = f"list runs with `ls {runs_dir}`" if runs_dir.is_dir() else f"there is no runs folder {runs_dir}"
        raise ArtifactError(f"run '{run}' not found in {runs_dir}; {where}")
    latest = runs_dir / "latest"
    if latest.is_symlink():
        try:
            target = latest.resolve(strict=True)
        except RuntimeError:
            raise ArtifactError(f"{latest} is a symbolic link loop; point it at a run: "
                                f"ln -sfn RUN_ID {latest}") from None
        except OSError:
            raise ArtifactError(f"{latest} points at {os.readlink(latest)}, which does not exist; train again or "
                                f"point it at a run: ln -sfn RUN_ID {latest}") from None
        if target.parent != runs_dir.resolve():
            raise ArtifactError(f"{latest} points outside {runs_dir} (at {target}); point it at a run of this folder")
        return target
    if latest.exists():
        raise ArtifactError(f"{latest} is not a symbolic link to a run; remove it and train again")
    raise ArtifactError(f"no trained run in {runs_dir} (no {latest}); train one first: twotower train DATA")


def wandb_id(run_dir: Path) -> str | None:
    run = read_json_or(Path(run_dir) / "run.json", {})
    return run.get("wandb_id") if isinstance(run.get("wandb_id"), str) else None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())

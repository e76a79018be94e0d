"""Where metrics go: `metrics.jsonl` always (one flushed JSON object per line), W&B when enabled.

Metric names are stable and shared: `train/loss`, `val/mrr@10`, `perf/pairs_per_s`, ...
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from twotower_cli.runs import atomic_write_bytes


def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads better than an invalid file
    return value


class MetricsLog:
    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            self.truncate(keep_until_step)
        self.fh = open(self.path, "a", encoding="utf-8")

    def truncate(self, step: int) -> None:
        """On resume, drop records past the checkpoint (and any half line a kill left behind)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step", 0), (int, float)) and rec.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())

    def log(self, record: dict) -> None:
        line = json.dumps({k: clean(v) for k, v in record.items()})
        self.fh.write(line + "\n")
        self.fh.flush()

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def read_metrics(path: Path) -> list[dict]:
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):  # a damaged line ([1, 2], null, a half line) is skipped, not fatal
            out.append(rec)
    return out


class Tracker:
    """Fans records out to metrics.jsonl and any extra sinks (W&B)."""

    def __init__(self, log: MetricsLog, sinks: list | None = None):
        self.log_file = log
        self.sinks = sinks or []

    def log(self, record: dict) -> None:
        self.log_file.log(record)
        for sink in self.sinks:
            sink.log(record)

    def log_artifacts(self, run_dir: Path, summary: dict) -> None:
        for sink in self.sinks:
            sink.log_artifacts(run_dir, summary)

    def close(self, interrupted: bool = False) -> None:
        self.log_file.close()
        for sink in self.sinks:
            sink.finish(interrupted)


class NullTracker:
    """What processes other than rank 0 log to: nothing."""

    def log(self, record: dict) -> None: ...
    def log_artifacts(self, run_dir, summary: dict) -> None: ...
    def close(self, interrupted: bool = False) -> None: ...

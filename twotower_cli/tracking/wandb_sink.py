"""Weights & Biases logging that never loses a run and never hangs.

The mode is decided before `wandb.init`: WANDB_MODE if set; else online only when an API key is configured and
the server answers within a few seconds; otherwise offline (wandb's files live in the run folder, and
`wandb sync` uploads them later). If online init fails anyway, the same process falls back to offline.
wandb is imported only here, and only when logging is on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT = 3.0


@dataclass
class ModeChoice:
    mode: str  # online, offline or disabled
    reason: str


def netrc_has_key(host: str) -> bool:
    try:
        import netrc

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return bool(os.path.exists(path) and netrc.netrc(path).authenticators(host))
    except Exception:
        return False


def server_reachable(base_url: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether the server answers an HTTP request within ``timeout`` (any status counts as an answer), and if not,
    why: a refused connection and a server that never answers are told apart.

    A bare TCP connect is not enough: a server that accepts but never answers would make wandb.init hang."""
    import http.client
    import socket

    u = urlparse(base_url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    try:
        conn = conn_cls(u.hostname, u.port, timeout=timeout)
        conn.request("GET", "/healthz")
        conn.getresponse().read(0)
        conn.close()
        return True, ""
    except ConnectionRefusedError:
        return False, f"the W&B server {base_url} refused the connection"
    except (socket.timeout, TimeoutError):
        return False, f"the W&B server {base_url} did not answer within {timeout:g} s"
    except socket.gaierror:
        return False, f"the W&B server's name {u.hostname} could not be resolved"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"the W&B server {base_url} could not be reached ({type(exc).__name__})"


def choose_mode(api_key: str, configured_mode: str = "", env=None, timeout: float = PROBE_TIMEOUT) -> ModeChoice:
    env = os.environ if env is None else env
    explicit = env.get("WANDB_MODE") or configured_mode
    if explicit:
        mode = {"dryrun": "offline", "run": "online"}.get(explicit, explicit)
        if mode not in ("online", "offline", "disabled"):
            from twotower_cli.errors import ConfigError

            raise ConfigError(f"W&B mode {explicit!r} (WANDB_MODE or wandb.mode) is not online, offline or disabled")
        return ModeChoice(mode, "WANDB_MODE" if env.get("WANDB_MODE") else "wandb.mode setting")
    base = env.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not (api_key or netrc_has_key(urlparse(base).hostname or "")):
        return ModeChoice("offline", "no W&B API key is configured")
    reachable, why = server_reachable(base, timeout)
    if not reachable:
        return ModeChoice("offline", why)
    return ModeChoice("online", "API key configured and server reachable")


class WandbSink:
    """A Tracker sink: forwards records to a wandb run whose id is the run folder's id."""

    def __init__(self, run_dir: Path, config: dict, project: str, entity: str, name: str, api_key: str,
                 mode: ModeChoice, init_timeout: float = 15.0, notify=None):
        import wandb

        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.notify = notify or (lambda text: None)
        if api_key:
            os.environ["WANDB_API_KEY"] = api_key  # for wandb's own process; never printed or saved
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        kwargs = dict(project=project or "twotower", entity=entity or None, name=name or None,
                      id=self.run_dir.name, dir=str(self.run_dir), config=config, resume="allow",
                      reinit="finish_previous")
        self.mode = mode.mode
        try:
            self.run = wandb.init(mode=mode.mode, settings=wandb.Settings(init_timeout=init_timeout,
                                                                          console="off", silent=True), **kwargs)
        except Exception as exc:  # online init failed: the run must not be lost
            if mode.mode != "online":
                raise
            self.notify(f"W&B online init failed ({type(exc).__name__}); logging offline instead")
            self.mode = "offline"
            try:  # wandb's service still holds the failed online run under this id: start a fresh service
                wandb.teardown()
            except Exception:
                pass
            self.run = wandb.init(mode="offline", settings=wandb.Settings(console="off", silent=True), **kwargs)
        self.offline_dir = Path(self.run.dir).parent if self.mode == "offline" else None
        self.record_run_id()

    def record_run_id(self) -> None:
        from twotower_cli.runs import atomic_write_json, read_json

        path = self.run_dir / "run.json"
        if path.exists():
            run = read_json(path)
            run.update(wandb_id=self.run.id, wandb_mode=self.mode, wandb_project=self.run.project,
                       wandb_url=getattr(self.run, "url", None) if self.mode == "online" else None,
                       wandb_dir=str(self.offline_dir) if self.offline_dir else None)
            atomic_write_json(path, run)

    def sync_command(self) -> str:
        return f"wandb sync {self.offline_dir}" if self.offline_dir else ""

    def log(self, record: dict) -> None:
        data = {k: v for k, v in record.items() if k != "step" and v is not None}
        self.run.log(data, step=int(record["step"]))

    def log_artifacts(self, run_dir: Path, summary: dict) -> None:
        """Once, at the end: examples, retrieval results, similarity histograms and the model as an artifact."""
        wandb = self.wandb
        run_dir = Path(run_dir)
        payload = {}
        from twotower_cli.runs import read_json_or

        examples = read_json_or(run_dir / "data_examples.json", [])
        if examples:
            cols = list(examples[0])
            payload["data/examples"] = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in examples])
        results = read_json_or(run_dir / "retrieval_examples.json", [])
        if results:
            rows = [[r["query"], h["rank"], h["score"], h["document"], h["relevant"], r["found"]]
                    for r in results for h in r["results"]]
            payload["retrieval/results"] = wandb.Table(
                columns=["query", "rank", "score", "document", "relevant", "found_in_top5"], data=rows)
        sims = read_json_or(run_dir / "similarities.json", {})
        if sims.get("positive"):
            payload["similarity/positive"] = wandb.Histogram(sims["positive"])
            payload["similarity/negative"] = wandb.Histogram(sims["negative"])
        if payload:
            self.run.log(payload, step=int(summary.get("step", 0)))
        for k, v in summary.items():
            if k.startswith(("val/", "eval/", "test/")):
                self.run.summary[k] = v
        art = wandb.Artifact(f"model-{self.run.id}", type="model",
                             metadata={k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        for name in ("model.safetensors", "config.json", "vocab.json"):
            if (run_dir / name).exists():
                art.add_file(str(run_dir / name), name=name)
        self.run.log_artifact(art)

    def finish(self, interrupted: bool = False) -> None:
        try:
            self.run.finish(exit_code=1 if interrupted else 0)
        except Exception:
            pass


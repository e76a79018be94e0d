"""`twotower serve`: the Python API behind an HTTP JSON service (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, run_of
from twotower_cli.cli.console import note
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, RunOpt, RunsDirOpt

Opt = typer.Option


@command(app, "serve", short_help="Serve a run over HTTP (search, embed, health)",
         help="Serve a run over HTTP: POST /search, POST /embed, GET /health, OpenAPI docs at /docs.")
def serve_command(
    run: RunOpt = None,
    index: Annotated[Optional[str], Opt(
        "--index", metavar="NAME", show_default=False,
        help="Index searched (default: the one training built).")] = None,
    host: Annotated[str, Opt(
        "--host", metavar="HOST", help="Address to listen on (only this machine by default).")] = "127.0.0.1",
    port: Annotated[int, Opt(
        "--port", metavar="PORT", min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    device: Annotated[str, Opt(
        "--device", metavar="DEVICE", help="cpu (the NumPy query path) or cuda[:N] (the index on the GPU).")] = "cpu",
    timeout: Annotated[float, Opt(
        "--timeout", metavar="SECONDS", min=0.1, max=3600,
        help="A request's headers must arrive within this, its body within 3 times this; a slower client "
             "gets a 408 (and one that stops reading its answer is cut off after 3 times this).")] = 10.0,
    max_connections: Annotated[int, Opt(
        "--max-connections", metavar="N", min=1,
        help="Open connections at most; past it the longest idle one is closed (none idle: a 503).")] = 2048,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.serve import check_installed, serve

    check_installed()  # before loading anything
    cfg, run_dir = run_of(runs_dir, run, config)
    if device != "cpu":
        from twotower_cli.training.loop import resolve_device

        device = str(resolve_device(device))
    serve(run_dir, index or cfg.search.index, host, port, notify=note, device=device, timeout=timeout,
          max_connections=max_connections)

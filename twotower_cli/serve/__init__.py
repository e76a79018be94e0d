"""`twotower serve`: the Python API behind an HTTP JSON service (FastAPI on uvicorn; the `serve` extra).

    POST /search  {"queries": ["..."], "k": 10, "hybrid": null}   -> {"results": [{"query", "hits": [...]}]}
    POST /embed   {"texts": ["..."], "kind": "query"}              -> {"dim", "embeddings": [[...]]}
    GET  /health                                                    -> run, model fingerprint, index build and size
    GET  /docs, /openapi.json                                       -> the OpenAPI description

The model and index are loaded once, before the port opens; an index rebuilt while the server runs is opened as a
whole at the next search (`/health` says which build answers). One worker thread does all the numeric work
(`batcher.py`); every limit is a 4xx with a JSON error, and so is every error the HTTP layer answers itself
(`http.py`): nothing a client sends can make a 500 or stop the server.
"""

from __future__ import annotations

from pathlib import Path

from twotower_cli.errors import UsageError
from twotower_cli.serve.batcher import Batcher  # noqa: F401  (re-exported)
from twotower_cli.serve.http import listening_socket


def create_app(model):
    """The FastAPI application serving ``model`` (`serve/app.py`; imports FastAPI)."""
    from twotower_cli.serve.app import create_app as application

    return application(model)


def check_installed() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("twotower serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None


def serve(run_dir: Path, index: str, host: str, port: int, notify=print, device: str = "cpu",
          timeout: float = 10.0, max_connections: int = 2048) -> None:
    """Load the run once, open the port, serve until interrupted."""
    import uvicorn

    from twotower_cli.api import TwoTowerModel
    from twotower_cli.serve.http import guarded_protocol

    model = TwoTowerModel(run_dir, index, device)
    model.search("warm up", k=1)  # load the index, the weights (and BM25) before the first request
    app = create_app(model)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    notify(f"serving run {model.run_dir.name} (index {model.index_name}, {model.index.count:,} documents) on "
           f"http://{host}:{bound}  (API docs: http://{host}:{bound}/docs; Ctrl-C stops)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                            http=guarded_protocol(timeout, 3 * timeout, max_connections))
    uvicorn.Server(config).run(sockets=[sock])

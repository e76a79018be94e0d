"""`twotower serve`: the Python API behind an HTTP JSON service (FastAPI on uvicorn; the `serve` extra).

    POST /search  {"queries": ["..."], "k": 10, "hybrid": null}   -> {"results": [{"query", "hits": [...]}]}
    POST /embed   {"texts": ["..."], "kind": "query"}              -> {"dim", "embeddings": [[...]]}
    GET  /health                                                    -> run, model fingerprint, index size
    GET  /docs, /openapi.json                                       -> the OpenAPI description

The model and index are loaded once, before the port opens. One worker thread does all the numeric work: requests
that arrive while it is busy are answered together by one search (one pass over the index for all their queries,
the way a batch is searched), and NumPy never runs in several threads at once. Every limit (body size, queries
per request, k, hits, text length) is a 4xx with a JSON error; nothing a client sends can make a 500 or stop the
server.
"""

# no "from __future__ import annotations": FastAPI reads these annotations at run time (local models)

import json
import queue
import socket
import threading
from pathlib import Path
from typing import Literal

from twotower_cli.errors import UsageError

MAX_BODY = 1 << 20  # bytes of a request body
MAX_TEXTS = 256  # queries (or texts) per request
MAX_K = 1000
MAX_CHARS = 10_000  # characters of one query or text
MAX_HITS = 10_000  # queries x k of one request: bounds a response (full documents) to a few MB


def check_installed() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("twotower serve needs FastAPI and uvicorn: pip install 'twotower-cli[serve]'") from None


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app parses it."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await json_response(send, 413, f"request body over {self.limit:,} bytes")
        received, started, over = 0, False, False

        async def limited():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body has no length to check up front
                    over = True
                    raise TooLarge
            return message

        async def watch(message):
            nonlocal started
            if over:  # the app answered a body it could not finish reading (FastAPI: a 400): say why instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await json_response(send, 413, f"request body over {self.limit:,} bytes")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except TooLarge:
            if not started:
                await json_response(send, 413, f"request body over {self.limit:,} bytes")


async def json_response(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Batcher:
    """One worker thread that runs the model's searches and embeddings; what queued up while it was busy is done
    as one call per kind of job (same k and mode, or same tower), so 16 waiting clients cost about one search.

    Why: each search is a pass over the whole index (memory-bound). Sixteen handler threads each doing their own
    pass, each NumPy call itself threaded, made a 2-core machine 7x slower than one search at a time."""

    MAX_QUERIES = 256  # per combined call: bounds the memory of one pass (queries x index chunk)

    def __init__(self, model):
        self.model = model
        self.jobs: queue.Queue = queue.Queue()
        self.calls = 0  # model calls made: fewer than jobs when requests were combined
        threading.Thread(target=self.work, name="twotower-batcher", daemon=True).start()

    def submit(self, key: tuple, texts: list[str]):
        """Queue a job; returns a concurrent Future of its answer (one item per text)."""
        from concurrent.futures import Future

        done: Future = Future()
        self.jobs.put((key, texts, done))
        return done

    def work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            n = len(batch[0][1])
            while n < self.MAX_QUERIES:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
                n += len(batch[-1][1])
            # a request whose client went away was cancelled: skip it; the rest can no longer be cancelled, so
            # answering them cannot fail (an answer to a cancelled future would raise and end this thread)
            batch = [job for job in batch if job[2].set_running_or_notify_cancel()]
            groups: dict[tuple, list] = {}
            for job in batch:
                groups.setdefault(job[0], []).append(job)
            for key, jobs in groups.items():
                self.answer(key, jobs)

    def answer(self, key: tuple, jobs: list) -> None:
        try:
            out = self.run(key, [t for _, texts, _ in jobs for t in texts])
        except Exception as exc:
            if len(jobs) > 1:  # one job's failure must not fail the others: answer each alone
                for job in jobs:
                    self.answer(key, [job])
                return
            jobs[0][2].set_exception(exc)
            return
        start = 0
        for _, texts, done in jobs:
            done.set_result(out[start:start + len(texts)])
            start += len(texts)

    def run(self, key: tuple, texts: list[str]):
        self.calls += 1
        if key[0] == "search":
            return self.model.search(texts, k=key[1], mode=key[2])
        return self.model.encode_queries(texts) if key[1] == "query" else self.model.encode_documents(texts)


def create_app(model):
    """The FastAPI application serving ``model`` (a loaded `TwoTowerModel`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from twotower_cli import __version__
    from twotower_cli.errors import ArtifactError, TwotowerError

    class SearchRequest(BaseModel):
        # strict: "k": true or "hybrid": "yes" are mistakes, not 1 and True; an unknown field ("top_k") is named
        model_config = ConfigDict(strict=True, extra="forbid")
        queries: list[str] = Field(min_length=1, max_length=MAX_TEXTS, description="The queries.")
        k: int = Field(10, ge=1, le=MAX_K, description="Results per query.")
        hybrid: bool | None = Field(None, description="null: the run's default search; true: BM25 + model; "
                                                      "false: the model alone.")
        mode: Literal["dense", "hybrid", "bm25"] | None = Field(None, description="Names the search directly.")

        @field_validator("queries")
        @classmethod
        def texts_ok(cls, v):
            return check_texts(v)

        @model_validator(mode="after")
        def consistent(self):
            if self.mode is not None and self.hybrid is not None:
                raise ValueError("give mode or hybrid, not both")
            if len(self.queries) * self.k > MAX_HITS:
                raise ValueError(f"{len(self.queries)} queries x k {self.k} asks for more than {MAX_HITS:,} hits; "
                                 "send fewer queries per request or a smaller k")
            return self

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")
        texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
        kind: Literal["query", "document"] = "query"

        @field_validator("texts")
        @classmethod
        def texts_ok(cls, v):
            return check_texts(v)

    class Hit(BaseModel):
        rank: int
        score: float
        id: str
        document: str

    class Result(BaseModel):
        query: str
        hits: list[Hit]

    class SearchResponse(BaseModel):  # what `twotower search --json` prints
        run: str
        index: str
        top_k: int
        mode: str
        hybrid_weight: float | None
        results: list[Result]

    class EmbedResponse(BaseModel):
        dim: int
        embeddings: list[list[float]]

    batcher = Batcher(model)
    app = FastAPI(title="twotower", version=__version__, redirect_slashes=False,
                  description=f"Search and embed with the two-tower model of run {model.run_dir.name}.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "missing" and not where:
            msg = 'the body is empty; send a JSON object, for example {"queries": ["text"], "k": 10}'
        elif first.get("type") == "extra_forbidden":
            msg = "unknown field; the fields are: " + ", ".join(
                (SearchRequest if request.url.path == "/search" else EmbedRequest).model_fields)
        elif first.get("type") in ("model_attributes_type", "json_invalid", "dict_type") or "JSON" in msg:
            msg = (f"the body must be a JSON object sent with Content-Type: application/json ({msg}); "
                   'for example {"queries": ["text"], "k": 10}')
            where = ""
        return JSONResponse({"error": f"{where + ': ' if where else ''}{msg}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(TwotowerError)
    async def ours(request: Request, exc: TwotowerError):  # a damaged index: the server's problem, said plainly
        return JSONResponse({"error": str(exc)}, status_code=400 if isinstance(exc, UsageError) else 503
                            if isinstance(exc, ArtifactError) else 500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: still JSON, and the server goes on
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on"}, status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health() -> dict:
        return {"status": "ok", "run": model.run_dir.name, "model_fingerprint": model.fingerprint,
                "index": model.index_name, "documents": model.index.count, "dim": model.dim,
                "search": model.plan.mode}

    async def answer(request: Request, key: tuple, texts: list[str]):
        """The batcher's answer; given up (and skipped by the batcher) if the client goes away while it waits:
        uvicorn does not cancel a handler whose client left, and abandoned work would delay everyone after it."""
        import asyncio

        job = batcher.submit(key, texts)
        waiting = asyncio.wrap_future(job)
        while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
            if await request.is_disconnected():
                job.cancel()
                raise HTTPException(499, "the client went away")
        return waiting.result()

    def json_bytes(obj) -> Response:  # built in a worker thread: a large answer must not stall the event loop
        return Response(json.dumps(obj, ensure_ascii=False).encode(), media_type="application/json")

    @app.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest, request: Request):
        mode, weight = model.resolve_mode(req.hybrid, req.mode)
        results = await answer(request, ("search", req.k, mode), req.queries)
        body = {"run": model.run_dir.name, "index": model.index_name, "top_k": req.k, "mode": mode,
                "hybrid_weight": weight if mode == "hybrid" else None,
                "results": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(req.queries, results)]}
        return await run_in_threadpool(json_bytes, body)

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(req: EmbedRequest, request: Request):
        e = await answer(request, ("embed", req.kind), req.texts)
        return await run_in_threadpool(lambda: json_bytes({"dim": int(e.shape[1]), "embeddings": e.tolist()}))

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.state.batcher = batcher
    return app


def check_texts(texts: list[str]) -> list[str]:
    from twotower_cli.api import blank

    for i, t in enumerate(texts):
        if blank(t):
            raise ValueError(f"text {i + 1} is empty (white space or invisible characters only)")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON can carry a lone surrogate ("\ud800"); Unicode text cannot
                raise ValueError(f"text {i + 1} holds a lone surrogate (U+{ord(t[exc.start]):04X} at character "
                                 f"{exc.start + 1}); send valid Unicode") from None
        if len(t) > MAX_CHARS:
            raise ValueError(f"text {i + 1} has {len(t):,} characters; at most {MAX_CHARS:,}")
    return texts


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening; a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit this (Linux): without it a keep-alive client waits for the delayed ACK of the
    # response's first segment, 40 ms on every request after the first
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.listen(128)
    return sock


def serve(run_dir: Path, index: str, host: str, port: int, notify=print, device: str = "cpu") -> None:
    """Load the run once, open the port, serve until interrupted."""
    import uvicorn

    from twotower_cli.api import TwoTowerModel

    model = TwoTowerModel(run_dir, index, device)
    model.search("warm up", k=1)  # load the index, the weights (and BM25) before the first request
    app = create_app(model)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    notify(f"serving run {model.run_dir.name} (index {model.index_name}, {model.index.count:,} documents) on "
           f"http://{host}:{bound}  (API docs: http://{host}:{bound}/docs; Ctrl-C stops)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=256,
                            timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])

"""The FastAPI application of `twotower serve`: the request and response models, the routes, and one JSON error
for every failure (a bad request is a 4xx naming the field; a damaged index a 503; a bug a 500 that names no
more than its type, after which the server goes on)."""

# no "from __future__ import annotations": FastAPI reads these annotations at run time

import asyncio
import json
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from twotower_cli import __version__
from twotower_cli.errors import ArtifactError, TwotowerError, UsageError
from twotower_cli.serve.batcher import Batcher
from twotower_cli.serve.http import BodyLimit

MAX_BODY = 1 << 20  # bytes of a request body
MAX_TEXTS = 256  # queries (or texts) per request
MAX_K = 1000
MAX_CHARS = 10_000  # characters of one query or text
MAX_HITS = 10_000  # queries x k of one request: bounds a response (full documents) to a few MB


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


def create_app(model) -> FastAPI:
    """The application serving ``model`` (a loaded `TwoTowerModel`)."""
    # the docs page is ReDoc from one script (Swagger UI's CDN files would leave it blank offline)
    app = FastAPI(title="twotower", version=__version__, redirect_slashes=False, docs_url=None, redoc_url=None,
                  description=f"Search and embed with the two-tower model of run {model.run_dir.name}.")
    app.state.batcher = batcher = Batcher(model)
    add_error_handlers(app)
    add_routes(app, model, batcher)
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(request, exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":  # starlette's, on bad UTF-8
            detail = ('the body cannot be read as JSON (not UTF-8, nested too deep, or a number too long); send '
                      'a JSON object encoded as UTF-8, for example {"queries": ["text"], "k": 10}')
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    @app.exception_handler(TwotowerError)
    async def ours(request: Request, exc: TwotowerError):  # a damaged index: the server's problem, said plainly
        status = 400 if isinstance(exc, UsageError) else 503 if isinstance(exc, ArtifactError) else 500
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: still JSON, and the server goes on
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on"}, status_code=500)


def validation_message(request: Request, exc: RequestValidationError) -> str:
    """The first problem of a request, in a line: the field and what is wrong with it."""
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
    return f"{where + ': ' if where else ''}{msg}"


def json_bytes(obj) -> Response:  # built in a worker thread: a large answer must not stall the event loop
    return Response(json.dumps(obj, ensure_ascii=False).encode(), media_type="application/json")


async def answer(batcher: Batcher, request: Request, key: tuple, texts: list[str]):
    """The batcher's answer; given up (and skipped by the batcher) if the client goes away while it waits:
    uvicorn does not cancel a handler whose client left, and abandoned work would delay everyone after it."""
    job = batcher.submit(key, texts)
    waiting = asyncio.wrap_future(job)
    while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
        if await request.is_disconnected():
            job.cancel()
            raise HTTPException(499, "the client went away")
    return waiting.result()


def add_routes(app: FastAPI, model, batcher: Batcher) -> None:
    @app.head("/health", include_in_schema=False)  # (one operation id per method: HEAD stays out of the schema)
    @app.get("/health")
    def health() -> dict:
        index = model.index  # (the build searches use: a rebuilt index is opened here too)
        return {"status": "ok", "run": model.run_dir.name, "model_fingerprint": model.fingerprint,
                "index": model.index_name, "index_built": index.meta.get("created"),
                "index_sha256": index.meta.get("sha256"), "documents": index.count, "dim": model.dim,
                "search": model.plan.mode}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(offline_docs(app))

    @app.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest, request: Request):
        mode, weight = model.resolve_mode(req.hybrid, req.mode)
        results = await answer(batcher, request, ("search", req.k, mode), req.queries)
        body = {"run": model.run_dir.name, "index": model.index_name, "top_k": req.k, "mode": mode,
                "hybrid_weight": weight if mode == "hybrid" else None,
                "results": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(req.queries, results)]}
        return await run_in_threadpool(json_bytes, body)

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(req: EmbedRequest, request: Request):
        e = await answer(batcher, request, ("embed", req.kind), req.texts)
        return await run_in_threadpool(lambda: json_bytes({"dim": int(e.shape[1]), "embeddings": e.tolist()}))


def offline_docs(app: FastAPI) -> str:
    """The API described on one page that needs nothing from the network: each route, its request and response
    fields, from the OpenAPI description that /openapi.json serves."""
    import html

    spec = app.openapi()
    schemas = spec.get("components", {}).get("schemas", {})
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            name = body.get("$ref", "").rsplit("/", 1)[-1]
            fields = schemas.get(name, {}).get("properties", {})
            described = "".join(f"<li><code>{html.escape(f)}</code> {html.escape(p.get('description', ''))}</li>"
                                for f, p in fields.items())
            rows.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                        f"<p>{html.escape(op.get('summary', ''))}</p>" + (f"<ul>{described}</ul>" if described else ""))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(spec['info']['title'])}</title>"
            "<style>body{font:15px/1.5 sans-serif;max-width:900px;margin:2em auto}</style></head><body>"
            f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"
            f"<p>{html.escape(spec['info'].get('description', ''))} The machine-readable description is "
            "<a href='/openapi.json'>/openapi.json</a>.</p>" + "".join(rows) + "</body></html>")

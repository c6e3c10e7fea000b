"""The fwserve HTTP API (FastAPI): the app, its engine and the pieces every route shares.

Thin by design: routes validate (schemas), authenticate (auth), decode instances into tensors
(decode, in a thread pool), hand plain jobs to the engine and turn its results and errors into
responses (errors). Routes live in v1.py and v2/ (the Open Inference Protocol, HTTP and gRPC).
No model code runs here and no session state is touched here.

Status codes: 400 malformed JSON; 401/403 auth; 404 unknown session/model/route; 409 session id
taken or session limit; 413 body over --max-body-bytes; 415 wrong content type; 422 invalid
content (schema, base64, image, array shape/values, labels, hyper-parameters, too many
instances); 429 quota or rate limit (Retry-After); 503 queue full, not ready, version conflict
or store unavailable (Retry-After); 504 timed out in the queue (not applied).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.api import bodies, v1, v2, versions
from server.api.context import Api
from server.api.errors import CODE_HEADER, STATUS_CODES, ApiError, error_body, from_domain
from server.api.middleware import Guard
from server.config import Settings
from server.engine import Engine
from server.engine.metrics import CONTENT_TYPE
from server.errors import DomainError


log = logging.getLogger("fwserve.api")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": desc} for status, desc in (
    (400, "malformed request"), (401, "missing or unknown API key"), (403, "not allowed"),
    (404, "unknown session, model or route"), (409, "session exists or session limit"),
    (413, "body too large"), (415, "wrong content type"), (422, "invalid content"),
    (429, "tenant quota or rate limit (Retry-After)"), (503, "overloaded, not ready, version conflict or store "
                                                       "unavailable (Retry-After)"),
    (504, "timed out in the queue; not applied"))}


def create_app(settings: Optional[Settings] = None, backbone=None) -> FastAPI:
    """An app with its own engine and metrics registry. `backbone` (a models.Backbone) skips
    loading, e.g. to share one backbone between apps in tests."""
    settings = settings or Settings()
    return _build(settings, Engine(settings, backbone))


def create_worker_app(settings: Settings, address: str, buckets=None) -> FastAPI:
    """The app of an API worker process: the engine is in another process (server/workers.py),
    reached at `address`; `buckets` (auth.SharedBuckets): the tenants' rate limits, shared."""
    from server.engine.remote import RemoteEngine

    return _build(settings, RemoteEngine(settings, address), buckets)


def _build(settings: Settings, engine, buckets=None) -> FastAPI:
    api = Api(settings, engine)
    api.auth.shared = buckets

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        grpc_server = None
        if settings.grpc_port is not None:
            from server.api.v2.grpc_service import start

            grpc_server, app.state.grpc_port = await start(api, settings.host, settings.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(5)
            engine.stop()
            api.close()

    app = FastAPI(title="fwserve", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Online-adaptation inference server: a frozen ViT backbone and "
                  "per-session fast-weight heads that learn from the requests themselves.")
    app.state.engine = engine
    app.state.api = api
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes,
                       request_duration=api.metrics.request_duration, auth=api.auth, hot=api.hot)
    _handlers(app)
    api.hot.render = render_error
    v1.add_routes(app, api)
    versions.add_routes(app, api)
    v2.add_routes(app, api)
    bodies.add_schemas(app)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics():
        return Response(await api.scrape(), media_type=CONTENT_TYPE)

    return app


def _error(request: Request, status: int, code: str, message: str, headers=None) -> JSONResponse:
    """An error response in the body shape of the request's route (errors.error_body)."""
    return JSONResponse(error_body(code, message, request.url.path), status_code=status,
                        headers={**(headers or {}), CODE_HEADER: code})


def render_error(request: Request, e: Exception) -> JSONResponse:
    """The error response for an exception a route raised: the app's exception handlers and the
    hot routes (server/api/hot.py) share it."""
    if isinstance(e, ApiError):
        return _error(request, e.status, e.code, e.message, e.headers)
    if isinstance(e, DomainError):
        err = from_domain(e)
        return _error(request, err.status, err.code, err.message, err.headers)
    if isinstance(e, RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return _error(request, 400, "invalid_json", "request body is not valid JSON")
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
        return _error(request, 422, "invalid_request", "; ".join(parts) + more)
    if isinstance(e, StarletteHTTPException):
        code = STATUS_CODES.get(e.status_code, "error")
        msg = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return _error(request, e.status_code, code, msg, getattr(e, "headers", None))
    # the details go to the log, never to the client (they may name internals or secrets)
    log.error("%s %s failed", request.method, request.url.path, exc_info=(type(e), e, e.__traceback__))
    return _error(request, 500, "internal", "internal server error; the request was not applied")


def _handlers(app: FastAPI) -> None:
    async def handle(request: Request, e: Exception):
        return render_error(request, e)

    for kind in (ApiError, DomainError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)

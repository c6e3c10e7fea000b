"""The fwserve HTTP API (FastAPI): the app, its engine and the pieces every route shares.

Thin by design: routes validate (schemas), authenticate (auth), decode instances into tensors
(decode, in a thread pool), hand plain jobs to the engine and turn its results and errors into
responses (errors). Routes live in v1.py and v2.py. No model code runs here and no session
state is touched here.

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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.api import v1, v2
from server.api.context import Api
from server.api.errors import STATUS_CODES, ApiError, error_body, from_domain
from server.api.middleware import Guard
from server.config import Settings
from server.engine import Engine
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
    engine = Engine(settings, backbone)
    api = Api(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()
        api.close()

    app = FastAPI(title="fwserve", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Online-adaptation inference server: a frozen ViT backbone and "
                  "per-session fast-weight heads that learn from the requests themselves.")
    app.state.engine = engine
    app.state.api = api
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes,
                       request_duration=engine.metrics.request_duration, auth=api.auth)
    _handlers(app)
    v1.add_routes(app, api)
    v2.add_routes(app, api)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, e: DomainError):
        err = from_domain(e)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return JSONResponse(error_body("invalid_json", "request body is not valid JSON"), status_code=400)
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
        return JSONResponse(error_body("invalid_request", "; ".join(parts) + more), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = STATUS_CODES.get(e.status_code, "error")
        msg = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(code, msg), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        # the details go to the log, never to the client (they may name internals or secrets)
        log.error("%s %s failed", request.method, request.url.path, exc_info=(type(e), e, e.__traceback__))
        return JSONResponse(error_body("internal", "internal server error; the request was not applied"),
                            status_code=500)

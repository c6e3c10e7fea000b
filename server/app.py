"""fwserve HTTP API (FastAPI). Thin: validation via schemas, work via ``Runtime``; no tensor code.

Routes (JSON bodies; OpenAPI at /docs; errors ``{"error": {"code", "message"}}``):

    POST   /v1/sessions                 {rule, classes?, hyperparameters?, id?, init?} -> 201 {id, version}
    GET    /v1/sessions/{id}            rule, hyper-parameters, classes, version, examples_seen,
                                        prequential {correct, total, accuracy}, tier, created/updated
    POST   /v1/sessions/{id}/reset      head, state, version and statistics back to the start
    DELETE /v1/sessions/{id}            204
    GET    /v1/sessions/{id}/export     application/octet-stream: safetensors (W, b, rule state)
                                        with the session's metadata under "fwserve"
    PUT    /v1/sessions/{id}/import     body = an export (application/octet-stream); 201 new, 200 replaced
    POST   /v1/predict                  {session_id? | support?, instances, top_k?} -> predictions, version
    POST   /v1/adapt                    {session_id, instances with label} -> version, applied,
                                        pre-update (prequential) predictions, update_seconds
    GET    /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST   /v2/models/{name}/infer      OIP v2; parameters.session_id, parameters.top_k
    GET    /v1/admin/tenants            admin key: tenants, their sessions and quotas
    GET    /metrics                     Prometheus text format

Auth (server/tenants.py): with API keys configured every /v1 route and v2 infer need
``Authorization: Bearer KEY`` (or ``X-API-Key``); sessions are per tenant (another tenant's
id is 404). 401 no/unknown key, 403 not allowed, 429 quota or rate limit (Retry-After).

Idempotency: ``Idempotency-Key: <1..255 chars>`` on POST /v1/sessions and POST /v1/adapt. A
retry with the same key (and the same body) answers the first response with
``Idempotent-Replayed: true`` and applies nothing again; the same key with another body is
422 ``idempotency_key_reused``. Keys are kept --idempotency-ttl-s (per session: the last
--idempotency-max-keys of them), with the session: in its snapshots and log records, so a
retry after a restart, or on another replica, is recognised too.

Status codes: 400 malformed JSON; 404 unknown session/model/route; 409 session id taken or
session limit; 413 body over --max-body-bytes; 415 wrong content type; 422 invalid content
(schema, base64, image, array shape/values, labels, hyper-parameters, too many instances);
503 queue full or not ready (with Retry-After); 504 timed out in the queue (not applied).

Consistency: every applied adapt is +1 version; an adapt acknowledged before a predict is sent
is visible to it; adapts of one session are applied in arrival order, none lost. A rejected
request (any 4xx) changes nothing; an adapt request is all-or-nothing.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from email.message import Message
from typing import Optional

import hashlib
import json

from fastapi import Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel
from starlette.routing import Match

from server import __version__
from server.config import Settings
from server.errors import STATUS_CODES, ApiError, error_body, forbidden, invalid, not_found
from server.metrics import CONTENT_TYPE
from server.runtime import Runtime
from server.tenants import Auth, Principal
from server.schemas import (
    SESSION_ID_PATTERN, AdaptRequest, AdaptResponse, InferRequest, InferResponse, ModelMetadata,
    PredictRequest, PredictResponse, ServerMetadata, SessionCreate, SessionCreated, SessionInfo,
)

SessionId = Path(..., pattern=SESSION_ID_PATTERN, max_length=128)
IdemKey = Header(None, alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
                 description="a retry with the same key returns the first response and applies nothing again")
REPLAYED = "Idempotent-Replayed"


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
    """An app with its own runtime and metrics registry. `backbone` (a models.Backbone) skips
    loading, e.g. to share one backbone between apps in tests."""
    settings = settings or Settings()
    auth = Auth(settings)
    rt = Runtime(settings, backbone)
    rt.auth = auth

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        yield
        rt.stop()

    app = FastAPI(title="fwserve", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Online-adaptation inference server: a frozen ViT backbone and "
                  "per-session fast-weight heads that learn from the requests themselves.")
    app.state.runtime = rt
    app.add_middleware(Guard, runtime=rt)
    _handlers(app)

    def ready() -> Runtime:
        rt.check_ready()
        return rt

    def who(request: Request) -> Principal:
        """The request's tenant (401/403), within its rate limit (429); then readiness (503)."""
        p = auth.authenticate(request.headers)
        rt.check_ready()
        return p

    # ---- sessions ---------------------------------------------------------------------------

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated, tags=["sessions"])
    async def create_session(body: SessionCreate, response: Response, p: Principal = Depends(who),
                             idempotency_key: Optional[str] = IdemKey):
        idem = None
        if idempotency_key is not None:
            fp = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
            idem = (idempotency_key, fp)
        sess, replayed = await rt.call(rt.store.create_session, body.rule, body.classes, body.hyperparameters,
                                       body.init, body.id, p.tenant, p.max_sessions, idem)
        if replayed:
            response.headers[REPLAYED] = "true"
            return {"id": sess.id, "version": 0}
        return {"id": sess.id, "version": sess.version}

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def get_session(session_id: str = SessionId, p: Principal = Depends(who)):
        return await rt.call(rt.store.info, p.key(session_id))

    @app.post("/v1/sessions/{session_id}/reset", response_model=SessionCreated, tags=["sessions"])
    async def reset_session(session_id: str = SessionId, p: Principal = Depends(who)):
        sess = await rt.call(rt.store.reset, p.key(session_id))
        return {"id": sess.id, "version": sess.version}

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
    async def delete_session(session_id: str = SessionId, p: Principal = Depends(who)):
        await rt.call(rt.store.delete, p.key(session_id))
        return Response(status_code=204)

    @app.get("/v1/sessions/{session_id}/export", tags=["sessions"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def export_session(session_id: str = SessionId, p: Principal = Depends(who)):
        data = await rt.call(rt.store.export, p.key(session_id))
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.safetensors"'})

    @app.put("/v1/sessions/{session_id}/import", response_model=SessionInfo, tags=["sessions"],
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}})
    async def import_session(request: Request, response: Response, session_id: str = SessionId,
                             p: Principal = Depends(who)):
        data = await request.body()
        sess, created = await rt.call(rt.store.import_, p.key(session_id), data, p.max_sessions)
        response.status_code = 201 if created else 200
        return await rt.call(rt.store.info, sess.key)

    @app.get("/v1/admin/tenants", tags=["admin"])
    async def admin_tenants(p: Principal = Depends(who)):
        """Admin key only: every configured tenant with its session count and quotas."""
        if not p.admin:
            raise forbidden("an admin key is needed")

        def counts():
            return {t: rt.store.tenant_count(t) for t in auth.tenants()}

        n = await rt.call(counts)
        return {"tenants": [{"tenant": t, "sessions": n[t], "max_sessions": auth.quota(t), "rps": auth.rps(t)}
                            for t in auth.tenants()]}

    # ---- predict / adapt --------------------------------------------------------------------

    @app.post("/v1/predict", response_model=PredictResponse, tags=["inference"])
    async def predict(body: PredictRequest, p: Principal = Depends(who)):
        rt.check_count(len(body.instances), "instances")
        rt.check_count(len(body.support or ()), "support examples")
        rt.check_top_k(body.top_k)
        job = await rt.decode(rt.predict_job, body)
        job.session_id = p.key(job.session_id)
        return await rt.run(job)

    @app.post("/v1/adapt", response_model=AdaptResponse, tags=["inference"])
    async def adapt(body: AdaptRequest, request: Request, response: Response, p: Principal = Depends(who),
                    idempotency_key: Optional[str] = IdemKey):
        rt.check_count(len(body.instances), "instances")
        job = await rt.decode(rt.adapt_job, body)
        job.session_id = p.key(job.session_id)
        if idempotency_key is not None:
            job.idem = (idempotency_key, hashlib.sha256(await request.body()).hexdigest())
        res = await rt.run(job)
        if res.pop("_replayed", False):
            response.headers[REPLAYED] = "true"
        return res

    # ---- Open Inference Protocol v2 ---------------------------------------------------------

    @app.get("/v2", response_model=ServerMetadata, tags=["v2"])
    async def v2_server():
        return {"name": "fwserve", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def v2_ready():
        if not rt.ready:
            msg = rt.load_error or "the backbone is still loading"
            return JSONResponse(error_body("not_ready", msg), status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})
        return {"ready": True}

    def model(name: str) -> Runtime:
        if name != rt.model_name:
            raise not_found("model_not_found", f"unknown model {name!r}; this server serves {rt.model_name!r}")
        return rt

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["v2"])
    async def v2_model(rt: Runtime = Depends(model)):
        rt.check_ready()
        cfg = rt.backbone.config
        s = cfg.img_size
        shape = [-1, s, s] if cfg.in_chans == 1 else [-1, s, s, cfg.in_chans]
        return {"name": rt.model_name, "versions": ["1"], "platform": "pytorch",
                "inputs": [{"name": "image", "datatype": "FP32", "shape": shape}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "label_index", "datatype": "INT64", "shape": [-1]},
                            {"name": "score", "datatype": "FP32", "shape": [-1]}]}

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    async def v2_model_ready(rt: Runtime = Depends(model)):
        rt.check_ready()
        return {"name": rt.model_name, "ready": True}

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
              tags=["v2"])
    async def v2_infer(body: InferRequest, rt: Runtime = Depends(model), p: Principal = Depends(who)):
        params = body.parameters or {}
        session_id, top_k = params.get("session_id"), params.get("top_k", 1)
        if session_id is not None and not isinstance(session_id, str):
            raise invalid("invalid_parameters", "parameters.session_id must be a string")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise invalid("invalid_parameters", "parameters.top_k must be a positive integer")
        rt.check_top_k(top_k)
        job = await rt.decode(rt.infer_job, body, session_id, top_k)
        job.session_id = p.key(job.session_id)
        res = await rt.run(job)
        preds = res["predictions"]
        B = len(preds)
        out_params = {"session_id": res["session_id"], "session_version": res["version"]}
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": [B], "data": [p["label"] for p in preds]},
            {"name": "label_index", "datatype": "INT64", "shape": [B], "data": [p["index"] for p in preds]},
            {"name": "score", "datatype": "FP32", "shape": [B], "data": [p["score"] for p in preds]},
        ]
        if top_k > 1:
            k = min(len(p["top_k"]) for p in preds)
            outputs.append({"name": "top_k_label", "datatype": "BYTES", "shape": [B, k],
                            "data": [t["label"] for p in preds for t in p["top_k"][:k]]})
            outputs.append({"name": "top_k_score", "datatype": "FP32", "shape": [B, k],
                            "data": [t["score"] for p in preds for t in p["top_k"][:k]]})
        return {"model_name": rt.model_name, "model_version": "1", "id": body.id,
                "parameters": out_params, "outputs": outputs}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics():
        return Response(rt.metrics.scrape(), media_type=CONTENT_TYPE)

    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

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
        return JSONResponse(error_body("internal", f"{type(e).__name__}: {e}"), status_code=500)


class Guard:
    """ASGI middleware: body-size limit, content type, request-duration metric."""

    def __init__(self, app, runtime: Runtime) -> None:
        self.app, self.rt = app, runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            body, err = await self._read(scope, receive)
            if err is not None:
                scope["route"] = _match(scope)
                resp = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
                return await resp(scope, receive, send_)
            replayed = [False]

            async def receive_():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_, send_)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.rt.metrics.request_duration.labels(route=path, method=scope["method"], status=str(status[0])).observe(
                time.perf_counter() - start)

    async def _read(self, scope, receive) -> tuple[bytes, Optional[ApiError]]:
        limit = self.rt.settings.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_big = ApiError(413, "payload_too_large", f"request body is over {limit} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and scope["method"] in ("POST", "PUT", "PATCH"):
            err = _content_type_error(scope["path"], headers.get("content-type"))
            if err is not None:
                return body, err
        return body, None


def _match(scope):
    """The route a rejected request was meant for (for the metric's route label)."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] == Match.FULL:
            return route
    return None


def _content_type_error(path: str, content_type: Optional[str]) -> Optional[ApiError]:
    m = Message()
    m["content-type"] = content_type or ""
    ctype = m.get_content_type() if content_type else ""
    if path.endswith("/import"):
        if ctype != "application/octet-stream":
            return ApiError(415, "unsupported_media_type",
                            f"content type must be application/octet-stream (a session export), got {content_type!r}")
        return None
    if ctype != "application/json" and not ctype.endswith("+json"):
        return ApiError(415, "unsupported_media_type", f"content type must be application/json, got {content_type!r}")
    return None

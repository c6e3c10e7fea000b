"""Open Inference Protocol v2 (KServe v2) over HTTP.

    GET  /v2                                    server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]       model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config    model configuration (model_config.proto fields)
    POST /v2/models/{name}[/versions/{v}]/infer     JSON or binary tensors (server/api/v2/tensors.py);
                                                    parameters and adapt: server/api/v2/infer.py

Errors on /v2 are the protocol's ``{"error": "<message>"}`` (server/api/errors.py); the status
codes are the /v1 ones. Not implemented (404): model repository, statistics, trace, logging,
shared memory, and the generate extension; the classification extension is refused (422).
"""

from __future__ import annotations

from typing import Optional

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api import access
from server.api.auth import Principal
from server.api.context import Api
from server.api.errors import CODE_HEADER, error_body, retry_after_header
from server.api.hot import IDEMPOTENCY_CHECK, IDEMPOTENCY_KEY, IDEMPOTENCY_LIMITS, header_param
from server.api.schemas import InferRequest, InferResponse, ModelMetadata, ServerMetadata, V2Error
from server.api.v2 import infer as oip
from server.api.v2 import model as m
from server.api.v2.tensors import HEADER_LENGTH, encode_response, inputs_of, split_body

ERRORS = {status: {"model": V2Error, "description": desc} for status, desc in (
    (400, "malformed request"), (401, "missing or unknown API key"), (403, "not allowed"),
    (404, "unknown model, version or session"), (413, "body too large"), (415, "wrong content type"),
    (422, "invalid content"), (429, "tenant quota or rate limit (Retry-After)"),
    (503, "overloaded or not ready (Retry-After)"), (504, "timed out in the queue; not applied"))}
IdemKey = Header(None, alias=IDEMPOTENCY_KEY, **IDEMPOTENCY_LIMITS,
                 description="with a label input (an adapt): a retry with the same key applies nothing again")
_REQUEST_SCHEMA = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_REQUEST_SCHEMA.pop("$defs", None)  # InferTensor is a component already (InferResponse)
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _REQUEST_SCHEMA},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "JSON, or the binary tensor extension (Inference-Header-Content-Length)"}}


def add_routes(app: FastAPI, api: Api) -> None:
    engine, settings = api.engine, api.settings

    def model(name: str) -> str:
        return m.check_model(settings.backbone, name)

    def versioned(name: str, version: str) -> str:
        return m.check_model(settings.backbone, name, version)

    kw = {"tags": ["v2"], "responses": ERRORS}

    @app.get("/v2", response_model=ServerMetadata, **kw)
    async def v2_server():
        return m.server_metadata()

    @app.get("/v2/health/live", **kw)
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", **kw)
    async def v2_ready(request: Request):
        if not engine.ready:
            msg = engine.load_error or "the backbone is still loading"
            return JSONResponse(error_body("not_ready", msg, request.url.path), status_code=503,
                                headers={**retry_after_header(settings.retry_after_s), CODE_HEADER: "not_ready"})
        return {"ready": True}

    for prefix, dep, suffix in (("/v2/models/{name}", model, ""),
                                ("/v2/models/{name}/versions/{version}", versioned, "_versioned")):
        _model_routes(app, api, prefix, dep, suffix, kw)


def _model_routes(app: FastAPI, api: Api, prefix: str, dep, suffix: str, kw: dict) -> None:
    engine, settings = api.engine, api.settings

    async def v2_model(name: str = Depends(dep)):
        engine.check_ready()
        return m.metadata(engine.model)

    async def v2_model_ready(name: str = Depends(dep)):
        engine.check_ready()
        return {"name": name, "ready": True}

    async def v2_config(name: str = Depends(dep)):
        engine.check_ready()
        return m.config(engine.model, settings.max_instances, settings.max_top_k)

    async def infer(request: Request, name: str, p: Principal, idempotency_key: Optional[str]):
        body = await request.body()
        head, tail = split_body(body, request.headers.get(HEADER_LENGTH))
        try:
            req = InferRequest.model_validate(head)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        opts = oip.options(req.parameters)
        requested = oip.requested_outputs(req.outputs)
        tensors = inputs_of(req, tail)
        outcome = await oip.infer(api, p, tensors, opts, requested, idempotency_key, access.record(request),
                                  api.deadline(request))
        by_name = {r.name: r.binary for r in requested or ()}
        binary = [opts.binary_output if by_name.get(o.name) is None else by_name[o.name] for o in outcome.outputs]
        header = {"model_name": name, "model_version": m.VERSION}
        if req.id is not None:
            header["id"] = req.id
        if outcome.parameters:
            header["parameters"] = outcome.parameters
        content, header_length = encode_response(header, outcome.outputs, binary)
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        return Response(content, media_type="application/octet-stream",
                        headers={**headers, HEADER_LENGTH: str(header_length)})

    versioned = " (a version)" if suffix else ""
    app.add_api_route(prefix, v2_model, methods=["GET"], response_model=ModelMetadata,
                      summary="Model metadata" + versioned, operation_id="v2_model" + suffix, **kw)
    app.add_api_route(prefix + "/ready", v2_model_ready, methods=["GET"], summary="Model ready" + versioned,
                      operation_id="v2_model_ready" + suffix, **kw)
    app.add_api_route(prefix + "/config", v2_config, methods=["GET"], summary="Model configuration" + versioned,
                      operation_id="v2_model_config" + suffix, **kw)
    async def v2_infer(request: Request, name: str = Depends(dep), p: Principal = Depends(api.who),
                       idempotency_key: Optional[str] = IdemKey):
        return await infer(request, name, p, idempotency_key)

    async def v2_infer_hot(request: Request):  # the dependencies above, in their order (server/api/hot.py)
        name = dep(**request.path_params)
        p = await api.who(request)
        return await infer(request, name, p, header_param(request, IDEMPOTENCY_KEY, IDEMPOTENCY_CHECK))

    api.hot.add("POST", prefix + "/infer", v2_infer_hot)
    app.add_api_route(prefix + "/infer", v2_infer, methods=["POST"], summary="Infer" + versioned,
                      operation_id="v2_infer" + suffix, response_model=InferResponse, openapi_extra=INFER_BODY,
                      tags=["v2"], responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}})

"""The request path's two ends for the hot routes, without the framework's per-request work:
bodies parsed by pydantic straight from the raw bytes (its own JSON parser, no Python dict of
the pixels in between), and responses written with orjson from the engine's result dataclasses
(no second validation of what the engine already built). The OpenAPI document still shows both
schemas: ``request_body`` declares the body, ``add_schemas`` puts the models in its components.
"""

from __future__ import annotations

from typing import Optional

import orjson
from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.engine.messages import AdaptResult, Prediction, PredictResult

BODY_MODELS: list[type[BaseModel]] = []


def parse(model: type[BaseModel], raw: bytes):
    """A request body of `model`, or the same 400/422 a declared FastAPI body would give."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def request_body(model: type[BaseModel], binary: bool = False) -> dict:
    """openapi_extra for a route that reads its body itself."""
    if model not in BODY_MODELS:
        BODY_MODELS.append(model)
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "raw tensor bytes described by X-Shape (and X-Datatype, X-Session-ID, X-Top-K, X-Labels)"}
    return {"requestBody": {"required": True, "content": content}}


def add_schemas(app: FastAPI) -> None:
    """The models of `request_body` routes in the OpenAPI components (FastAPI only adds declared ones)."""
    build = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in BODY_MODELS:
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in s.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = s
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def json_response(content, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def _prediction(p: Prediction, prequential: bool) -> dict:
    out = {"label": p.label, "index": p.index, "score": p.score,
           "top_k": [{"label": t.label, "index": t.index, "score": t.score} for t in p.top_k]}
    if prequential:
        out["true_label"], out["correct"] = p.true_label, p.correct
    return out


def predict_response(r: PredictResult) -> dict:
    return {"head": r.head, "session_id": r.session_id, "version": r.version,
            "predictions": [_prediction(p, False) for p in r.predictions], "applied": r.applied}


def adapt_response(r: AdaptResult) -> dict:
    return {"session_id": r.session_id, "version": r.version, "applied": r.applied,
            "predictions": [_prediction(p, True) for p in r.predictions], "update_seconds": r.update_seconds,
            "latency_seconds": r.latency_seconds, "guard": r.guard}

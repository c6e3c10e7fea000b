"""Open Inference Protocol v2 (KServe v2) routes.

    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer      one input tensor; parameters.session_id, parameters.top_k
    GET  /metrics                     Prometheus text format
"""

from __future__ import annotations

import math
import re

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from server import __version__
from server.api.context import Api
from server.api.auth import Principal
from server.api.decode import check_array
from server.api.errors import error_body, model_not_found, retry_after_header
from server.api.schemas import InferRequest, InferResponse, ModelMetadata, ServerMetadata
from server.engine import Input, PredictJob
from server.engine.metrics import CONTENT_TYPE
from server.errors import invalid
from server.keys import SESSION_ID_PATTERN

SESSION_ID = re.compile(SESSION_ID_PATTERN)

NUMERIC = ("UINT8", "UINT16", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")


def add_routes(app: FastAPI, api: Api) -> None:
    engine, settings = api.engine, api.settings

    @app.get("/v2", response_model=ServerMetadata, tags=["v2"])
    async def v2_server():
        return {"name": "fwserve", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def v2_ready():
        if not engine.ready:
            msg = engine.load_error or "the backbone is still loading"
            return JSONResponse(error_body("not_ready", msg), status_code=503,
                                headers=retry_after_header(settings.retry_after_s))
        return {"ready": True}

    def model(name: str) -> str:
        if name != settings.backbone:
            raise model_not_found(name, settings.backbone)
        return name

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["v2"])
    async def v2_model(name: str = Depends(model)):
        engine.check_ready()
        m = engine.model
        s = m.img_size
        shape = [-1, s, s] if m.in_chans == 1 else [-1, s, s, m.in_chans]
        return {"name": name, "versions": ["1"], "platform": "pytorch",
                "inputs": [{"name": "image", "datatype": "FP32", "shape": shape}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "label_index", "datatype": "INT64", "shape": [-1]},
                            {"name": "score", "datatype": "FP32", "shape": [-1]}]}

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    async def v2_model_ready(name: str = Depends(model)):
        engine.check_ready()
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
              tags=["v2"])
    async def v2_infer(body: InferRequest, request: Request, name: str = Depends(model),
                       p: Principal = Depends(api.who)):
        params = body.parameters or {}
        session_id, top_k = params.get("session_id"), params.get("top_k", 1)
        if session_id is not None and not (isinstance(session_id, str) and SESSION_ID.match(session_id)):
            raise invalid("invalid_parameters", f"parameters.session_id must match {SESSION_ID_PATTERN}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise invalid("invalid_parameters", "parameters.top_k must be a positive integer")
        api.check_top_k(top_k)
        if len(body.inputs) != 1:
            raise invalid("invalid_inputs", "exactly one input tensor is expected")
        deadline = api.deadline(request)
        inputs = await api.decode(decode_tensor, api, body.inputs[0], deadline=deadline)
        res = await engine.predict(PredictJob(inputs, session=p.key(session_id), top_k=top_k, tenant=p.tenant,
                                              deadline=deadline))
        preds = res.predictions
        B = len(preds)
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": [B], "data": [q.label for q in preds]},
            {"name": "label_index", "datatype": "INT64", "shape": [B], "data": [q.index for q in preds]},
            {"name": "score", "datatype": "FP32", "shape": [B], "data": [q.score for q in preds]},
        ]
        if top_k > 1:
            k = min(len(q.top_k) for q in preds)
            outputs.append({"name": "top_k_label", "datatype": "BYTES", "shape": [B, k],
                            "data": [t.label for q in preds for t in q.top_k[:k]]})
            outputs.append({"name": "top_k_score", "datatype": "FP32", "shape": [B, k],
                            "data": [t.score for q in preds for t in q.top_k[:k]]})
        return {"model_name": name, "model_version": "1", "id": body.id,
                "parameters": {"session_id": res.session_id, "session_version": res.version}, "outputs": outputs}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics():
        return Response(engine.metrics.scrape(), media_type=CONTENT_TYPE)


def decode_tensor(api: Api, t) -> list[Input]:
    """One OIP input tensor ([B, H, W] / [B, H, W, C] numbers, or [B] base64 BYTES) -> inputs."""
    cfg, max_instances = api.decoder.cfg, api.settings.max_instances
    if not t.shape or len(t.shape) > 4 or any(not isinstance(n, int) or not 0 <= n < 2**31 for n in t.shape):
        raise invalid("invalid_inputs", "input shape must be 1 to 4 non-negative integers below 2**31")
    B = t.shape[0]
    if not 1 <= B <= max_instances:
        raise invalid("too_many_instances", f"batch of {B}; 1..{max_instances} per request")
    if t.datatype == "BYTES":
        data = t.data
        if t.shape != [B] or not isinstance(data, list) or len(data) != B or not all(isinstance(d, str) for d in data):
            raise invalid("invalid_inputs", "BYTES input must have shape [B] and B base64 strings")
        budget = api.decoder.budget()
        return [api.decoder.image_b64(d, f"inputs[0][{i}]", budget) for i, d in enumerate(data)]
    if t.datatype not in NUMERIC:
        raise invalid("invalid_inputs", f"unsupported datatype {t.datatype!r}")
    need = math.prod(t.shape)  # exact (Python ints): a huge shape must not wrap around
    per_image = cfg.img_size * cfg.img_size * 4
    if need > max_instances * per_image:
        raise invalid("invalid_inputs", f"shape {t.shape} holds {need} values; at most {max_instances * per_image}")
    try:
        flat = np.asarray(t.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise invalid("invalid_inputs", "input data must be a (nested) list of numbers") from None
    if flat.size != need:
        raise invalid("invalid_inputs", f"input data has {flat.size} values, shape {t.shape} needs {need}")
    arr = flat.reshape(t.shape)
    return [api.decoder.array(check_array(arr[i], cfg, f"inputs[0][{i}]")) for i in range(B)]


__all__ = ["add_routes", "decode_tensor"]

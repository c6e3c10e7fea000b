"""The plain baseline server the serving benchmarks compare fwserve against (written once, fixed
before any measurement; do not tune it to a benchmark):

    python -m loadtests.baseline_server [--backbone NAME] [--random-init] [--weights PATH]
                                        [--device cpu|cuda] [--port 8001] [--torch-threads N]

What a team would write without fwserve: FastAPI + uvicorn; one request at a time (a lock
around everything that touches the model); per session an `nn.Linear` trained with autograd
and `torch.optim.SGD`; the same backbone (`models.load_backbone`, bf16 autocast on CUDA like
fwserve's `Backbone.features`) and the same preprocessing (`models.preprocess`). No batching
across requests, no feature cache, no kernels.

Routes, with fwserve's /v1 request and response shapes where they overlap (rule "sgd" only):
    POST   /v1/sessions      {rule: "sgd", classes, hyperparameters: {lr, weight_decay}, id?} -> 201 {id, version}
    DELETE /v1/sessions/{id} 204
    POST   /v1/predict       {session_id?, instances: [{image | array}], top_k?}
                             -> {head, session_id, version, predictions: [{label, index, score, top_k}]}
    POST   /v1/adapt         {session_id, instances: [{image | array, label}]}
                             -> {session_id, version, applied, predictions (before the update, with
                                 true_label and correct), update_seconds, latency_seconds}
    GET    /v2/health/ready, /healthz
Instances: `image` (base64 PNG or JPEG, any size, resized) or `array` (pixel values 0..255,
[H, W] or [H, W, C]). Binary input: the same two POST routes with Content-Type
application/octet-stream and a body of N images of raw uint8 pixels in C order, described by
headers: X-Shape "N,H,W" or "N,H,W,C" (required), X-Session-ID, X-Top-K, and for /v1/adapt
X-Labels (the N labels, comma-separated). This is the layout proposed for fwserve's own /v1
binary path (engine issue): keep the two in step.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import threading
import time
import uuid
from typing import Any, Optional

import anyio
import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from models import load_backbone, preprocess

DEFAULT_LR = 0.1  # fwserve's sgd default


class Instance(BaseModel):
    image: Optional[str] = None
    array: Optional[list[Any]] = None
    label: Optional[str] = None


class SessionBody(BaseModel):
    rule: str = "sgd"
    classes: list[str] = Field(..., min_length=2)
    hyperparameters: dict[str, float] = Field(default_factory=dict)
    id: Optional[str] = None


class PredictBody(BaseModel):
    session_id: Optional[str] = None
    instances: list[Instance] = Field(..., min_length=1)
    top_k: int = Field(1, ge=1)


class AdaptBody(BaseModel):
    session_id: str
    instances: list[Instance] = Field(..., min_length=1)


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Session:
    """One client's head: a Linear layer and its optimizer, as a user would write it."""

    def __init__(self, classes: list[str], d: int, lr: float, weight_decay: float, device) -> None:
        self.classes = classes
        self.linear = torch.nn.Linear(d, len(classes), device=device)
        with torch.no_grad():  # fwserve's default init: zeros
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        self.optimizer = torch.optim.SGD([{"params": [self.linear.weight], "weight_decay": weight_decay},
                                          {"params": [self.linear.bias], "weight_decay": 0.0}], lr=lr)
        self.version = 0


class Baseline:
    def __init__(self, backbone) -> None:
        self.backbone = backbone
        self.cfg = backbone.config
        self.device = backbone.device
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()  # one request at a time through the model

    # ---- inputs ---------------------------------------------------------------------------

    def pixels(self, inst: Instance) -> torch.Tensor:
        if (inst.image is None) == (inst.array is None):
            raise BadRequest(422, "invalid_instance", "an instance needs exactly one of 'image' or 'array'")
        if inst.image is not None:
            text = inst.image.split(",", 1)[1] if inst.image.startswith("data:") else inst.image
            try:
                image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=("PNG", "JPEG"))
                image.load()
            except (binascii.Error, ValueError, OSError):
                raise BadRequest(422, "invalid_image", "image could not be decoded as base64 PNG or JPEG") from None
            return preprocess(image, self.cfg)
        try:
            return preprocess(np.asarray(inst.array, dtype=np.float32), self.cfg)
        except (ValueError, TypeError) as e:
            raise BadRequest(422, "invalid_array", str(e)) from None

    def binary(self, body: bytes, headers) -> tuple[list[torch.Tensor], dict]:
        try:
            shape = [int(v) for v in headers["x-shape"].split(",")]
        except (KeyError, ValueError):
            raise BadRequest(422, "invalid_shape", "binary input needs an X-Shape header N,H,W[,C]") from None
        if len(shape) not in (3, 4) or min(shape) < 1 or int(np.prod(shape)) != len(body):
            raise BadRequest(422, "invalid_shape", f"X-Shape {shape} does not match a body of {len(body)} bytes")
        images = np.frombuffer(body, dtype=np.uint8).reshape(shape)
        try:
            pixels = [preprocess(im, self.cfg) for im in images]
        except ValueError as e:
            raise BadRequest(422, "invalid_array", str(e)) from None
        fields = {"session_id": headers.get("x-session-id"), "top_k": int(headers.get("x-top-k", 1))}
        if "x-labels" in headers:
            fields["labels"] = headers["x-labels"].split(",")
        return pixels, fields

    # ---- work ---------------------------------------------------------------------------------

    def session(self, sid: Optional[str]) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise BadRequest(404, "session_not_found", f"session {sid!r} not found")
        return s

    def create(self, body: SessionBody) -> dict:
        if body.rule != "sgd":
            raise BadRequest(422, "unknown_rule", "the baseline serves rule 'sgd' only")
        sid = body.id or uuid.uuid4().hex
        with self.lock:
            if sid in self.sessions:
                raise BadRequest(409, "session_exists", f"session {sid!r} exists")
            h = body.hyperparameters
            self.sessions[sid] = Session(list(body.classes), self.backbone.embed_dim, float(h.get("lr", DEFAULT_LR)),
                                         float(h.get("weight_decay", 0.0)), self.device)
        return {"id": sid, "version": 0}

    def predict(self, pixels: list[torch.Tensor], sid: Optional[str], top_k: int) -> dict:
        with self.lock:
            feats = self.backbone.features(torch.stack(pixels))
            if sid is None:
                with torch.no_grad():
                    probs = torch.softmax(self.backbone.base_logits(feats), dim=1)
                return {"head": "base", "session_id": None, "version": None,
                        "predictions": predictions(probs, self.backbone.class_names, top_k)}
            s = self.session(sid)
            with torch.no_grad():
                probs = torch.softmax(s.linear(feats), dim=1)
            return {"head": "session", "session_id": sid, "version": s.version,
                    "predictions": predictions(probs, s.classes, top_k)}

    def adapt(self, pixels: list[torch.Tensor], sid: str, labels: list[Optional[str]]) -> dict:
        started = time.perf_counter()
        with self.lock:
            s = self.session(sid)
            if len(labels) != len(pixels) or any(lab not in s.classes for lab in labels):
                raise BadRequest(422, "unknown_label", f"every instance needs a label among {s.classes}")
            y = torch.tensor([s.classes.index(lab) for lab in labels], device=self.device)
            # features come out of inference mode: a plain copy so autograd may use them
            feats = self.backbone.features(torch.stack(pixels)).float().clone()
            with torch.no_grad():
                before = predictions(torch.softmax(s.linear(feats), dim=1), s.classes, 1)
            t0 = time.perf_counter()
            s.optimizer.zero_grad()
            F.cross_entropy(s.linear(feats), y).backward()
            s.optimizer.step()
            if feats.is_cuda:
                torch.cuda.synchronize(feats.device)
            update = time.perf_counter() - t0
            s.version += 1
            for p, lab in zip(before, labels):
                p["true_label"], p["correct"] = lab, p["label"] == lab
            return {"session_id": sid, "version": s.version, "applied": len(pixels), "predictions": before,
                    "update_seconds": update, "latency_seconds": time.perf_counter() - started}


def predictions(probs: torch.Tensor, classes: list[str], top_k: int) -> list[dict]:
    k = min(top_k, len(classes))
    vals, idx = torch.sort(probs.float().cpu(), dim=1, descending=True, stable=True)
    out = []
    for v_row, i_row in zip(vals[:, :k].tolist(), idx[:, :k].tolist()):
        top = [{"label": classes[i], "index": i, "score": v} for v, i in zip(v_row, i_row)]
        out.append({**top[0], "top_k": top})
    return out


def create_app(backbone) -> FastAPI:
    app = FastAPI(title="fwserve baseline (plain FastAPI + autograd)")
    server = Baseline(backbone)
    app.state.baseline = server

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status)

    def inputs(raw: bytes, headers, model) -> tuple[list[torch.Tensor], dict]:
        """Request bytes -> preprocessed pixels and the request's fields (JSON or binary)."""
        if headers.get("content-type", "").startswith("application/octet-stream"):
            return server.binary(raw, headers)
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            raise BadRequest(422, "invalid_request", str(e.errors()[:3])) from None
        fields = {"session_id": body.session_id, "top_k": getattr(body, "top_k", 1),
                  "labels": [i.label for i in body.instances]}
        return [server.pixels(i) for i in body.instances], fields

    def predict_request(raw: bytes, headers) -> dict:
        pixels, f = inputs(raw, headers, PredictBody)
        return server.predict(pixels, f["session_id"], f["top_k"])

    def adapt_request(raw: bytes, headers) -> dict:
        pixels, f = inputs(raw, headers, AdaptBody)
        if not f["session_id"]:
            raise BadRequest(422, "invalid_request", "session_id is required")
        return server.adapt(pixels, f["session_id"], f.get("labels", []))

    @app.post("/v1/sessions", status_code=201)
    def create_session(body: SessionBody):
        return server.create(body)

    @app.delete("/v1/sessions/{sid}", status_code=204)
    def delete_session(sid: str):
        with server.lock:
            server.sessions.pop(sid, None)

    # Decoding runs in the thread pool, several requests at once; the model part takes the lock.
    @app.post("/v1/predict")
    async def predict(request: Request):
        return await anyio.to_thread.run_sync(predict_request, await request.body(), request.headers)

    @app.post("/v1/adapt")
    async def adapt(request: Request):
        return await anyio.to_thread.run_sync(adapt_request, await request.body(), request.headers)

    @app.get("/v2/health/ready")
    @app.get("/healthz")
    def ready():
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="fwserve-mnist-vit")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    backbone = load_backbone(args.backbone, weights=args.weights, device=args.device, random_init=args.random_init)
    import uvicorn

    uvicorn.run(create_app(backbone), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

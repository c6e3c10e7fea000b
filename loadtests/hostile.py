"""Requests a hostile or broken client sends, for the chaos runs (loadtests/chaos.py): each must be
answered with a 4xx and change nothing, and none may disturb the other clients' requests.

``attack(url, stop, seen, k)`` sends them in a loop until `stop` is set, counting the answers in
`seen` by status ("422", ...; a dropped connection as its exception's name).
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import httpx
import numpy as np
from PIL import Image

from server.sessions import codec


def _png(width: int, height: int) -> bytes:
    """A valid PNG of the given size, one bit per pixel, all zero: a few hundred bytes however big."""
    raw = b"".join(b"\x00" + b"\x00" * ((width + 7) // 8) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _small_png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _forged_export(version: int, created_at: float) -> bytes:
    import torch

    meta = {"format": codec.EXPORT_FORMAT, "backbone": "fwserve-mnist-vit", "embed_dim": 128, "rule": "sgd",
            "hyperparameters": {}, "classes": ["a"], "init": "zeros", "version": version, "created_at": created_at}
    return codec.encode({"W": torch.zeros(1, 128), "b": torch.zeros(1)}, meta)


def requests(k: int) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments) of every hostile request."""
    arr = np.zeros((28, 28)).tolist()
    mine = f"hostile-{k}"
    bomb = base64.b64encode(_png(20000, 20000)).decode()
    big_ok = base64.b64encode(_png(4000, 4000)).decode()
    return [
        ("POST", "/v1/predict", {"json": {"session_id": "b" * 300 + "/x", "instances": [{"array": arr}]}}),
        ("POST", "/v1/adapt", {"json": {"session_id": "../../etc/passwd", "instances": [{"array": arr, "label": 0}]}}),
        ("POST", "/v2/models/fwserve-mnist-vit/infer",
         {"json": {"inputs": [{"name": "image", "shape": [1, 2**32, 2**32], "datatype": "FP32", "data": []}]}}),
        ("POST", "/v2/models/fwserve-mnist-vit/infer",
         {"json": {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": arr}],
                   "parameters": {"session_id": "../" + "x" * 200}}}),
        ("POST", "/v1/predict", {"content": '{"instances": [{"array": [' + ",".join(["NaN"] * 28) + "]}]}",
                                 "headers": {"content-type": "application/json"}}),
        ("PUT", f"/v1/sessions/{mine}-forged/import", {"content": _forged_export(10**19, 1.0),
                                                       "headers": {"content-type": "application/octet-stream"}}),
        ("PUT", f"/v1/sessions/{mine}-forged/import", {"content": _forged_export(1, 1e300),
                                                       "headers": {"content-type": "application/octet-stream"}}),
        ("PUT", f"/v1/sessions/{mine}-forged/import", {"content": b"\x00" * 64,
                                                       "headers": {"content-type": "application/octet-stream"}}),
        ("POST", "/v1/predict", {"json": {"instances": [{"image": bomb}]}}),
        ("POST", "/v1/predict", {"json": {"instances": [{"image": big_ok}] * 4}}),
        ("POST", "/v1/predict", {"json": {"instances": [{"image": "not base64!"}]}}),
        ("POST", "/v1/predict", {"content": "{}", "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/predict", {"json": {"instances": [{"image": _small_png()}], "top_k": 10**9}}),
        ("POST", "/v1/sessions", {"json": {"rule": "sgd", "classes": [str(i) for i in range(10000)]}}),
        ("POST", "/v1/sessions", {"json": {"rule": "sgd", "classes": ["a", "b"], "hyperparameters": {"lr": 100,
                                                                                                  "weight_decay": 10}}}),
        ("POST", "/v1/adapt", {"json": {"session_id": mine, "instances": [{"array": arr, "label": "zebra"}]}}),
        # the hostile client's own key, sent again with another body and on another session
        ("POST", "/v1/adapt", {"json": {"session_id": mine, "instances": [{"array": arr, "label": "b"}]},
                               "headers": {"Idempotency-Key": f"{mine}-key"}}),
        ("POST", "/v1/adapt", {"json": {"session_id": f"{mine}-2", "instances": [{"array": arr, "label": "a"}]},
                               "headers": {"Idempotency-Key": f"{mine}-key"}}),
    ]


def attack(url: str, stop: threading.Event, seen: dict, k: int = 0,
           started: threading.Event | None = None) -> None:
    """Whole rounds of every request until `stop` is set (at least one round); `started` is set
    when the first round begins."""
    mine = f"hostile-{k}"
    with httpx.Client(base_url=url, timeout=60) as c:
        for sid in (mine, f"{mine}-2"):
            c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": sid})
        # the key becomes this client's with one request; every later use with another body is refused
        c.post("/v1/adapt", json={"session_id": mine, "instances": [{"array": np.zeros((28, 28)).tolist(),
                                                                      "label": "a"}]},
               headers={"Idempotency-Key": f"{mine}-key"})
        reqs = requests(k)
        if started is not None:
            started.set()
        while True:
            for method, path, kw in reqs:
                try:
                    r = c.request(method, path, **kw)
                    what = str(r.status_code)
                except httpx.HTTPError as e:
                    what = type(e).__name__
                seen[what] = seen.get(what, 0) + 1
            if stop.is_set():
                return


__all__ = ["attack", "requests"]

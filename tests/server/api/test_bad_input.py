"""Bad input gets a 4xx with the error envelope and changes nothing; backpressure and timeouts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from server.client import AsyncClient
from tests.server.conftest import arr, digits, live_server

X = digits(2, seed=30)
GOOD = arr(X[0])


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(X[0].astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _export(**meta) -> bytes:
    """A session export as another client might forge it (d = the bundled backbone's 128)."""
    import torch

    from server.sessions import codec

    base = {"format": codec.EXPORT_FORMAT, "backbone": "fwserve-mnist-vit", "embed_dim": 128, "rule": "sgd",
            "hyperparameters": {}, "classes": ["a"], "init": "zeros"}
    return codec.encode({"W": torch.zeros(1, 128), "b": torch.zeros(1)}, {**base, **meta})


BAD = {
    # name: (route, body or raw (content, content-type), status, code)
    "session_id_with_slash": ("/v1/adapt", {"session_id": "b" * 300 + "/x", "instances": [{**GOOD, "label": "a"}]},
                              422, "invalid_request"),
    "predict_session_id_dotdot": ("/v1/predict", {"session_id": "../etc", "instances": [GOOD]}, 422,
                                  "invalid_request"),
    "import_version_beyond_2_53": ("/v1/sessions/target/import", (_export(version=10**19), "application/octet-stream"),
                                   422, "invalid_snapshot"),
    "import_created_in_the_future": ("/v1/sessions/target/import",
                                     (_export(created_at=1e300), "application/octet-stream"), 422, "invalid_snapshot"),
    "import_for_other_weights": ("/v1/sessions/target/import",
                                 (_export(weights="0" * 64), "application/octet-stream"), 422, "weights_mismatch"),
    "sgd_decay_that_diverges": ("/v1/sessions", {"rule": "sgd", "classes": ["a", "b"], "id": "target",
                                                 "hyperparameters": {"lr": 5.0, "weight_decay": 1.0}}, 422,
                                "invalid_hyperparameter"),
    "malformed_base64": ("/v1/adapt", {"instances": [{"image": "not base64!!", "label": "a"}]}, 422, "invalid_base64"),
    "undecodable_image": ("/v1/adapt", {"instances": [{"image": base64.b64encode(b"GIF89a....").decode(),
                                                       "label": "a"}]}, 422, "invalid_image"),
    "truncated_png": ("/v1/adapt", {"instances": [{"image": base64.b64encode(_png_bytes()[:60]).decode(),
                                                   "label": "a"}]}, 422, "invalid_image"),
    "wrong_array_shape": ("/v1/adapt", {"instances": [{"array": [[0.0] * 27] * 28, "label": "a"}]}, 422,
                          "invalid_array"),
    "ragged_array": ("/v1/adapt", {"instances": [{"array": [[0.0] * 28] * 27 + [[0.0]], "label": "a"}]}, 422,
                     "invalid_array"),
    "array_of_strings": ("/v1/adapt", {"instances": [{"array": [["x"] * 28] * 28, "label": "a"}]}, 422,
                         "invalid_array"),
    "nan": ("/v1/adapt", {"instances": [{"array": [[float("nan")] * 28] * 28, "label": "a"}]}, 422, "invalid_array"),
    "inf": ("/v1/adapt", {"instances": [{"array": [[float("inf")] * 28] * 28, "label": "a"}]}, 422, "invalid_array"),
    "out_of_range": ("/v1/adapt", {"instances": [{"array": [[300.0] * 28] * 28, "label": "a"}]}, 422,
                     "invalid_array"),
    "unknown_session": ("/v1/adapt", {"session_id": "nobody", "instances": [{**GOOD, "label": "a"}]}, 404,
                        "session_not_found"),
    "unknown_label": ("/v1/adapt", {"instances": [{**GOOD, "label": "a"}, {**GOOD, "label": "zebra"}]}, 422,
                      "unknown_label"),
    "label_index_out_of_range": ("/v1/adapt", {"instances": [{**GOOD, "label": 7}]}, 422, "unknown_label"),
    "too_many_instances": ("/v1/adapt", {"instances": [{**GOOD, "label": "a"}] * 9}, 422, "too_many_instances"),
    "missing_label": ("/v1/adapt", {"instances": [GOOD]}, 422, "missing_label"),  # label-free rules only
    "image_and_array": ("/v1/adapt", {"instances": [{**GOOD, "image": "AAAA", "label": "a"}]}, 422,
                        "invalid_request"),
    "no_instances": ("/v1/adapt", {"instances": []}, 422, "invalid_request"),
    "unknown_field": ("/v1/adapt", {"instances": [{**GOOD, "label": "a"}], "extra": 1}, 422, "invalid_request"),
    "malformed_json": ("/v1/adapt", (b'{"session_id": ', "application/json"), 400, "invalid_json"),
    "wrong_content_type": ("/v1/adapt", (b"session_id=x", "application/x-www-form-urlencoded"), 415,
                           "unsupported_media_type"),
    "no_content_type": ("/v1/adapt", (b"{}", None), 415, "unsupported_media_type"),
    "body_over_limit": ("/v1/adapt", (b"[" + b" " * 300_000 + b"]", "application/json"), 413, "payload_too_large"),
    "predict_unknown_session": ("/v1/predict", {"session_id": "nobody", "instances": [GOOD]}, 404,
                                "session_not_found"),
    "predict_top_k_too_big": ("/v1/predict", {"instances": [GOOD], "top_k": 50}, 422, "invalid_top_k"),
    "import_garbage": ("/v1/sessions/target/import", (b"garbage", "application/octet-stream"), 422,
                       "invalid_snapshot"),
    "import_json": ("/v1/sessions/target/import", (b"{}", "application/json"), 415, "unsupported_media_type"),
}


SMALL = dict(max_instances=8, max_body_bytes=200_000, max_queue_size=1, request_timeout_s=1.0, max_wait_ms=1.0)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "api-workers-2"])
def small_server(backbone, tmp_path_factory, request):
    with live_server(backbone, tmp_path_factory.mktemp("bad"), api_workers=request.param, **SMALL) as srv:
        yield srv


@pytest.fixture(scope="module")
def stallable_server(backbone, tmp_path_factory):
    """In this process: a test holds the engine's store to stall the batch worker thread (batches
    on the event loop would stall the loop itself, and nothing would answer)."""
    with live_server(backbone, tmp_path_factory.mktemp("stall"), batch_runner="thread", **SMALL) as srv:
        yield srv


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_rejected_and_changes_nothing(small_server, name):
    route, body, status, code = BAD[name]
    with small_server.client() as c:
        sid = f"victim-{name}"
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": sid})
        c.post("/v1/adapt", json={"session_id": sid, "instances": [{**arr(X[1]), "label": "b"}]})
        before = c.get(f"/v1/sessions/{sid}/export").content
        if isinstance(body, dict):
            body = {"session_id": sid, **body} if route == "/v1/adapt" else body
            r = c.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        else:
            content, ctype = body
            headers = {"content-type": ctype} if ctype else {}
            method = c.put if route.endswith("/import") else c.post
            r = method(route, content=content, headers=headers)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and isinstance(err["message"], str) and err["message"]
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 1
        assert c.get(f"/v1/sessions/{sid}/export").content == before
        assert c.get("/v1/sessions/target").status_code == 404


def test_unknown_route_and_method(small_server):
    with small_server.client() as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/v1/adapt")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_queue_full_503_and_timeout_504(stallable_server):
    """With the worker stalled: one job in flight, one queued (max_queue_size=1), the next gets
    503 + Retry-After; a queued adapt that times out is answered 504 and never applied."""
    small_server = stallable_server
    rt = small_server.engine
    x = X[0]

    async def main():
        async with AsyncClient(small_server.url) as c:
            sid = (await c.create_session("sgd", classes=["a", "b"])).id
            stall = rt.store.batch([])  # a transaction holding the store: the worker blocks on its next batch
            stall.__enter__()
            released = False
            try:
                started = rt.batcher.batches_started
                first = asyncio.create_task(c.adapt(sid, [x], ["a"]))  # taken by the worker, then blocked
                await _until(lambda: rt.batcher.batches_started > started)
                second = asyncio.create_task(c.adapt(sid, [x], ["b"]))  # sits in the queue
                await _until(lambda: rt.batcher.depth == 1)
                r = await c.http.post("/v1/predict", json={"instances": [arr(x)]})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
                # the queued adapt times out (1 s) while the worker is stalled: 504, dropped
                with pytest.raises(Exception) as ei:
                    await second
                assert getattr(ei.value, "status", None) == 504
                stall.__exit__(None, None, None)
                released = True
                assert (await first).version == 1
            finally:
                if not released:
                    stall.__exit__(None, None, None)
            info = await c.get_session(sid)
            assert info.version == 1 and info.examples_seen == 1

    asyncio.run(main())


async def _until(cond, settle: float = 0.0, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
    await asyncio.sleep(settle)


class GatedBackbone:
    """A backbone whose first use by the engine's loader waits for a gate (its config is free)."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self._inner, self._gate = inner, gate
        self.config = inner.config

    def __getattr__(self, name):
        self._gate.wait(30)
        return getattr(self._inner, name)


def test_not_ready_until_loaded(backbone, tmp_path):
    """Before the backbone is loaded and warmed up: live 200, ready 503, API 503."""
    import httpx

    from server.api import create_app
    from server.config import Settings
    from tests.server.conftest import LiveServer

    gate = threading.Event()
    app = create_app(Settings(snapshot_dir=tmp_path / "snap"), backbone=GatedBackbone(backbone, gate))
    rt = app.state.engine
    srv = LiveServer(app)
    srv.thread.start()
    try:
        with srv.client() as c:
            for _ in range(200):
                try:
                    live = c.get("/v2/health/live")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            assert live.status_code == 200
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and r.headers["x-fwserve-error-code"] == "not_ready"
            assert isinstance(r.json()["error"], str)  # the protocol's error body
            r = c.post("/v1/predict", json={"instances": [GOOD]})
            assert r.status_code == 503 and "retry-after" in r.headers
            gate.set()
            assert rt.wait_loaded(30)
            assert c.get("/v2/health/ready").status_code == 200
            assert c.post("/v1/predict", json={"instances": [GOOD]}).status_code == 200
    finally:
        gate.set()
        srv.stop()

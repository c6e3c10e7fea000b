"""The hot routes (server/api/hot.py): POST /v1/predict, /v1/adapt and the Open Inference
Protocol's /v2/models/{name}[/versions/{v}]/infer answered from the Guard middleware give exactly
what the framework's routes give. The same requests, in the same order,
go to a server serving them hot and to one whose hot table is empty (every request through the
framework's router and dependencies): statuses, error codes, bodies (less the timings) and the
headers a client reads are equal. With the framework's routes for these paths removed, the hot
server still answers them: the hot path is the one taken."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.server.conftest import arr, digits, live_server

XS = digits(3, seed=71)
CLIENT_HEADERS = ("content-type", "x-fwserve-error-code", "idempotent-replayed", "retry-after",
                  "inference-header-content-length")
MODEL = "fwserve-mnist-vit"
HOT_PATHS = ("/v1/predict", "/v1/adapt", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
TIMINGS = ("update_seconds", "latency_seconds")


@pytest.fixture(scope="module")
def servers(backbone, tmp_path_factory):
    with live_server(backbone, tmp_path_factory.mktemp("hot")) as hot, \
            live_server(backbone, tmp_path_factory.mktemp("framework")) as framework:
        framework.app.state.api.hot.routes.clear()
        yield hot, framework


def _json(content: str, **headers) -> dict:
    return {"content": content, "headers": {"content-type": "application/json", **headers}}


def _binary(x: np.ndarray, **headers) -> dict:
    return {"content": x.astype(np.uint8).tobytes(),
            "headers": {"content-type": "application/octet-stream", "x-shape": "1,28,28", **headers}}


PREDICT = json.dumps({"session_id": "hot-s", "instances": [arr(XS[0])]})
ADAPT = json.dumps({"session_id": "hot-s", "instances": [{**arr(XS[1]), "label": "b"}]})


def _infer(x: np.ndarray, label: str | None = None, **parameters) -> str:
    inputs = [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": x.reshape(-1).tolist()}]
    if label is not None:
        inputs.append({"name": "label", "shape": [1], "datatype": "BYTES", "data": [label]})
    return json.dumps({"inputs": inputs, "parameters": parameters})


INFER = f"/v2/models/{MODEL}/infer"
REQUESTS = [  # (method, path, request) — applied in order; the adapts change the session alike
    ("POST", "/v1/predict", _json(PREDICT)),
    ("POST", "/v1/adapt", _json(ADAPT)),
    ("POST", "/v1/adapt", _json(ADAPT, **{"Idempotency-Key": "hot-1"})),
    ("POST", "/v1/adapt", _json(ADAPT, **{"Idempotency-Key": "hot-1"})),  # replayed
    ("POST", "/v1/adapt", _json(ADAPT, **{"Idempotency-Key": "k" * 256})),  # too long
    ("POST", "/v1/adapt", _json(ADAPT, **{"Idempotency-Key": "has space"})),  # outside the pattern
    ("POST", "/v1/predict", _json(PREDICT)),
    ("POST", "/v1/predict", _json("{not json")),
    ("POST", "/v1/predict", _json(json.dumps({"session_id": "hot-s"}))),
    ("POST", "/v1/predict", _json(json.dumps({"session_id": "hot-none", "instances": [arr(XS[0])]}))),
    ("POST", "/v1/predict", _json(json.dumps({"session_id": "hot-s", "instances": [{"array": [[1.0, 2.0]]}]}))),
    ("POST", "/v1/adapt", _json(json.dumps({"session_id": "hot-s", "instances": [{**arr(XS[2]), "label": "zz"}]}))),
    ("POST", "/v1/predict", _binary(XS[2], **{"x-session-id": "hot-s"})),
    ("POST", "/v1/adapt", _binary(XS[2], **{"x-session-id": "hot-s", "x-labels": "a"})),
    ("POST", "/v1/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("GET", "/v1/predict", {}),
    ("POST", "/v1/predict", _json(PREDICT)),
    ("POST", INFER, _json(_infer(XS[0]))),
    ("POST", INFER, _json(_infer(XS[0], session_id="hot-s"))),
    ("POST", INFER, _json(_infer(XS[1], "a", session_id="hot-s"), **{"Idempotency-Key": "hot-2"})),
    ("POST", INFER, _json(_infer(XS[1], "a", session_id="hot-s"), **{"Idempotency-Key": "hot-2"})),  # replayed
    ("POST", INFER, _json(_infer(XS[1], "a", session_id="hot-s"), **{"Idempotency-Key": ""})),  # too short
    ("POST", f"/v2/models/{MODEL}/versions/1/infer", _json(_infer(XS[2]))),
    ("POST", f"/v2/models/{MODEL}/versions/2/infer", _json(_infer(XS[2]))),  # no such version
    ("POST", "/v2/models/other/infer", _json(_infer(XS[2]))),  # no such model
    ("POST", f"/v2/models/{MODEL}/x/infer", _json(_infer(XS[2]))),  # no such route
    ("POST", INFER, {"content": b"{", "headers": {}}),
    ("POST", INFER, {"content": _infer(XS[2]).encode(), "headers": {}}),  # no content type: read as JSON
    ("GET", INFER, {}),
]


def _outcome(r) -> tuple:
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in TIMINGS}
    return r.status_code, body, {h: r.headers.get(h) for h in CLIENT_HEADERS}


def test_hot_routes_answer_as_the_framework_routes(servers):
    hot, framework = servers
    outcomes = []
    for srv in (hot, framework):
        with srv.client() as c:
            created = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "hot-s"})
            assert created.status_code == 201
            outcomes.append([_outcome(c.request(method, path, **req)) for method, path, req in REQUESTS])
    for (method, path, req), got, want in zip(REQUESTS, *outcomes):
        assert got == want, (method, path, req.get("headers"))
    statuses = [o[0] for o in outcomes[0]]
    assert statuses == [200, 200, 200, 200, 422, 422, 200, 400, 422, 404, 422, 422, 200, 200, 415, 405, 200,
                        200, 200, 200, 200, 422, 200, 404, 404, 404, 400, 200, 405]
    assert outcomes[0][3][2]["idempotent-replayed"] == "true" and outcomes[0][20][2]["idempotent-replayed"] == "true"
    assert outcomes[0][6][1]["version"] == 2 and outcomes[0][16][1]["version"] == 3
    assert outcomes[0][19][1]["parameters"]["session_version"] == 4


def test_the_hot_path_is_taken(servers):
    hot, _ = servers
    router = hot.app.router
    kept = list(router.routes)
    router.routes[:] = [r for r in kept if getattr(r, "path", None) not in HOT_PATHS]
    assert len(router.routes) == len(kept) - len(HOT_PATHS)
    try:
        with hot.client() as c:
            c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "hot-t"})
            assert c.post("/v1/adapt", json={"session_id": "hot-t", "instances": [{**arr(XS[0]), "label": "a"}]}
                          ).status_code == 200
            r = c.post("/v1/predict", json={"session_id": "hot-t", "instances": [arr(XS[0])]})
            assert r.status_code == 200 and r.json()["version"] == 1
            for path in (INFER, f"/v2/models/{MODEL}/versions/1/infer"):
                r = c.post(path, **_json(_infer(XS[0], session_id="hot-t")))
                assert r.status_code == 200 and r.json()["parameters"]["session_version"] == 1
            assert c.get("/v1/predict").status_code == 404  # other methods: the framework, which has no route now
        with hot.client() as c:  # requests counted under their route, the template as for the framework's
            scrape = c.get("/metrics").text
        assert 'route="/v1/predict"' in scrape and 'route="/v2/models/{name}/infer"' in scrape
    finally:
        router.routes[:] = kept

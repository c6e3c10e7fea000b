"""The hot routes (server/api/hot.py): POST /v1/predict and /v1/adapt answered from the Guard
middleware give exactly what the framework's routes give. The same requests, in the same order,
go to a server serving them hot and to one whose hot table is empty (every request through the
framework's router and dependencies): statuses, error codes, bodies (less the timings) and the
headers a client reads are equal. With the framework's routes for the two paths removed, the hot
server still answers them: the hot path is the one taken."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.server.conftest import arr, digits, live_server

XS = digits(3, seed=71)
CLIENT_HEADERS = ("content-type", "x-fwserve-error-code", "idempotent-replayed", "retry-after")
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
    assert statuses == [200, 200, 200, 200, 422, 422, 200, 400, 422, 404, 422, 422, 200, 200, 415, 405, 200]
    assert outcomes[0][3][2]["idempotent-replayed"] == "true"
    assert outcomes[0][6][1]["version"] == 2 and outcomes[0][-1][1]["version"] == 3


def test_the_hot_path_is_taken(servers):
    hot, _ = servers
    router = hot.app.router
    kept = list(router.routes)
    router.routes[:] = [r for r in kept if getattr(r, "path", None) not in ("/v1/predict", "/v1/adapt")]
    try:
        with hot.client() as c:
            c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "hot-t"})
            assert c.post("/v1/adapt", json={"session_id": "hot-t", "instances": [{**arr(XS[0]), "label": "a"}]}
                          ).status_code == 200
            r = c.post("/v1/predict", json={"session_id": "hot-t", "instances": [arr(XS[0])]})
            assert r.status_code == 200 and r.json()["version"] == 1
            assert c.get("/v1/predict").status_code == 404  # other methods: the framework, which has no route now
        assert hot.metric("fwserve_request_duration_seconds_count", 'route="/v1/predict",status="200"') >= 1
    finally:
        router.routes[:] = kept

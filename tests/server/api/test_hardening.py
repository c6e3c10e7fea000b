"""NaN/Inf and oversized inputs on every route that takes numbers or sizes: a 4xx with the
error envelope, never a 5xx, and the session unchanged."""

from __future__ import annotations

import pytest

from tests.server.conftest import arr, digits

X = digits(1, seed=90)[0]
NAN_ROW = "[" + ",".join(["NaN"] * 28) + "]"
INF_ROW = "[" + ",".join(["Infinity"] * 28) + "]"


def raw(c, path: str, text: str, headers=None):
    return c.post(path, content=text.encode(), headers={"content-type": "application/json", **(headers or {})})


CASES = {
    # name: (path, raw JSON body with non-standard NaN/Infinity tokens or huge sizes, status)
    "adapt_nan_array": ("/v1/adapt", '{"session_id": "h", "instances": [{"array": [%s], "label": "a"}]}'
                        % ",".join([NAN_ROW] * 28), 422),
    "predict_inf_array": ("/v1/predict", '{"session_id": "h", "instances": [{"array": [%s]}]}'
                          % ",".join([INF_ROW] * 28), 422),
    "hyper_inf": ("/v1/sessions", '{"rule": "sgd", "classes": ["a"], "hyperparameters": {"lr": Infinity}}', 422),
    "hyper_nan": ("/v1/sessions", '{"rule": "rls", "classes": ["a"], "hyperparameters": {"lambda": NaN}}', 422),
    "hyper_huge": ("/v1/sessions", '{"rule": "sgd", "classes": ["a"], "hyperparameters": {"lr": 1e308}}', 422),
    "infer_nan": ("/v2/models/fwserve-mnist-vit/infer",
                  '{"inputs": [{"name": "i", "shape": [1, 28, 28], "datatype": "FP32", "data": [%s]}]}'
                  % ",".join(["NaN"] * 784), 422),
    "infer_huge_shape": ("/v2/models/fwserve-mnist-vit/infer",
                         '{"inputs": [{"name": "i", "shape": [100000000, 28, 28], "datatype": "FP32", "data": [1]}]}',
                         422),
    "infer_negative_shape": ("/v2/models/fwserve-mnist-vit/infer",
                             '{"inputs": [{"name": "i", "shape": [-1, 28, 28], "datatype": "FP32", "data": [1]}]}', 422),
    "top_k_huge": ("/v1/predict", '{"instances": [{"array": [[0]]}], "top_k": 100000000000000000000}', 422),
    "steps_huge": ("/v1/predict", '{"instances": [{"array": [[0]]}], "support": [{"array": [[0]], "label": "a"}], '
                   '"steps": 1000000000}', 422),
    "many_classes": ("/v1/sessions", '{"rule": "sgd", "classes": [%s]}' % ",".join(f'"c{i}"' for i in range(5000)),
                     422),
    "long_class_name": ("/v1/sessions", '{"rule": "sgd", "classes": ["%s"]}' % ("x" * 10000), 422),
    "long_label": ("/v1/adapt", '{"session_id": "h", "instances": [{"array": [[0]], "label": "%s"}]}' % ("y" * 100000),
                   422),
    "deep_nesting": ("/v1/predict", '{"instances": [{"array": %s}]}' % ("[" * 5000 + "]" * 5000), 400),  # past the JSON parser's depth limit
    "huge_label_index": ("/v1/adapt", '{"session_id": "h", "instances": [{"array": [%s], "label": 99999999999999999999}]}'
                         % ",".join(["[" + ",".join(["1"] * 28) + "]"] * 28), 422),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejected_without_5xx(server, name):
    path, body, status = CASES[name]
    with server.client() as c:
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "h"})
        before = c.get("/v1/sessions/h/export").content
        r = raw(c, path, body)
        assert r.status_code == status, r.text[:300]
        if path.startswith("/v2/"):  # the protocol's error body
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
        else:
            assert set(r.json()["error"]) == {"code", "message"}
        assert c.get("/v1/sessions/h/export").content == before


def test_oversized_headers_and_ids(server):
    with server.client() as c:
        r = c.get("/v1/sessions/" + "a" * 5000)
        assert r.status_code in (404, 422)
        r = raw(c, "/v1/sessions", '{"rule": "sgd", "classes": ["a"]}', {"Idempotency-Key": "k" * 10000})
        assert r.status_code == 422
        r = c.post("/v1/adapt", json={"session_id": "h", "instances": [{**arr(X), "label": "a"}] * 300})
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_instances"

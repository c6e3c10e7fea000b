"""The /v1 binary input path: raw tensor bytes give exactly what the JSON path gives (the same
predictions, versions, heads and Idempotency-Key identity), and malformed binary bodies are
refused with a 4xx that changes nothing."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load as st_load

from tests.server.conftest import digits

XS = [x.astype(np.uint8) for x in digits(4, seed=91)]
LABELS = ["a", "b", "a", "b"]


def binary(x: list[np.ndarray], **headers) -> dict:
    shape = ",".join(str(n) for n in (len(x), *x[0].shape))
    return {"content": np.stack(x).tobytes(), "headers": {"content-type": "application/octet-stream",
                                                          "x-shape": shape, **headers}}


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_binary_and_json_requests_are_the_same_request(server):
    with server.client() as c:
        for sid in ("bin-json", "bin-raw"):
            assert c.post("/v1/sessions", json={"rule": "rls", "classes": ["a", "b"], "id": sid}).status_code == 201
        j = c.post("/v1/adapt", json={"session_id": "bin-json", "instances": [
            {"array": x.tolist(), "label": y} for x, y in zip(XS, LABELS)]})
        b = c.post("/v1/adapt", **binary(XS, **{"x-session-id": "bin-raw", "x-labels": json.dumps(LABELS)}))
        assert j.status_code == b.status_code == 200, (j.text, b.text)
        jb, bb = j.json(), b.json()
        assert jb["version"] == bb["version"] == 1 and jb["predictions"] == bb["predictions"]
        tj, tb = (st_load(c.get(f"/v1/sessions/{s}/export").content) for s in ("bin-json", "bin-raw"))
        assert tj.keys() == tb.keys() and all(tj[k].equal(tb[k]) for k in tj)  # the same heads, bit for bit
        pj = c.post("/v1/predict", json={"session_id": "bin-json", "top_k": 2,
                                         "instances": [{"array": x.tolist()} for x in XS]}).json()
        pb = c.post("/v1/predict", **binary(XS, **{"x-session-id": "bin-raw", "x-top-k": "2"})).json()
        assert pj["predictions"] == pb["predictions"] and pj["version"] == pb["version"] == 1
        # encoded images as BYTES elements (4-byte length + PNG) = base64 images in JSON
        blob = b"".join(struct.pack("<I", len(png(x))) + png(x) for x in XS)
        pbytes = c.post("/v1/predict", content=blob, headers={
            "content-type": "application/octet-stream", "x-shape": "4", "x-datatype": "BYTES",
            "x-session-id": "bin-raw", "x-top-k": "2"}).json()
        pimg = c.post("/v1/predict", json={"session_id": "bin-raw", "top_k": 2, "instances": [
            {"image": base64.b64encode(png(x)).decode()} for x in XS]}).json()
        assert pbytes["predictions"] == pimg["predictions"] == pb["predictions"]
        # the base head when no session is named
        assert c.post("/v1/predict", **binary(XS[:1])).json()["head"] == "base"


def test_an_idempotency_key_sees_through_the_encoding(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "bin-idem"})
        first = c.post("/v1/adapt", **binary(XS[:1], **{"x-session-id": "bin-idem", "x-labels": "a",
                                                       "idempotency-key": "enc-1"}))
        assert first.status_code == 200 and first.json()["version"] == 1
        again = c.post("/v1/adapt", json={"session_id": "bin-idem", "instances": [{"array": XS[0].tolist(),
                                                                                    "label": "a"}]},
                       headers={"idempotency-key": "enc-1"})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert c.get("/v1/sessions/bin-idem").json()["version"] == 1


@pytest.mark.parametrize("case", ["no_shape", "bad_shape", "short_body", "wrong_size", "labels_count",
                                  "no_labels", "no_session", "bad_session", "bad_datatype", "bad_top_k"])
def test_malformed_binary_bodies_are_refused_and_change_nothing(server, case):
    sid = "bin-victim"
    with server.client() as c:
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": sid})
        before = c.get(f"/v1/sessions/{sid}/export").content
        req = binary(XS[:2], **{"x-session-id": sid, "x-labels": "a,b"})
        h = req["headers"]
        if case == "no_shape":
            del h["x-shape"]
        elif case == "bad_shape":
            h["x-shape"] = "2,x,28"
        elif case == "short_body":
            req["content"] = req["content"][:100]
        elif case == "wrong_size":
            h["x-shape"] = "2,27,27"
        elif case == "labels_count":
            h["x-labels"] = "a"
        elif case == "no_labels":
            del h["x-labels"]
        elif case == "no_session":
            del h["x-session-id"]
        elif case == "bad_session":
            h["x-session-id"] = "../" + "x" * 200
        elif case == "bad_datatype":
            h["x-datatype"] = "COMPLEX64"
        elif case == "bad_top_k":
            h["x-top-k"] = "0"
        r = c.post("/v1/predict" if case == "bad_top_k" else "/v1/adapt", **req)
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
        assert r.json()["error"]["code"] and r.json()["error"]["message"]
        assert c.get(f"/v1/sessions/{sid}/export").content == before


def test_the_client_speaks_the_binary_path(server):
    from server.client import Client

    with Client(server.url, v1_encoding="binary") as cb, Client(server.url) as cj:
        for c, sid in ((cj, "cl-json"), (cb, "cl-bin")):
            c.create_session("prototype", classes=["a", "b"], session_id=sid)
            r = c.adapt(sid, XS, LABELS)
            assert r.version == 1
        pj, pb = cj.predict(XS, session_id="cl-json", top_k=2), cb.predict(XS, session_id="cl-bin", top_k=2)
        assert pj.predictions == pb.predictions and pb.version == 1
        assert cb.predict([png(x) for x in XS], session_id="cl-bin", top_k=2).predictions == pb.predictions

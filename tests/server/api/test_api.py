"""The HTTP API end to end (real uvicorn, httpx and the typed client)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load as st_load

from server.client import AsyncClient, Client, FwserveError
from tests.server.conftest import BACKBONE, arr, digits

RULES = ["sgd", "delta", "prototype", "rls"]


def png(x: np.ndarray, size: int | None = None) -> str:
    img = Image.fromarray(x.astype(np.uint8))
    if size:
        img = img.resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_base_head_predict(server):
    xs = digits(3)
    with server.client() as c:
        r = c.post("/v1/predict", json={"instances": [arr(xs[0]), {"image": png(xs[1])},
                                                      {"image": png(xs[2], size=56)}], "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["head"] == "base" and body["version"] is None
        assert len(body["predictions"]) == 3
        for p in body["predictions"]:
            assert p["label"] in ["0", "1", "2", "3", "4"]
            assert len(p["top_k"]) == 3 and p["top_k"][0]["label"] == p["label"]
            scores = [t["score"] for t in p["top_k"]]
            assert scores == sorted(scores, reverse=True) and 0 < p["score"] <= 1
        # array and PNG of the same pixels give the same answer
        assert body["predictions"][0]["top_k"][0]["label"] == body["predictions"][0]["label"]


@pytest.mark.parametrize("rule", RULES)
def test_session_lifecycle(server, rule):
    xs = digits(4, seed=1)
    sid = f"life-{rule}"
    with server.client() as c:
        r = c.post("/v1/sessions", json={"rule": rule, "classes": ["cat", "dog", "eel"], "id": sid})
        assert r.status_code == 201 and r.json() == {"id": sid, "version": 0}
        assert c.post("/v1/sessions", json={"rule": rule, "classes": ["a"], "id": sid}).status_code == 409
        r = c.post("/v1/adapt", json={"session_id": sid, "instances": [
            {**arr(xs[0]), "label": "dog"}, {**arr(xs[1]), "label": 2}]})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["version"] == 1 and a["applied"] == 2 and a["update_seconds"] >= 0
        assert [p["true_label"] for p in a["predictions"]] == ["dog", "eel"]
        info = c.get(f"/v1/sessions/{sid}").json()
        assert info["rule"] == rule and info["classes"] == ["cat", "dog", "eel"]
        assert info["version"] == 1 and info["examples_seen"] == 2 and info["tier"] == "device"
        assert info["prequential"]["total"] == 2
        p = c.post("/v1/predict", json={"session_id": sid, "instances": [arr(xs[0])]}).json()
        assert p["head"] == "session" and p["version"] == 1

        exported = c.get(f"/v1/sessions/{sid}/export")
        assert exported.status_code == 200
        tensors = st_load(exported.content)
        assert tensors["W"].shape == (3, server.engine.store.d)
        r = c.put(f"/v1/sessions/{sid}-copy/import", content=exported.content,
                  headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 0 and r.json()["rule"] == rule  # a new session's own first version
        again = c.get(f"/v1/sessions/{sid}-copy/export").content
        for k, v in st_load(again).items():
            assert v.equal(tensors[k]), k
        p2 = c.post("/v1/predict", json={"session_id": f"{sid}-copy", "instances": [arr(xs[0])]}).json()
        assert p2["predictions"] == p["predictions"]

        assert c.post(f"/v1/sessions/{sid}/reset").json() == {"id": sid, "version": 2}  # a new version
        info = c.get(f"/v1/sessions/{sid}").json()
        assert info["version"] == 2 and info["examples_seen"] == 0
        assert st_load(c.get(f"/v1/sessions/{sid}/export").content)["W"].abs().sum() == 0

        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert c.get(f"/v1/sessions/{sid}").status_code == 404
        assert c.delete(f"/v1/sessions/{sid}-copy").status_code == 204


def test_create_options(server):
    with server.client() as c:
        r = c.post("/v1/sessions", json={"rule": "sgd", "init": "base"})
        assert r.status_code == 201
        info = c.get(f"/v1/sessions/{r.json()['id']}").json()
        assert info["classes"] == server.engine.backbone.class_names and info["init"] == "base"
        x = digits(1, seed=5)
        base = c.post("/v1/predict", json={"instances": [arr(x[0])]}).json()["predictions"]
        sess = c.post("/v1/predict", json={"session_id": info["id"], "instances": [arr(x[0])]}).json()["predictions"]
        assert sess[0]["label"] == base[0]["label"]
        assert abs(sess[0]["score"] - base[0]["score"]) < 1e-5
        # base init needs the base classes and a rule that scores raw features
        assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["x", "y"], "init": "base"}).status_code == 422
        assert c.post("/v1/sessions", json={"rule": "prototype", "init": "base"}).status_code == 422
        r = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "hyperparameters": {"lr": 0.5}})
        assert c.get(f"/v1/sessions/{r.json()['id']}").json()["hyperparameters"] == {"lr": 0.5, "weight_decay": 0.0}
        for bad in ({"rule": "nope", "classes": ["a"]}, {"rule": "sgd", "classes": ["a", "a"]},
                    {"rule": "sgd", "classes": []}, {"rule": "sgd", "classes": ["a"], "hyperparameters": {"lr": -1}},
                    {"rule": "sgd", "classes": ["a"], "hyperparameters": {"beta": 1}},
                    {"rule": "sgd", "classes": ["a"], "id": "bad id!"}):
            r = c.post("/v1/sessions", json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert set(r.json()["error"]) == {"code", "message"}


def test_episodic_head(server):
    xs = digits(6, seed=2)
    support = [{**arr(x), "label": lab} for x, lab in zip(xs[:4], ["a", "b", "a", "b"])]
    with server.client() as c:
        for rule in RULES:
            hyper = {"beta": 1.0} if rule == "delta" else {}
            r = c.post("/v1/predict", json={"support": support, "instances": [arr(xs[0]), arr(xs[1])],
                                            "rule": rule, "hyperparameters": hyper, "steps": 3, "top_k": 2})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["head"] == "episodic" and body["session_id"] is None
            assert [p["top_k"][0]["label"] for p in body["predictions"]][0] in ("a", "b")
        # a one-shot prototype head recalls its support examples (cosine 1 with its own mean)
        r = c.post("/v1/predict", json={"support": support[:2], "instances": [arr(x) for x in xs[:2]]}).json()
        assert [p["label"] for p in r["predictions"]] == ["a", "b"]
        r = c.post("/v1/predict", json={"support": support[:2], "classes": ["b", "a"], "instances": [arr(xs[0])]})
        assert r.json()["predictions"][0]["label"] == "a"
        bad = c.post("/v1/predict", json={"support": support, "classes": ["a"], "instances": [arr(xs[0])]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "unknown_label"
        both = c.post("/v1/predict", json={"support": support, "session_id": "x", "instances": [arr(xs[0])]})
        assert both.status_code == 422


def test_v2_endpoints(server):
    xs = np.stack(digits(2, seed=3))
    with server.client() as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2").json()["name"] == "fwserve"
        meta = c.get(f"/v2/models/{BACKBONE}").json()
        assert meta["name"] == BACKBONE and meta["inputs"][0]["shape"] == [-1, 28, 28]
        assert c.get(f"/v2/models/{BACKBONE}/ready").status_code == 200
        other = c.get("/v2/models/other")  # the protocol's error body; the code in a header
        assert other.status_code == 404 and isinstance(other.json()["error"], str) and set(other.json()) == {"error"}
        assert other.headers["x-fwserve-error-code"] == "model_not_found"
        assert c.get("/v2/models/other/ready").status_code == 404
        body = {"id": "r1", "inputs": [{"name": "image", "shape": [2, 28, 28], "datatype": "UINT8",
                                        "data": xs.reshape(-1).astype(int).tolist()}]}
        r = c.post(f"/v2/models/{BACKBONE}/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["id"] == "r1" and out["label"]["shape"] == [2] and len(out["score"]["data"]) == 2
        base = c.post("/v1/predict", json={"instances": [arr(x) for x in xs]}).json()["predictions"]
        assert out["label"]["data"] == [p["label"] for p in base]

        sid = c.post("/v1/sessions", json={"rule": "delta", "classes": ["p", "q"],
                                           "hyperparameters": {"beta": 1.0}}).json()["id"]
        c.post("/v1/adapt", json={"session_id": sid, "instances": [{**arr(xs[0]), "label": "q"}]})
        body["parameters"] = {"session_id": sid, "top_k": 2}
        r = c.post(f"/v2/models/{BACKBONE}/infer", json=body).json()
        assert r["parameters"] == {"session_id": sid, "session_version": 1}
        out = {o["name"]: o for o in r["outputs"]}
        assert out["label"]["data"][0] == "q" and out["top_k_label"]["shape"] == [2, 2]
        b64 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [png(xs[0])]}],
               "parameters": {"session_id": sid}}
        assert c.post(f"/v2/models/{BACKBONE}/infer", json=b64).json()["outputs"][0]["data"] == ["q"]
        for bad in ({"inputs": [{"name": "i", "shape": [1, 28, 27], "datatype": "FP32", "data": [0] * 756}]},
                    {"inputs": [{"name": "i", "shape": [1, 28, 28], "datatype": "FP32", "data": [0] * 10}]},
                    {"inputs": [{"name": "i", "shape": [1, 28, 28], "datatype": "BOOL", "data": [0] * 784}]}):
            r = c.post(f"/v2/models/{BACKBONE}/infer", json=bad)
            assert r.status_code == 422, r.text
        r = c.post(f"/v2/models/{BACKBONE}/infer", json={**body, "parameters": {"session_id": "missing"}})
        assert r.status_code == 404
        assert c.get("/docs").status_code == 200
        assert "/v1/adapt" in c.get("/openapi.json").json()["paths"]


def test_sync_client(server):
    xs = digits(3, seed=4)
    with Client(server.url) as c:
        c.wait_ready(5)
        assert c.ready() and c.live()
        s = c.create_session("delta", classes=["u", "v"], hyperparameters={"beta": 1.0})
        a = c.adapt(s.id, xs[:2], ["v", "u"])
        assert a.version == 1 and a.applied == 2
        p = c.predict(xs[1:2], session_id=s.id, top_k=2)  # beta = 1 stores the last row exactly
        assert p.version == 1 and p.predictions[0].label == "u" and len(p.predictions[0].top_k) == 2
        assert c.get_session(s.id).examples_seen == 2
        data = c.export_session(s.id)
        assert c.import_session("copied", data).version == 0
        assert c.reset_session(s.id).version == 2
        e = c.predict_episodic(xs[:1], xs[:2], ["m", "n"])
        assert e.predictions[0].label == "m"
        assert c.infer(BACKBONE, np.stack(xs[:2]), session_id="copied").parameters["session_version"] == 0
        assert c.model_metadata(BACKBONE).name == BACKBONE and c.server_metadata().name == "fwserve"
        assert "fwserve_build_info" in c.metrics()
        c.delete_session(s.id)
        with pytest.raises(FwserveError) as ei:
            c.get_session(s.id)
        assert ei.value.status == 404 and ei.value.code == "session_not_found"


def test_async_client(server):
    xs = digits(2, seed=6)

    async def main():
        async with AsyncClient(server.url) as c:
            await c.wait_ready(5)
            s = await c.create_session("prototype", classes=["a", "b"], session_id="async-1")
            results = await asyncio.gather(c.adapt(s.id, [xs[0]], ["a"]), c.adapt(s.id, [xs[1]], ["b"]))
            assert sorted(r.version for r in results) == [1, 2]
            p = await c.predict(xs, session_id=s.id)
            assert [q.label for q in p.predictions] == ["a", "b"] and p.version == 2
            with pytest.raises(FwserveError):
                await c.adapt(s.id, [xs[0]], ["zzz"])

    asyncio.run(main())


def test_import_rejects_foreign_or_inconsistent_snapshots(server):
    import json

    from safetensors.torch import save as st_save

    with Client(server.url) as c:
        sid = c.create_session("rls", classes=["a", "b"]).id
        data = c.export_session(sid)
        tensors = st_load(data)
        meta = json.loads(header_metadata(data)["fwserve"])

        def variant(tensors=tensors, **changes):
            return st_save(tensors, metadata={"fwserve": json.dumps({**meta, **changes})})

        cases = {
            "other backbone": variant(backbone="vit_small_patch16_224"),
            "other width": variant(embed_dim=7),
            "unknown rule": variant(rule="hebbian"),
            "bad hyper": variant(hyperparameters={"lambda": "big"}),
            "class count": variant(classes=["a", "b", "c"]),
            "missing state": variant(tensors={k: v for k, v in tensors.items() if k != "P"}),
            "nan": variant(tensors={**tensors, "W": tensors["W"] * float("nan")}),
            "negative version": variant(version=-1),
        }
        for what, blob in cases.items():
            with pytest.raises(FwserveError) as ei:
                c.import_session("imported", blob)
            assert ei.value.status == 422, what
        with pytest.raises(FwserveError):
            c.get_session("imported")
        assert c.import_session("imported", variant()).rule == "rls"


def header_metadata(data: bytes) -> dict:
    """The __metadata__ of a safetensors blob."""
    import json

    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


def test_client_retries_503():
    import httpx

    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(503, headers={"retry-after": "0"},
                                  json={"error": {"code": "overloaded", "message": "full"}})
        return httpx.Response(200, json={"id": "s", "version": 0})

    with Client("http://test", retries=2, transport=httpx.MockTransport(handler)) as c:
        assert c.create_session("sgd", ["a"]).id == "s" and len(calls) == 3
    calls.clear()
    with Client("http://test", retries=1, transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(FwserveError) as ei:
            c.create_session("sgd", ["a"])
        assert ei.value.status == 503 and ei.value.code == "overloaded"

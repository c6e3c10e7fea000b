"""Open Inference Protocol conformance over HTTP, tested with the stock Triton client
(``tritonclient.http`` and ``tritonclient.http.aio``) against a live server: health, metadata,
configuration, JSON and binary tensors both ways, requested outputs, FP32 / UINT8 / BYTES
inputs, parameters, versioned routes, errors the client parses, and adapting over OIP."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from server.api.v2.model import EXTENSIONS
from tests.server.conftest import BACKBONE, arr, digits

th = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

XS = np.stack(digits(3, seed=150))  # [3, 28, 28] float32 pixel values 0..255


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def triton(server):
    c = th.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def image_input(x: np.ndarray, datatype: str = "FP32", binary: bool = True, name: str = "image"):
    t = th.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def text(values) -> list[str]:
    """BYTES output values (bytes when binary, str from JSON) as strings."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def v1_labels(server, xs, session_id=None) -> list[str]:
    body = {"instances": [arr(x) for x in xs], **({"session_id": session_id} if session_id else {})}
    with server.client() as c:
        return [p["label"] for p in c.post("/v1/predict", json=body).json()["predictions"]]


def test_health_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(BACKBONE) and triton.is_model_ready(BACKBONE, "1")
    assert not triton.is_model_ready("other") and not triton.is_model_ready(BACKBONE, "2")
    meta = triton.get_server_metadata()
    assert meta["name"] == "fwserve" and meta["extensions"] == EXTENSIONS
    for version in ("", "1"):
        model = triton.get_model_metadata(BACKBONE, version)
        assert model["name"] == BACKBONE and model["versions"] == ["1"]
        assert {i["name"]: i["shape"] for i in model["inputs"]} == {"image": [-1, 28, 28], "label": [-1]}
        assert {"label", "label_index", "score", "top_k_label", "correct"} <= {o["name"] for o in model["outputs"]}
        config = triton.get_model_config(BACKBONE, version)
        assert config["name"] == BACKBONE and config["max_batch_size"] > 0
        assert config["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
                                      "dims": [28, 28]}
        assert config["input"][1]["optional"] is True
    with pytest.raises(InferenceServerException) as ei:
        triton.get_model_config("other")
    assert ei.value.status() == "404" and "unknown model 'other'" in ei.value.message()


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_json_and_binary_tensors(server, triton, binary_in, binary_out):
    outputs = [th.InferRequestedOutput(n, binary_data=binary_out) for n in ("label", "label_index", "score")]
    r = triton.infer(BACKBONE, [image_input(XS, binary=binary_in)], outputs=outputs, request_id="r-7")
    labels = text(r.as_numpy("label"))
    assert labels == v1_labels(server, XS)
    assert r.as_numpy("label_index").dtype == np.int64 and r.as_numpy("score").shape == (3,)
    assert np.all((r.as_numpy("score") > 0) & (r.as_numpy("score") <= 1))
    resp = r.get_response()
    assert resp["id"] == "r-7" and resp["model_version"] == "1"
    for out in resp["outputs"]:
        assert ("binary_data_size" in (out.get("parameters") or {})) == binary_out
        assert ("data" in out) == (not binary_out)


def test_default_outputs_are_binary_and_per_output_binary_data_wins(triton):
    r = triton.infer(BACKBONE, [image_input(XS)])  # no outputs listed: the client asks binary_data_output
    assert [o["name"] for o in r.get_response()["outputs"]] == ["label", "label_index", "score"]
    assert all("binary_data_size" in o["parameters"] for o in r.get_response()["outputs"])
    # requested outputs, in the order asked, one binary and one JSON
    r2 = triton.infer(BACKBONE, [image_input(XS)], outputs=[th.InferRequestedOutput("score", binary_data=False),
                                                           th.InferRequestedOutput("label", binary_data=True)])
    outs = r2.get_response()["outputs"]
    assert [o["name"] for o in outs] == ["score", "label"]
    assert "data" in outs[0] and outs[1]["parameters"]["binary_data_size"] > 0
    np.testing.assert_array_equal(r2.as_numpy("label"), r.as_numpy("label"))
    np.testing.assert_allclose(r2.as_numpy("score"), r.as_numpy("score"), rtol=1e-6)


def test_uint8_fp32_and_bytes_inputs_agree(server, triton):
    want = v1_labels(server, XS)
    pngs = np.array([png(x) for x in XS], dtype=np.object_)
    b64 = np.array([base64.b64encode(png(x)) for x in XS], dtype=np.object_)
    cases = {
        "fp32": image_input(XS, "FP32"),
        "uint8": image_input(XS.astype(np.uint8), "UINT8"),
        "uint8-json": image_input(XS.astype(np.uint8), "UINT8", binary=False),
        "bytes-raw-png": image_input(pngs, "BYTES"),  # 4-byte length + PNG per element
        "bytes-base64-json": image_input(b64, "BYTES", binary=False),
        "channels-last": image_input(XS[..., None], "FP32"),
    }
    for what, inp in cases.items():
        r = triton.infer(BACKBONE, [inp], outputs=[th.InferRequestedOutput("label")])
        assert text(r.as_numpy("label")) == want, what


def test_parameters_session_top_k_and_sequence_id(server, triton):
    with server.client() as c:
        assert c.post("/v1/sessions", json={"rule": "delta", "classes": ["p", "q", "r"], "id": "4242",
                                            "hyperparameters": {"beta": 1.0}}).status_code == 201
        c.post("/v1/adapt", json={"session_id": "4242", "instances": [{**arr(XS[0]), "label": "r"}]})
    r = triton.infer(BACKBONE, [image_input(XS[:1])], parameters={"session_id": "4242", "top_k": 2})
    assert r.get_response()["parameters"] == {"session_id": "4242", "session_version": 1}
    assert r.as_numpy("label")[0] == b"r"
    assert r.as_numpy("top_k_label").shape == (1, 2) and r.as_numpy("top_k_score").shape == (1, 2)
    assert r.as_numpy("top_k_label")[0, 0] == b"r"
    # Triton's sequence id names the same session (sequence_start/end are accepted)
    r2 = triton.infer(BACKBONE, [image_input(XS[:1])], sequence_id=4242, sequence_start=True)
    assert r2.get_response()["parameters"]["session_id"] == "4242" and r2.as_numpy("label")[0] == b"r"
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(BACKBONE, [image_input(XS[:1])], sequence_id=4242, parameters={"session_id": "other"})
    assert ei.value.status() == "422" and "different sessions" in ei.value.message()


def test_versioned_routes(server, triton):
    r = triton.infer(BACKBONE, [image_input(XS)], model_version="1")
    assert r.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(BACKBONE, [image_input(XS)], model_version="2")
    assert ei.value.status() == "404" and "no version '2'" in ei.value.message()
    with server.client() as c:
        assert c.get(f"/v2/models/{BACKBONE}/versions/1").json()["versions"] == ["1"]
        assert c.get(f"/v2/models/{BACKBONE}/versions/1/ready").status_code == 200
        assert c.get(f"/v2/models/{BACKBONE}/versions/1/config").json()["name"] == BACKBONE


@pytest.mark.parametrize("case", ["shape", "nan", "datatype", "parameter", "output", "classification", "session",
                                  "model", "top_k"])
def test_errors_the_client_parses(triton, case):
    bad = {
        "shape": ([image_input(np.zeros((1, 28, 27), np.float32))], {}, "422", "shape [1, 28, 27]"),
        "nan": ([image_input(np.full((1, 28, 28), np.nan, np.float32))], {}, "422", "NaN"),
        "datatype": ([image_input(np.zeros((1, 28, 28), np.bool_), "BOOL")], {}, "422", "unsupported datatype"),
        "parameter": ([image_input(XS)], {"parameters": {"sesion_id": "x"}}, "422", "unknown parameters"),
        "output": ([image_input(XS)], {"outputs": [th.InferRequestedOutput("logits")]}, "422", "unknown output"),
        "classification": ([image_input(XS)], {"outputs": [th.InferRequestedOutput("score", class_count=2)]},
                           "422", "classification extension is not supported"),
        "session": ([image_input(XS)], {"parameters": {"session_id": "nobody"}}, "404", "unknown session"),
        "model": ([image_input(XS)], {"model_name": "other"}, "404", "unknown model"),
        "top_k": ([image_input(XS)], {"parameters": {"top_k": 1000}}, "422", "top_k=1000"),
    }
    inputs, kw, status, text = bad[case]
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(kw.pop("model_name", BACKBONE), inputs, **kw)
    assert ei.value.status() == status and text in ei.value.message(), ei.value.message()


def test_error_bodies_by_prefix_and_missing_content_type(server):
    x = XS[:1]
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    with server.client() as c:
        ok = c.post(f"/v2/models/{BACKBONE}/infer", content=body)  # no Content-Type: read as JSON
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        assert ok.json()["outputs"][0]["data"] == v1_labels(server, x)
        assert ok.headers["x-request-id"]
        r = c.post(f"/v2/models/{BACKBONE}/infer", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
        r = c.post(f"/v2/models/{BACKBONE}/infer", content=body, headers={"content-type": "text/plain"})
        assert r.status_code == 415 and isinstance(r.json()["error"], str)
        r = c.post(f"/v2/models/{BACKBONE}/infer", content=body, headers={"content-encoding": "gzip"})
        assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
        # /v1 keeps its envelope
        r = c.post("/v1/predict", content=b"{}")
        assert r.status_code == 415 and set(r.json()["error"]) == {"code", "message"}
        # the binary extension: header length past the body, sizes that do not add up
        head = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 784 * 4}}]}).encode()
        raw = x.astype("<f4").tobytes()
        hl = {"Inference-Header-Content-Length": str(len(head))}
        assert c.post(f"/v2/models/{BACKBONE}/infer", content=head + raw, headers=hl).status_code == 200
        assert c.post(f"/v2/models/{BACKBONE}/infer", content=head + raw[:-4], headers=hl).status_code == 400
        assert c.post(f"/v2/models/{BACKBONE}/infer", content=head + raw + b"xx", headers=hl).status_code == 400
        r = c.post(f"/v2/models/{BACKBONE}/infer", content=head, headers={"Inference-Header-Content-Length": "9999"})
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


@pytest.mark.parametrize("label_type", ["BYTES", "INT64"])
def test_adapt_over_oip(server, triton, label_type):
    sid = f"oip-adapt-{label_type.lower()}"
    with server.client() as c:
        assert c.post("/v1/sessions", json={"rule": "prototype", "classes": ["5", "6", "7"], "id": sid}).status_code == 201
    labels = np.array([b"6", b"7", b"5"], dtype=np.object_) if label_type == "BYTES" else np.array([1, 2, 0])
    lab = th.InferInput("label", [3], label_type)
    lab.set_data_from_numpy(labels)
    r = triton.infer(BACKBONE, [image_input(XS), lab], parameters={"session_id": sid},
                     headers={"Idempotency-Key": f"k-{sid}"})
    params = r.get_response()["parameters"]
    assert params == {"session_id": sid, "session_version": 1, "applied": 3}
    assert r.as_numpy("correct").dtype == np.bool_ and r.as_numpy("correct").shape == (3,)
    assert set(r.as_numpy("label")) <= {b"5", b"6", b"7"}  # made before the update (prequential)
    again = triton.infer(BACKBONE, [image_input(XS), lab], parameters={"session_id": sid},
                         headers={"Idempotency-Key": f"k-{sid}"})  # a retry: applied once
    assert again.get_response()["parameters"]["session_version"] == 1
    with server.client() as c:
        info = c.get(f"/v1/sessions/{sid}").json()
        assert info["version"] == 1 and info["examples_seen"] == 3
    # the session now knows its examples: a prototype head recalls them
    p = triton.infer(BACKBONE, [image_input(XS)], parameters={"session_id": sid})
    assert text(p.as_numpy("label")) == ["6", "7", "5"]
    assert p.get_response()["parameters"]["session_version"] == 1
    # a label without a session, a label count that does not match, an unknown class: refused, nothing applied
    for inputs, kw in (([image_input(XS), lab], {}),
                       ([image_input(XS[:2]), lab], {"parameters": {"session_id": sid}})):
        with pytest.raises(InferenceServerException) as ei:
            triton.infer(BACKBONE, inputs, **kw)
        assert ei.value.status() == "422"
    bad = th.InferInput("label", [3], "BYTES")
    bad.set_data_from_numpy(np.array([b"6", b"7", b"zebra"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(BACKBONE, [image_input(XS), bad], parameters={"session_id": sid})
    assert ei.value.status() == "422" and "zebra" in ei.value.message()
    with server.client() as c:
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 1


def test_aio_client(server):
    aio = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] brings aiohttp")

    async def main():
        c = aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready(BACKBONE)
            assert (await c.get_server_metadata())["extensions"] == EXTENSIONS
            assert (await c.get_model_metadata(BACKBONE))["versions"] == ["1"]
            assert (await c.get_model_config(BACKBONE))["input"][0]["name"] == "image"
            inp = aio.InferInput("image", list(XS.shape), "FP32")
            inp.set_data_from_numpy(XS)
            r = await c.infer(BACKBONE, [inp])  # binary both ways
            with pytest.raises(InferenceServerException) as ei:
                await c.infer("other", [inp])
            assert ei.value.status() == "404"
            return text(r.as_numpy("label"))
        finally:
            await c.close()

    assert asyncio.run(main()) == v1_labels(server, XS)


def test_openapi_documents_the_v2_error_body(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")
    assert "/v2/models/{name}/versions/{version}/infer" in spec["paths"]
    v1 = spec["paths"]["/v1/predict"]["post"]
    assert v1["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")

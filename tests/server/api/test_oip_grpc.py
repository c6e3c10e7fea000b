"""The Open Inference Protocol over gRPC (KServe v2 GRPCInferenceService on --grpc-port), tested
with the stock ``tritonclient.grpc``: the same engine, auth and answers as HTTP."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from server.api.auth import hash_key
from server.api.v2.model import EXTENSIONS
from tests.server.conftest import BACKBONE, arr, digits, live_server

tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the test extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

XS = np.stack(digits(2, seed=160))
KEY = "grpc-tenant-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def both(backbone, tmp_path_factory):
    """A server with API keys on, HTTP and gRPC."""
    port = free_port()
    with live_server(backbone, tmp_path_factory.mktemp("grpc"), grpc_port=port,
                     api_keys=f"acme {hash_key(KEY)} id=acme-key-1") as srv:
        client = tg.InferenceServerClient(f"127.0.0.1:{srv.app.state.grpc_port}")
        yield srv, client
        client.close()


AUTH = {"authorization": f"Bearer {KEY}"}


def image(x, datatype="FP32"):
    t = tg.InferInput("image", list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return t


def test_health_metadata_config(both):
    _, g = both
    assert g.is_server_live() and g.is_server_ready()
    assert g.is_model_ready(BACKBONE) and g.is_model_ready(BACKBONE, "1") and not g.is_model_ready("other")
    meta = g.get_server_metadata(as_json=True)
    assert meta["name"] == "fwserve" and meta["extensions"] == EXTENSIONS
    model = g.get_model_metadata(BACKBONE, as_json=True)
    assert model["versions"] == ["1"] and model["inputs"][0] == {"name": "image", "datatype": "FP32",
                                                                  "shape": ["-1", "28", "28"]}
    cfg = g.get_model_config(BACKBONE, as_json=True)["config"]
    assert cfg["name"] == BACKBONE and cfg["input"][0]["dims"] == ["28", "28"]
    with pytest.raises(InferenceServerException) as ei:
        g.get_model_metadata("other")
    assert ei.value.status() == "StatusCode.NOT_FOUND" and "unknown model" in ei.value.message()


def test_infer_matches_http_and_shares_sessions(both):
    srv, g = both
    with srv.client(headers=AUTH) as c:
        want = [p["label"] for p in c.post("/v1/predict", json={"instances": [arr(x) for x in XS]}).json()["predictions"]]
        assert c.post("/v1/sessions", json={"rule": "prototype", "classes": ["a", "b"], "id": "g1"}).status_code == 201
    r = g.infer(BACKBONE, [image(XS)], headers=AUTH)
    assert [v.decode() for v in r.as_numpy("label")] == want
    r8 = g.infer(BACKBONE, [image(XS.astype(np.uint8), "UINT8")], headers=AUTH)
    np.testing.assert_array_equal(r8.as_numpy("label"), r.as_numpy("label"))
    # adapt over gRPC with a label tensor, then the session answers over HTTP and gRPC
    lab = tg.InferInput("label", [2], "BYTES")
    lab.set_data_from_numpy(np.array([b"b", b"a"], dtype=np.object_))
    a = g.infer(BACKBONE, [image(XS), lab], parameters={"session_id": "g1"}, headers=AUTH)
    params = a.get_response(as_json=True)["parameters"]
    assert params["session_version"]["int64_param"] == "1" and params["applied"]["int64_param"] == "2"
    assert a.as_numpy("correct").shape == (2,)
    with srv.client(headers=AUTH) as c:
        assert c.get("/v1/sessions/g1").json()["version"] == 1
    p = g.infer(BACKBONE, [image(XS)], parameters={"session_id": "g1", "top_k": 2}, headers=AUTH,
                outputs=[tg.InferRequestedOutput("top_k_label"), tg.InferRequestedOutput("label")])
    assert [o.name for o in p.get_response().outputs] == ["top_k_label", "label"]
    assert [v.decode() for v in p.as_numpy("label")] == ["b", "a"] and p.as_numpy("top_k_label").shape == (2, 2)
    # sequence_id names the session too
    s = g.infer(BACKBONE, [image(XS)], sequence_id="g1", headers=AUTH)
    assert [v.decode() for v in s.as_numpy("label")] == ["b", "a"]


def test_auth_and_errors(both):
    _, g = both
    cases = [
        ({}, [image(XS)], {}, "StatusCode.UNAUTHENTICATED"),
        (AUTH, [image(np.zeros((1, 28, 27), np.float32))], {}, "StatusCode.INVALID_ARGUMENT"),
        (AUTH, [image(XS)], {"parameters": {"session_id": "nobody"}}, "StatusCode.NOT_FOUND"),
        (AUTH, [image(XS)], {"model_version": "3"}, "StatusCode.NOT_FOUND"),
        (AUTH, [image(XS)], {"parameters": {"colour": "red"}}, "StatusCode.INVALID_ARGUMENT"),
    ]
    for headers, inputs, kw, status in cases:
        with pytest.raises(InferenceServerException) as ei:
            g.infer(BACKBONE, inputs, headers=headers, **kw)
        assert ei.value.status() == status, (kw, ei.value.message())
        assert ei.value.message()


def test_serve_refuses_grpc_port_without_the_extra(monkeypatch, capsys):
    from server import cli

    real = cli._find
    monkeypatch.setattr(cli, "_find", lambda m: None if m.startswith(("grpc", "tritonclient")) else real(m))
    assert cli.main(["serve", "--random-init", "--grpc-port", "0"]) == 2
    assert "pip install 'fwserve[grpc]'" in capsys.readouterr().err

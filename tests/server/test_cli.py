"""The `fwserve` command line: settings from flags and environment, dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from server import cli
from server.config import Settings


def test_serve_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
        assert "FWSERVE_" + name.upper() in out, name
    for flag in ("--host", "--port", "--backbone", "--weights", "--device", "--random-init",
                 "--max-batch-size", "--max-wait-ms", "--max-device-sessions", "--max-host-sessions"):
        assert flag in out


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("FWSERVE_PORT", "9001")
    monkeypatch.setenv("FWSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FWSERVE_RANDOM_INIT", "true")
    s = cli.settings_from_args(["--port", "9002", "--backbone", "vit_small_patch16_224", "--max-wait-ms", "0.5"])
    assert s.port == 9002 and s.max_batch_size == 7 and s.random_init is True
    assert s.backbone == "vit_small_patch16_224" and s.max_wait_ms == 0.5
    s = cli.settings_from_args(["--no-random-init", "--weights", "w.safetensors"])
    assert s.random_init is False and s.weights == Path("w.safetensors")


def test_invalid_settings_exit_2(capsys, monkeypatch):
    assert cli.main(["serve", "--max-batch-size", "0"]) == 2
    assert cli.main(["serve", "--random-init", "--weights", "x.pth"]) == 2
    assert cli.main(["serve", "--backbone", "nope"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert cli.main(["serve", "--weights", "/does/not/exist.safetensors"]) == 2
    assert cli.main(["bogus"]) == 2


def test_train_backbone_dispatches_to_the_training_tool(monkeypatch):
    seen = {}
    fake = types.ModuleType("eval.train_backbone")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    import eval as tools

    monkeypatch.setitem(sys.modules, "eval.train_backbone", fake)
    monkeypatch.setattr(tools, "train_backbone", fake, raising=False)
    assert cli.main(["train-backbone", "--epochs", "1", "--out", "x"]) == 0
    assert seen["argv"] == ["--epochs", "1", "--out", "x"]


def test_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


def test_serve_subprocess_boots_and_stops(tmp_path):
    """`fwserve serve` in its own process: ready over HTTP, clean exit on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FWSERVE_SNAPSHOT_DIR": str(tmp_path / "snap"), "FWSERVE_LOG_LEVEL": "info",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--random-init", "--port", str(port),
                             "--max-device-sessions", "4", "--torch-threads", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"]})
        assert r.status_code == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    log.close()
    out = (tmp_path / "serve.log").read_text()
    assert rc in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a graceful shutdown
    assert "Application shutdown complete" in out, out

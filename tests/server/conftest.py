"""Live servers for the server tests: the real app under uvicorn on a free port, in a thread.

One backbone (the bundled MNIST ViT; seeded random weights where the bundled file is absent)
is loaded once per test session and shared by every app, so each server starts in well under
a second.
"""

from __future__ import annotations

import re
import socket
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from server.api import create_app
from server.config import Settings
from server.threaded import ThreadedServer

BACKBONE = "fwserve-mnist-vit"


@pytest.fixture(scope="session")
def backbone():
    from models import bundled_weights, load_backbone

    return load_backbone(BACKBONE, random_init=bundled_weights(BACKBONE) is None)


class LiveServer(ThreadedServer):
    """The app under uvicorn in a thread (server/threaded.py), with what tests read of it."""

    def __init__(self, app) -> None:
        super().__init__(app)
        self.engine = app.state.engine

    def start(self, timeout: float = 60.0) -> "LiveServer":
        return super().start(timeout, why=lambda: self.engine.load_error)

    def stop(self) -> None:
        super().stop(join_s=15)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def metric(self, text_name: str, labels: str = "") -> float:
        """Sum of the samples `text_name{...labels...}` in a fresh scrape."""
        text = httpx.get(self.url + "/metrics").text
        return metric_value(text, text_name, labels)


def metric_value(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(part in (m.group(1) or "") for part in labels.split(",") if part):
            total += float(m.group(2))
    return total


class ProcessServer:
    """`fwserve serve` in its own process (for `--api-workers N`: HTTP worker processes in front of
    one engine process), with the settings given as FWSERVE_* variables. What tests may use of it
    is what goes over HTTP: url, client(), metric(); it has no in-process engine."""

    engine = None

    def __init__(self, tmp_path, **settings) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FWSERVE_")}
        env.update({f"FWSERVE_{k.upper()}": _env_value(v) for k, v in
                    {"port": self.port, "torch_threads": 1, "log_level": "warning", **settings}.items()})
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.log = tmp_path / f"server-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def start(self, timeout: float = 120.0) -> "ProcessServer":
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not become ready:\n" + self.log.read_text()[-3000:])
                time.sleep(0.1)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)

    client = LiveServer.client
    metric = LiveServer.metric


def _env_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@contextmanager
def live_server(backbone, tmp_path, api_workers: int = 1, **overrides):
    """A real server on a free port: in this process (uvicorn in a thread, sharing `backbone`; the
    batches on a worker thread unless batch_runner says otherwise), or with api_workers > 1 as
    `fwserve serve --api-workers N` in its own process tree (its engine process's batches on a
    worker thread: what `auto` picks behind API workers)."""
    if api_workers > 1:
        srv = ProcessServer(tmp_path, api_workers=api_workers, snapshot_dir=tmp_path / "snapshots",
                            **{"max_wait_ms": 5.0, **overrides}).start()
        try:
            yield srv
        finally:
            srv.stop()
        return
    # what runs the batches is fixed here: `auto` would follow the torch thread count, which in this
    # process depends on the tests that ran before; suites that want the loop ask for it
    settings = Settings(snapshot_dir=tmp_path / "snapshots",
                        **{"max_wait_ms": 5.0, "batch_runner": "thread", **overrides})
    srv = LiveServer(create_app(settings, backbone=backbone)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(backbone, tmp_path_factory):
    """A server with default settings (small limits where a test needs them)."""
    with live_server(backbone, tmp_path_factory.mktemp("srv"), max_wait_ms=10.0) as srv:
        yield srv


def digits(n: int, seed: int = 0, size: int = 28) -> list[np.ndarray]:
    """n distinct random 'images' (uint8 values as float arrays [size, size])."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size)).astype(np.float32) for _ in range(n)]


def arr(x: np.ndarray) -> dict:
    return {"array": x.tolist()}

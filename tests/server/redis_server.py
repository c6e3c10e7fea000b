"""A real ``redis-server`` for the store tests, on a free port, with the settings fwserve
documents for ``--durability wal``: ``appendonly yes`` and ``appendfsync always`` (a write is
answered after its AOF fsync). Tests that need it skip when the binary is absent (CI installs
the Debian package redis-server)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server not installed (Debian/Ubuntu: apt-get install redis-server); CI installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> "RedisProcess":
        import redis

        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "redis.log", "wb")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"],
            stdout=self.log, stderr=subprocess.STDOUT)
        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                if r.ping():
                    break
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: " + (self.dir / "redis.log").read_text())
            time.sleep(0.05)
        r.close()
        return self

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as r:
            r.flushall()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if REDIS is None:
        pytest.skip("redis-server not installed (Debian/Ubuntu: apt-get install redis-server); CI installs it")
    srv = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean database on the shared test redis-server."""
    redis_server.flush()
    return redis_server.url

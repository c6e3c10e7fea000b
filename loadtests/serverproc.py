"""Start and stop a real fwserve server for load tests: ``python -m server.cli serve`` on a free
loopback port, its disk tier in a temporary directory, its log in a file.

    with ServerProcess("--random-init", "--max-batch-size", "1") as srv:
        srv.url, srv.pid, srv.rss_bytes()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_bytes(pid: int) -> Optional[int]:
    """Resident memory of a process (Linux /proc), None when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ServerProcess:
    def __init__(self, *args: str, port: Optional[int] = None, env: Optional[dict] = None,
                 python: str = sys.executable, log_path: Optional[str] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fwserve-lt-")
        args = list(args)
        if "--snapshot-dir" not in args:
            args += ["--snapshot-dir", str(Path(self._tmp.name) / "snapshots")]
        if "--log-level" not in args:
            args += ["--log-level", "warning"]
        self.cmd = [python, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or str(Path(self._tmp.name) / "server.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def rss_bytes(self) -> Optional[int]:
        return rss_bytes(self.proc.pid) if self.proc else None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=str(ROOT), env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        elif self.proc is not None:
            rc = self.proc.returncode
        if getattr(self, "_log", None):
            self._log.close()
        return rc

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

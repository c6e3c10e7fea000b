"""An ASGI app served by uvicorn in a thread of this process, on a free loopback port.

For what talks to a real server over HTTP without a subprocess: the tests, the evaluation's
`--served` mode and guard evaluation, the durability benchmark. `fwserve serve` itself runs
uvicorn on the main thread (server/cli.py, server/workers.py).

    with ThreadedServer(app).start() as srv:
        httpx.get(srv.url + "/v2/health/ready")
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import httpx
import uvicorn

READY_PATH = "/v2/health/ready"


class ThreadedServer:
    def __init__(self, app, *, log_level: str = "warning", graceful_s: float = 5.0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_s))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0, why: Callable[[], object] = lambda: "") -> ThreadedServer:
        """Start serving and wait until READY_PATH answers 200; RuntimeError (with why()) when it
        does not within `timeout` seconds or the server thread ends."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                try:
                    if c.get(READY_PATH).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or not self.thread.is_alive():
                    self.stop()
                    raise RuntimeError(f"server did not become ready: {why()}")
                time.sleep(0.05)

    def stop(self, join_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(join_s)
        self.sock.close()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""``fwserve serve --api-workers N``: N HTTP worker processes in front of one engine process.

    main process                      the engine (backbone, batcher, sessions, kernels) and an
                                      EngineServer on a Unix socket; supervises the workers
    worker process x N (spawned)      uvicorn + the API (auth, validation, decoding); a
                                      RemoteEngine stands in for the engine

The workers share the HTTP port (and the gRPC one) with SO_REUSEPORT, so the kernel spreads
connections over them. Decoding and preprocessing run in the workers, so they scale with N while
one engine batches everything. What must be one across workers is: sessions, versions,
idempotency and session quotas (in the engine), tenants' request rates (token buckets in shared
memory, server/api/auth.py), and metrics (each worker's in prometheus_client's multiprocess
files, joined to the engine's on every /metrics).

A worker that dies is replaced. SIGTERM (or SIGINT) stops the workers first — each finishes its
in-flight requests within --shutdown-grace-s, the engine still answering them — then the engine
drains its queue, writes its sessions and exits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("fwserve")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def _die_with_parent(parent: int) -> None:
    """A worker outlives no engine: the kernel kills it when the supervising process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request took hold
        os._exit(1)


def worker_main(settings_json: str, address: str, buckets, parent: int) -> None:
    """One API worker process: uvicorn on the shared port, the API over a RemoteEngine."""
    _die_with_parent(parent)
    import uvicorn

    from server import logs
    from server.api.app import create_worker_app
    from server.config import Settings

    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_level, settings.log_format)
    sock = reuse_port_socket(settings.host, settings.port)
    app = create_worker_app(settings, address, buckets)
    gc.collect()
    gc.freeze()  # the app lives as long as the process: full collections need not walk it
    config = uvicorn.Config(app, log_level=settings.log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_grace())
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, settings, engine) -> None:
        self.settings, self.engine = settings, engine
        self.n = settings.api_workers
        self.dir = Path(tempfile.mkdtemp(prefix="fwserve-"))
        self.address = f"ipc://{self.dir / 'engine.sock'}"
        self.metrics_dir = self.dir / "metrics"
        self.metrics_dir.mkdir()
        self.ctx = mp.get_context("spawn")
        self.workers: list[Optional[mp.Process]] = [None] * self.n
        self.stopping = threading.Event()

    def run(self) -> int:
        from server.api.auth import SharedBuckets

        s = self.settings
        port_holder = reuse_port_socket(s.host, s.port)  # keeps the port ours while workers come and go
        if s.port == 0:
            s = self.settings = s.model_copy(update={"port": port_holder.getsockname()[1]})
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)  # seen by the workers only
        self.buckets = SharedBuckets(self.ctx, s)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        from server.engine.remote import EngineServer

        self.engine.start()
        server = EngineServer(self.engine, self.address)
        for i in range(self.n):
            self._spawn(i)
        watcher = threading.Thread(target=self._watch, name="fwserve-workers", daemon=True)
        watcher.start()
        log.info("serving on %s:%d with %d API workers and one engine", s.host, s.port, self.n,
                 extra={"event": "workers_started", "workers": self.n, "port": s.port})
        try:
            loop.run_until_complete(self._main(server, stop))
        finally:
            self.stopping.set()
            server.close()
            self.engine.stop()  # drains the queue, writes the sessions
            port_holder.close()
            loop.close()
        return 0

    async def _main(self, server, stop: asyncio.Event) -> None:
        """Serve the workers until asked to stop; then stop them while still answering their
        last requests, and only then stop answering."""
        done = asyncio.Event()
        serving = asyncio.create_task(server.serve(done))
        await stop.wait()
        self.stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self._stop_workers)
        done.set()
        await serving

    def _spawn(self, i: int) -> None:
        p = self.ctx.Process(target=worker_main, name=f"fwserve-api-{i}", daemon=False,
                             args=(self.settings.model_dump_json(), self.address, self.buckets, os.getpid()))
        p.start()
        self.workers[i] = p

    def _watch(self) -> None:
        from prometheus_client import multiprocess

        while not self.stopping.wait(0.5):
            for i, p in enumerate(self.workers):
                if p is not None and not p.is_alive() and not self.stopping.is_set():
                    log.warning("API worker %d (pid %d) exited with %s; starting another", i, p.pid, p.exitcode,
                                extra={"event": "worker_replaced", "worker": i, "exitcode": p.exitcode})
                    multiprocess.mark_process_dead(p.pid, str(self.metrics_dir))
                    self._spawn(i)

    def _stop_workers(self) -> None:
        for p in self.workers:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes in-flight requests within the grace period
        deadline = time.monotonic() + self.settings.shutdown_grace() + 5
        for p in self.workers:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)


def serve(settings) -> int:
    from server.engine import Engine

    engine = Engine(settings)
    engine.owns_process = True
    return Supervisor(settings, engine).run()

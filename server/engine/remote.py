"""The engine in another process: ``EngineServer`` runs beside the engine, ``RemoteEngine`` stands
in for it in each API worker process (``fwserve serve --api-workers N``; server/workers.py).

They speak ZeroMQ over a Unix socket: a worker's DEALER sends ``[request id, method, header,
*buffers]`` and the engine's ROUTER answers ``[request id, b"ok" | b"err", header, *buffers]``
(server/engine/wire.py: JSON headers, tensors and bytes as raw frames, never copied into JSON).
Every public coroutine of ``Engine`` is callable this way, so the API code is the same whether
its engine is in its process or not; the worker also asks for readiness and for the engine's
metrics. Many requests are in flight on one socket at once; each worker has one.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from typing import Optional

import zmq
import zmq.asyncio

from server.engine import wire
from server.engine.engine import Engine
from server.engine.messages import ModelInfo
from server.errors import internal, not_ready

log = logging.getLogger("fwserve.engine")

# every public coroutine of the engine, plus what a worker needs to know of it
METHODS = frozenset(n for n, f in inspect.getmembers(Engine, inspect.iscoroutinefunction) if not n.startswith("_"))
STATUS, SCRAPE = "status", "scrape"
# Frames are received as copies (bytes): for the small messages of the hot path a copy costs less
# than zero-copy's per-frame bookkeeping (a round trip here: ~200 us of CPU copied, ~270 us not).
# A message is sent zero-copy only when one of its buffers is at least this large.
ZERO_COPY_BYTES = 1 << 16


def _zero_copy(frames) -> bool:
    return any(memoryview(f).nbytes >= ZERO_COPY_BYTES for f in frames[3:])


class EngineServer:
    """Answers the API workers' calls with the engine in this process, on this process's event loop."""

    def __init__(self, engine: Engine, address: str) -> None:
        self.engine, self.address = engine, address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, stop: asyncio.Event) -> None:
        reader = asyncio.create_task(self._receive())
        try:
            await stop.wait()
        finally:
            reader.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _receive(self) -> None:
        # a plain receive loop: waiting on the stop event beside every receive would cost a
        # wait() per message on the engine's loop
        while True:
            frames = await self.sock.recv_multipart(copy=True)
            task = asyncio.create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames) -> None:
        ident, rid, method, header, rest = frames[0], frames[1], frames[2].decode(), frames[3], frames[4:]
        try:
            if method == STATUS:
                e = self.engine
                value = {"ready": e.ready, "load_error": e.load_error, "model": e.model if e.ready else None}
            elif method == SCRAPE:
                value = self.engine.metrics.scrape()
            elif method in METHODS:
                args, kwargs = wire.decode(header, rest)
                value = await getattr(self.engine, method)(*args, **kwargs)
            else:
                raise internal(f"the engine has no call {method!r}")
            out, buffers = wire.encode(value)
            reply = [ident, rid, b"ok", out, *buffers]
        except Exception as e:  # a domain error travels as itself; anything else as an internal one
            if not hasattr(e, "code"):
                log.exception("engine call %s failed", method)
            reply = [ident, rid, b"err", wire.encode_error(e)]
        await self.sock.send_multipart(reply, copy=not _zero_copy(reply))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class _RemoteMetrics:
    """What the API reads of the engine's metrics object in a worker: nothing is kept here."""

    registry = None


class RemoteEngine:
    """The engine as an API worker sees it: the same calls, answered by the engine process."""

    remote = True

    def __init__(self, settings, address: str) -> None:
        from models import get_config

        self.settings, self.address = settings, address
        self.input_config = get_config(settings.backbone)
        self.metrics = _RemoteMetrics()
        self.ready = False
        self.load_error: Optional[str] = None
        self._model: Optional[ModelInfo] = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.ctx: Optional[zmq.asyncio.Context] = None

    # ---- lifecycle (called on the worker's event loop) --------------------------------------

    def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for f in self._waiting.values():
            if not f.done():
                f.set_exception(not_ready(1.0, "the engine connection closed"))
        if self.ctx is not None:
            self.sock.close(0)
            self.ctx.term()

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:  # the engine process loads itself
        return self.ready

    def check_ready(self) -> None:
        if not self.ready:
            raise not_ready(self.settings.retry_after_s, self.load_error or "the engine is still loading")

    @property
    def model(self) -> ModelInfo:
        return self._model

    # ---- calls ------------------------------------------------------------------------------

    def __getattr__(self, name: str):
        if name in METHODS:
            async def call(*args, **kwargs):
                return await self._call(name, args, kwargs)
            return call
        raise AttributeError(name)

    async def scrape(self) -> bytes:
        return await self._call(SCRAPE, (), {})

    async def _call(self, method: str, args: tuple, kwargs: dict):
        rid = next(self._ids)
        header, buffers = wire.encode((list(args), kwargs))
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            frames = [rid.to_bytes(8, "little"), method.encode(), header, *buffers]
            await self.sock.send_multipart(frames, copy=not _zero_copy(frames))
            return await fut
        finally:
            self._waiting.pop(rid, None)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=True)
            rid = int.from_bytes(frames[0], "little")
            fut = self._waiting.get(rid)
            if fut is None or fut.done():  # its caller gave up
                continue
            if frames[1] == b"ok":
                try:
                    fut.set_result(wire.decode(frames[2], frames[3:]))
                except Exception as e:  # pragma: no cover - a malformed answer
                    fut.set_exception(e)
            else:
                fut.set_exception(wire.decode_error(frames[2]))

    async def _watch(self) -> None:
        """Readiness and the model's description, asked of the engine: often until it is ready,
        then now and then (an engine that stops answering makes the worker not ready)."""
        while True:
            try:
                st = await asyncio.wait_for(self._call(STATUS, (), {}), 5.0)
                self.ready, self.load_error, self._model = st["ready"], st["load_error"], st["model"]
            except (asyncio.TimeoutError, Exception) as e:  # noqa: B014 - any failure means "not ready"
                self.ready, self.load_error = False, f"the engine does not answer ({type(e).__name__})"
            await asyncio.sleep(2.0 if self.ready else 0.2)

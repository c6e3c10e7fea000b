"""The engine in another process: ``EngineServer`` runs beside the engine, ``RemoteEngine`` stands
in for it in each API worker process (``fwserve serve --api-workers N``; server/workers.py).

They speak ZeroMQ over a Unix socket: a worker's DEALER sends ``[request id, method, header,
*buffers]`` and the engine's ROUTER answers ``[request id, b"ok" | b"err", header, *buffers]``
(server/engine/wire.py: JSON headers, tensors and bytes as raw frames, never copied into JSON).
Every public coroutine of ``Engine`` is callable this way, so the API code is the same whether
its engine is in its process or not; the worker also asks for readiness and for the engine's
metrics. Many requests are in flight on one socket at once; each worker has one. Both sides
drive their socket from their event loop with a ``Channel``: a reader callback per wake-up and
non-blocking sends, no future or task per message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
from typing import Callable, Optional

import zmq

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


class Channel:
    """A plain ZeroMQ socket driven by an asyncio loop: every message that arrives is handed to
    `on_message` from one reader callback, and sends never wait (a message the socket cannot
    take now is queued and sent when it can). zmq.asyncio makes a future, and here a task, per
    message; on the hot path, several messages per micro-batch each way, that bookkeeping cost
    more than the messages.

    ZMQ_FD is edge-triggered: it signals a change, not a level. So each wake-up drains the
    socket until it would block, and after every send (which may consume the edge of a message
    that arrived meanwhile) ZMQ_EVENTS is checked and a drain scheduled when input is waiting."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None]) -> None:
        self.sock, self.on_message = sock, on_message
        self.loop = asyncio.get_running_loop()
        self._out: collections.deque = collections.deque()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._retry: Optional[asyncio.TimerHandle] = None  # one pending retry of the queued sends
        self.loop.add_reader(self._fd, self._drain)
        self._schedule()

    def send(self, frames: list) -> None:
        if not self._out and self._try_send(frames):
            if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._schedule()
            return
        self._out.append(frames)
        self._schedule()

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        with contextlib.suppress(RuntimeError, ValueError):  # the loop is closed already
            self.loop.remove_reader(self._fd)
        self.sock.close(0)

    def _try_send(self, frames: list) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=not _zero_copy(frames))
            return True
        except zmq.Again:
            return False

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        while True:
            while self._out and self._try_send(self._out[0]):
                self._out.popleft()
            events = sock.getsockopt(zmq.EVENTS)
            if not events & zmq.POLLIN:
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:  # pragma: no cover - EVENTS said there was one
                break
            try:
                self.on_message(frames)
            except Exception:  # a handler's bug must not stop the channel
                log.exception("engine channel: a message handler failed")
        if self._out and self._retry is None:  # the peer is not taking messages now: try again soon
            self._retry = self.loop.call_later(0.001, self._retry_sends)

    def _retry_sends(self) -> None:
        self._retry = None
        self._schedule()


class EngineServer:
    """Answers the API workers' calls with the engine in this process, on this process's event loop."""

    def __init__(self, engine: Engine, address: str) -> None:
        self.engine, self.address = engine, address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self._tasks: set[asyncio.Task] = set()
        self._channel: Optional[Channel] = None

    async def serve(self, stop: asyncio.Event) -> None:
        self._channel = Channel(self.sock, self._received)
        try:
            await stop.wait()
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _received(self, frames: list) -> None:
        task = asyncio.ensure_future(self._answer(frames))
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
        self._channel.send(reply)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        else:
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
        self.ctx: Optional[zmq.Context] = None
        self._channel: Optional[Channel] = None

    # ---- lifecycle (called on the worker's event loop) --------------------------------------

    def start(self) -> None:
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._channel = Channel(sock, self._received)
        self._tasks = [asyncio.get_running_loop().create_task(self._watch())]

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for f in self._waiting.values():
            if not f.done():
                f.set_exception(not_ready(1.0, "the engine connection closed"))
        if self.ctx is not None:
            self._channel.close()
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
            self._channel.send([rid.to_bytes(8, "little"), method.encode(), header, *buffers])
            return await fut
        finally:
            self._waiting.pop(rid, None)

    def _received(self, frames: list) -> None:
        fut = self._waiting.get(int.from_bytes(frames[0], "little"))
        if fut is None or fut.done():  # its caller gave up
            return
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

"""What every route shares: settings, the engine, auth, the decoder and its thread pool."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import Request

from server.api import access
from server.api.auth import Auth, Principal
from server.api.decode import Decoder
from server.api.hot import HotRoutes
from server.api.metrics import ApiMetrics, workers_scrape
from server.config import Settings
from server.engine import Engine
from server.errors import invalid, overloaded, timed_out


def fingerprint(content) -> str:
    """A request's identity for Idempotency-Key checks: its parsed content, canonically encoded
    (JSON key order, spacing and the wire encoding do not count)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Api:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.auth = Auth(settings)
        self.hot = HotRoutes()  # the routes Guard serves past the framework (server/api/hot.py)
        self.decoder = Decoder(engine.input_config, settings.max_image_pixels, settings.max_instances,
                               settings.max_request_pixels, int(settings.recent_images_mb * 2**20))
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="fwserve-decode")
        # in one process the HTTP metrics join the engine's registry (one scrape); a worker keeps its own
        local = getattr(engine.metrics, "registry", None) if not getattr(engine, "remote", False) else None
        self.metrics = ApiMetrics(local)
        self._decoding = 0  # requests waiting for or in the decode pool (event-loop side only)

    async def who(self, request: Request) -> Principal:
        """The request's principal, authenticated by the guard before the body was read; then
        readiness (503)."""
        p = request.state.principal
        sid = request.path_params.get("session_id")  # session routes; bodies name theirs in the route
        access.record(request).update(key_id=p.key_id, session_key=p.key(sid) if isinstance(sid, str) else None)
        self.engine.check_ready()
        return p

    def deadline(self, request: Request) -> float:
        """When the request's time is up (monotonic): --request-timeout-s after it arrived."""
        return request.state.arrival + self.settings.request_timeout_s

    def inline(self, raw: bytes) -> bool:
        """Decode this body on the event loop? Small ones: a hop to the pool costs more than they do."""
        return len(raw) <= self.settings.decode_inline_bytes

    async def decode(self, fn, *args, deadline: Optional[float] = None, inline: bool = False):
        """Run a decode, in the pool (or right here when `inline`). The pool's queue is bounded (503
        beyond it) and a request whose time ran out while it waited is answered 504 before
        anything is queued."""
        if inline:
            return fn(*args)
        if self._decoding >= self.settings.max_decode_queue:
            raise overloaded(self.settings.retry_after_s, "the decode queue is full; retry later")
        self._decoding += 1
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.decode_pool, lambda: fn(*args))
        finally:
            self._decoding -= 1
        if deadline is not None and time.monotonic() > deadline:
            raise timed_out(self.settings.request_timeout_s)
        return out

    def check_count(self, n: int, what: str) -> None:
        if n > self.settings.max_instances:
            raise invalid("too_many_instances", f"{n} {what}; at most {self.settings.max_instances} per request")

    def check_top_k(self, k: int) -> None:
        if k > self.settings.max_top_k:
            raise invalid("invalid_top_k", f"top_k={k}; at most {self.settings.max_top_k}")

    async def scrape(self) -> bytes:
        """/metrics: the engine's registry, with the HTTP metrics of every process serving HTTP."""
        if getattr(self.engine, "remote", False):
            return await self.engine.scrape() + workers_scrape()
        return self.engine.metrics.scrape()

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

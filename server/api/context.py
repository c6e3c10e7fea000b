"""What every route shares: settings, the engine, auth, the decoder and its thread pool."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from server.api import access
from server.api.auth import Auth, Principal
from server.api.decode import Decoder
from server.config import Settings
from server.engine import Engine
from server.errors import invalid


class Api:
    """What the routes share: settings, the engine, auth, the decoder and its thread pool."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.auth = Auth(settings)
        self.decoder = Decoder(engine.input_config, settings.max_image_pixels, settings.max_instances)
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="fwserve-decode")

    def who(self, request: Request) -> Principal:
        """The request's tenant (401/403), within its rate limit (429); then readiness (503)."""
        p = self.auth.authenticate(request.headers)
        sid = request.path_params.get("session_id")  # session routes; bodies name theirs in the route
        access.record(request).update(key_id=p.key_id, session_key=p.key(sid) if isinstance(sid, str) else None)
        self.engine.check_ready()
        return p

    async def decode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, lambda: fn(*args))

    def check_count(self, n: int, what: str) -> None:
        if n > self.settings.max_instances:
            raise invalid("too_many_instances", f"{n} {what}; at most {self.settings.max_instances} per request")

    def check_top_k(self, k: int) -> None:
        if k > self.settings.max_top_k:
            raise invalid("invalid_top_k", f"top_k={k}; at most {self.settings.max_top_k}")

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

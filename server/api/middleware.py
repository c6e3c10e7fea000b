"""ASGI middleware: before any route runs, in this order — authentication and the tenant's rate
limit (headers only: an unknown client never makes the server read its body), the body-size
limit, the content type; and the request duration metric by route template. The principal and
the request's arrival time travel to the routes in ``scope["state"]``."""

from __future__ import annotations

import time
from email.message import Message
from typing import Optional

from fastapi.responses import JSONResponse
from starlette.routing import Match

from server.api.errors import ApiError, payload_too_large, unsupported_media_type


def needs_auth(path: str) -> bool:
    """Routes that act on sessions or run the model; health, metadata and metrics stay open."""
    return path.startswith("/v1/") or (path.startswith("/v2/models/") and path.endswith("/infer"))


class Guard:
    def __init__(self, app, max_body_bytes: int, request_duration, auth) -> None:
        self.app, self.max_body_bytes, self.request_duration, self.auth = app, max_body_bytes, request_duration, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        status = [500]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            err = None
            if needs_auth(scope["path"]):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                try:
                    state["principal"] = self.auth.authenticate(headers)
                except ApiError as e:
                    err = e
            body = b""
            if err is None:
                body, err = await self._read(scope, receive)
            if err is not None:
                scope["route"] = _match(scope)
                resp = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
                return await resp(scope, receive, send_)
            replayed = [False]

            async def receive_():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_, send_)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.request_duration.labels(route=path, method=scope["method"], status=str(status[0])).observe(
                time.perf_counter() - start)

    async def _read(self, scope, receive) -> tuple[bytes, Optional[ApiError]]:
        limit = self.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", payload_too_large(limit)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", payload_too_large(limit)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and scope["method"] in ("POST", "PUT", "PATCH"):
            err = _content_type_error(scope["path"], headers.get("content-type"))
            if err is not None:
                return body, err
        return body, None


def _match(scope):
    """The route a rejected request was meant for (for the metric's route label)."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] == Match.FULL:
            return route
    return None


def _content_type_error(path: str, content_type: Optional[str]) -> Optional[ApiError]:
    m = Message()
    m["content-type"] = content_type or ""
    ctype = m.get_content_type() if content_type else ""
    if path.endswith("/import"):
        if ctype != "application/octet-stream":
            return unsupported_media_type(
                f"content type must be application/octet-stream (a session export), got {content_type!r}")
        return None
    if ctype != "application/json" and not ctype.endswith("+json"):
        return unsupported_media_type(f"content type must be application/json, got {content_type!r}")
    return None

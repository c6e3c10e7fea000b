"""ASGI middleware, before any route runs, in this order: the request id; authentication and the
tenant's rate limit (headers only: an unknown client never makes the server read its body); the
body-size limit; the content type. After the response: the request duration metric by route
template and the access log line. The principal and the request's arrival time travel to the
routes in ``scope["state"]``.

Content types: ``PUT .../import`` takes ``application/octet-stream`` (a session export);
``POST /v2/.../infer`` takes JSON, the binary tensor extension (``application/octet-stream``
with ``Inference-Header-Content-Length``) or no content type at all (read as JSON, as the
protocol's clients send it); every other body is JSON. Compressed bodies (``Content-Encoding``)
are refused with 415.
"""

from __future__ import annotations

import time
from email.message import Message
from typing import Optional

from fastapi.responses import JSONResponse
from starlette.routing import Match

from server.api.access import REQUEST_ID_HEADER, SCOPE_KEY, AccessRecord, request_id
from server.api.errors import ApiError, is_v2, payload_too_large, unsupported_media_type
from server.api.hot import HotRoutes


def needs_auth(path: str) -> bool:
    """Routes that act on sessions or run the model; health, metadata and metrics stay open."""
    return path.startswith("/v1/") or (path.startswith("/v2/models/") and path.endswith("/infer"))


class Guard:
    def __init__(self, app, max_body_bytes: int, request_duration, auth, hot: Optional[HotRoutes] = None) -> None:
        self.app, self.max_body_bytes, self.request_duration, self.auth = app, max_body_bytes, request_duration, auth
        self.hot = hot or HotRoutes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rec = scope[SCOPE_KEY] = AccessRecord(request_id(headers.get(REQUEST_ID_HEADER.lower())))
        rid = rec.request_id.encode("latin-1")
        status = [500]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", ()), (b"x-request-id", rid)]}
            await send(msg)

        try:
            err = None
            if needs_auth(scope["path"]):
                try:
                    state["principal"] = p = self.auth.authenticate(headers)
                    rec.update(key_id=p.key_id)
                except ApiError as e:
                    err = e
            body = b""
            if err is None:
                body, err = await self._read(scope, receive, headers)
            if err is not None:
                scope["route"] = _match(scope)
                resp = JSONResponse(err.body(scope["path"]), status_code=err.status, headers=err.response_headers())
                return await resp(scope, receive, send_)
            replayed = [False]

            async def receive_():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            hot = self.hot.find(scope)
            if hot is not None:
                return await self.hot.serve(hot, scope, receive_, send_)
            await self.app(scope, receive_, send_)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            self.request_duration.labels(route=path, method=scope["method"], status=str(status[0])).observe(elapsed)
            rec.emit(scope["method"], path, status[0], elapsed)

    async def _read(self, scope, receive, headers: dict[str, str]) -> tuple[bytes, Optional[ApiError]]:
        limit = self.max_body_bytes
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
            encoding = headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                return body, unsupported_media_type(f"Content-Encoding {encoding!r} is not supported; send the body "
                                                    "uncompressed")
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
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if path.endswith("/import"):
        if ctype != "application/octet-stream":
            return unsupported_media_type(
                f"content type must be application/octet-stream (a session export), got {content_type!r}")
        return None
    if is_v2(path) and path.endswith("/infer"):
        if not ctype or is_json or ctype == "application/octet-stream":
            return None
        return unsupported_media_type("content type must be application/json, application/octet-stream (binary "
                                      f"tensor extension) or none, got {content_type!r}")
    if path in BINARY_ROUTES:
        if is_json or ctype == "application/octet-stream":
            return None
        return unsupported_media_type("content type must be application/json or application/octet-stream (raw "
                                      f"tensor bytes with X-Shape), got {content_type!r}")
    if not is_json:
        return unsupported_media_type(f"content type must be application/json, got {content_type!r}")
    return None


BINARY_ROUTES = ("/v1/predict", "/v1/adapt")  # take raw tensor bytes too (server/api/v1.py)

"""The access log: one structured record per request (HTTP and gRPC), on the ``fwserve.access``
logger.

The guard (middleware.py) opens a record when a request arrives and logs it when the response
has gone; routes add what only they know (``record(request).update(...)``): the caller's key id,
the session (hashed: a session id may be personal, a log line must not be), the rows decoded and
the time the job waited in the engine's queue. Fields of a line:

    request_id  X-Request-ID as sent (1..128 visible ASCII characters), else a generated one;
                returned in the response's X-Request-ID header
    method, route, status, latency_ms   route: the route template (/v1/sessions/{session_id})
    key_id      the API key's id (auth.Tenant.key_id); absent with auth off
    session     the first 12 hex digits of sha256(session key); absent without a session
    rows        instances in the request; queue_ms: the engine queue wait of its job

Health probes and /metrics log at DEBUG, everything else at INFO.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("fwserve.access")

REQUEST_ID_HEADER = "X-Request-ID"
SCOPE_KEY = "fwserve.access"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
QUIET_ROUTES = ("/v2/health/live", "/v2/health/ready", "/metrics")


def request_id(given: Optional[str]) -> str:
    """The client's request id when it is a sane one, else a new one."""
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def session_hash(key: Optional[str]) -> Optional[str]:
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class AccessRecord:
    request_id: str
    key_id: Optional[str] = None
    session: Optional[str] = None  # hashed
    rows: Optional[int] = None
    queue_seconds: Optional[float] = None

    def update(self, *, key_id: Optional[str] = None, session_key: Optional[str] = None,
               rows: Optional[int] = None, queue_seconds: Optional[float] = None) -> None:
        if key_id is not None:
            self.key_id = key_id
        if session_key is not None:
            self.session = session_hash(session_key)
        if rows is not None:
            self.rows = rows
        if queue_seconds is not None:
            self.queue_seconds = queue_seconds

    def emit(self, method: str, route: str, status: int, latency_s: float, protocol: str = "http") -> None:
        fields = {"event": "access", "protocol": protocol, "request_id": self.request_id, "method": method,
                  "route": route, "status": status, "latency_ms": round(latency_s * 1000, 3)}
        for name in ("key_id", "session", "rows"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.queue_seconds is not None:
            fields["queue_ms"] = round(self.queue_seconds * 1000, 3)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        log.log(level, "%s %s %d %.1fms", method, route, status, latency_s * 1000, extra=fields)


def record(request) -> AccessRecord:
    """The access record of a Starlette request (a detached one when the guard did not open one)."""
    rec = request.scope.get(SCOPE_KEY)
    if rec is None:
        rec = request.scope[SCOPE_KEY] = AccessRecord(request_id(None))
    return rec

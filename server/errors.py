"""Error type and JSON error envelope.

Every error response is ``{"error": {"code": <str>, "message": <str>}}``; 4xx when the client
is at fault, 503 when the server is overloaded or not ready, 504 on timeout, 500 otherwise.
Code that knows nothing of HTTP (batcher, store) raises ``ApiError`` too: it only carries a
status and a code, and app.py turns it into the response.
"""

from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def invalid(code: str, message: str) -> ApiError:
    """Well-formed JSON whose content is wrong (shape, label, values): 422."""
    return ApiError(422, code, message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


def session_not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"unknown session {session_id!r}")


def conflict(code: str, message: str) -> ApiError:
    return ApiError(409, code, message)


def overloaded(retry_after_s: int, message: str = "request queue is full; retry later") -> ApiError:
    return ApiError(503, "overloaded", message, headers={"Retry-After": str(retry_after_s)})


def not_ready(retry_after_s: int) -> ApiError:
    return ApiError(
        503, "not_ready", "the backbone is still loading", headers={"Retry-After": str(retry_after_s)}
    )


def too_many_requests(code: str, message: str, retry_after_s: float) -> ApiError:
    return ApiError(429, code, message, headers={"Retry-After": str(max(1, int(-(-retry_after_s // 1))))})


def quota_exceeded(quota: int, retry_after_s: float) -> ApiError:
    return too_many_requests("session_quota", f"the tenant holds its quota of {quota} sessions; delete one first",
                             max(1.0, retry_after_s))


def idempotency_reused() -> ApiError:
    return ApiError(422, "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request; use a new key for a new request")


def version_conflict(session_id: str) -> ApiError:
    """Another replica advanced the session first; this request was not applied."""
    return ApiError(503, "version_conflict", f"session {session_id!r} changed on another replica; the request was "
                    "not applied, retry it", headers={"Retry-After": "0"})


def store_unavailable(detail) -> ApiError:
    return ApiError(503, "store_unavailable", f"the session store failed ({detail}); the request was not "
                    "acknowledged: retry it, with the same Idempotency-Key", headers={"Retry-After": "1"})


def unauthorized(message: str = "missing or unknown API key (Authorization: Bearer KEY or X-API-Key)") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def timeout(seconds: float) -> ApiError:
    return ApiError(504, "timeout", f"request was not served within {seconds:g} s and was dropped")


# status -> default code for errors raised by Starlette/FastAPI themselves
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

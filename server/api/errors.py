"""The one table from errors to HTTP: status codes, headers and the JSON error envelope.

Domain errors (server/errors.py) are raised below the API without any status; ``ApiError``
is for what only HTTP knows (authentication, body limits, content types, routing).

Error bodies, chosen by route prefix: ``/v2`` (the Open Inference Protocol) answers
``{"error": "<message>"}``, as the protocol's clients parse it; every other route answers
``{"error": {"code": <str>, "message": <str>}}``. Both carry the code in the
``X-Fwserve-Error-Code`` header too. gRPC (server/api/v2/grpc_service.py) maps the same statuses
to gRPC status codes through ``GRPC_STATUS``.
"""

from __future__ import annotations

from typing import Optional

from server.errors import (
    Conflict, DomainError, Internal, InvalidInput, NotFound, QuotaExceeded, TimedOut, Unavailable,
)

STATUS_OF: dict[type, int] = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    QuotaExceeded: 429,
    Unavailable: 503,
    TimedOut: 504,
    Internal: 500,
}


class ApiError(Exception):
    """An error only the HTTP layer knows, with its status."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self, path: str = "") -> dict:
        return error_body(self.code, self.message, path)

    def response_headers(self) -> dict[str, str]:
        return {**self.headers, CODE_HEADER: self.code}


V2_PREFIX = "/v2"
CODE_HEADER = "X-Fwserve-Error-Code"


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str, path: str = "") -> dict:
    """The error body of a route: the protocol's plain message on /v2, the code+message envelope elsewhere."""
    if is_v2(path):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def status_of(e: DomainError) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def retry_after_header(seconds: Optional[float]) -> dict[str, str]:
    if seconds is None:
        return {}
    return {"Retry-After": str(max(0, int(-(-seconds // 1))))}


def from_domain(e: DomainError) -> ApiError:
    return ApiError(status_of(e), e.code, e.message, retry_after_header(e.retry_after))


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(message: str = "missing or unknown API key (Authorization: Bearer KEY or X-API-Key)") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, "model_not_found", f"unknown model {name!r}; this server serves {served!r}")


def version_not_found(name: str, version: str) -> ApiError:
    return ApiError(404, "model_version_not_found", f"model {name!r} has no version {version!r}; it serves version 1")


def too_many_requests(code: str, message: str, retry_after_s: float) -> ApiError:
    return ApiError(429, code, message, headers=retry_after_header(max(1.0, retry_after_s)))


def payload_too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body is over {limit} bytes")


def unsupported_media_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


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


# HTTP status -> gRPC status code name (grpc.StatusCode[...]) for the same error over gRPC
GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

"""Domain errors: what went wrong, in the words of the server's domain, never as an HTTP status.

Every layer below the API (engine, sessions, rules) raises these. Each carries a stable
machine-readable ``code`` and a human ``message``; errors the client may retry carry
``retry_after`` (seconds). The API layer alone maps them to status codes and bodies
(server/api/errors.py), so the same engine could sit behind another protocol.
"""

from __future__ import annotations

from typing import Optional


class DomainError(Exception):
    """Base class. `retry_after`: seconds after which a retry may succeed (None: do not retry)."""

    def __init__(self, code: str, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


class InvalidInput(DomainError):
    """The request's content is wrong (shape, label, values, settings); nothing was changed."""


class NotFound(DomainError):
    """An unknown session (or model)."""


class Conflict(DomainError):
    """The request contradicts the current state (an id that exists, a full store)."""


class QuotaExceeded(DomainError):
    """The caller holds its quota; retry after freeing some or later."""


class Unavailable(DomainError):
    """The server cannot serve this now (overloaded, loading, the store failed, a race with
    another replica); the request was not applied and may be retried."""


class TimedOut(DomainError):
    """The request waited too long for its micro-batch and was dropped without being applied."""


class Internal(DomainError):
    """A fault of the server's own (a kernel or device error) that failed this request; what it
    was meant to change was not changed."""


# ---- constructors used across layers (one wording per situation) --------------------------------


def invalid(code: str, message: str) -> InvalidInput:
    return InvalidInput(code, message)


def session_not_found(session_id: str) -> NotFound:
    return NotFound("session_not_found", f"unknown session {session_id!r}")


def conflict(code: str, message: str) -> Conflict:
    return Conflict(code, message)


def quota_exceeded(quota: int, retry_after_s: float) -> QuotaExceeded:
    return QuotaExceeded("session_quota", f"the tenant holds its quota of {quota} sessions; delete one first",
                         max(1.0, retry_after_s))


def idempotency_reused() -> InvalidInput:
    return InvalidInput("idempotency_key_reused",
                        "this Idempotency-Key was used with a different request; use a new key for a new request")


def overloaded(retry_after_s: float, message: str = "request queue is full; retry later") -> Unavailable:
    return Unavailable("overloaded", message, retry_after_s)


def not_ready(retry_after_s: float, message: str = "the backbone is still loading") -> Unavailable:
    return Unavailable("not_ready", message, retry_after_s)


def shutting_down() -> Unavailable:
    return Unavailable("shutting_down", "the server is shutting down", None)


def version_conflict(session_id: str) -> Unavailable:
    """Another replica advanced the session first; this request was not applied."""
    return Unavailable("version_conflict", f"session {session_id!r} changed on another replica; the request was "
                       "not applied, retry it", 0.0)


def store_unavailable(detail) -> Unavailable:
    return Unavailable("store_unavailable", f"the session store failed ({detail}); the request was not "
                       "acknowledged: retry it, with the same Idempotency-Key", 1.0)


def store_in_doubt(detail) -> Unavailable:
    """The store failed while this adapt was being made durable, and could not say whether it was."""
    return Unavailable("store_in_doubt", f"the session store failed while this adapt was being saved ({detail}); "
                       "it may or may not have been applied: retry it with the same Idempotency-Key, which "
                       "answers the first response if it was", 1.0)


def diverged(session_id: str) -> InvalidInput:
    return InvalidInput("diverged", f"this update would make the head of session {session_id!r} non-finite "
                        "(NaN or Inf); it was not applied: lower the learning rate or check the inputs")


def internal(message: str = "the server failed to run this request; nothing was changed") -> Internal:
    return Internal("internal", message)


def timed_out(seconds: float) -> TimedOut:
    return TimedOut("timeout", f"request was not served within {seconds:g} s and was dropped")

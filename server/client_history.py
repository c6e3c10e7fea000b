"""The client calls of a session's history and guard (a part of server/client.py's clients).

    c.versions(sid)                         # VersionList: the retained versions, newest first
    c.predict(images, session_id=sid, version=3)
    c.rollback(sid, 3)                      # RolledBack {id, version (new), rolled_back_to}
    c.fork(sid, new_id="copy", version=3)   # SessionInfo of the new session
    c.patch_session(sid, guard={"action": "rollback"}, frozen=False)

Rollback and fork carry an ``Idempotency-Key`` (the given one, else a fresh one per call, the
same on its retries), so a retried call changes nothing twice.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlencode

from server.api.schemas import RolledBack, SessionInfo, VersionList


def _model(cls):
    return lambda r: cls.model_validate(r.json())


class HistoryCalls:
    """Mixed into the clients, which provide ``_session_call``."""

    def _session_call(self, method: str, sid: str, path: str, parse, body=None, key: Any = False) -> Any:
        raise NotImplementedError  # pragma: no cover - the clients implement it

    def versions(self, session_id: str, limit: int = 100, before: Optional[int] = None):
        """-> VersionList {session_id, version, retained_from, versions (newest first)}"""
        q = urlencode({k: v for k, v in (("limit", limit), ("before", before)) if v is not None})
        return self._session_call("GET", session_id, f"/versions?{q}", _model(VersionList))

    def rollback(self, session_id: str, version: int, idempotency_key: Optional[str] = None):
        """-> RolledBack {id, version (the new one), rolled_back_to}: version's state made current"""
        return self._session_call("POST", session_id, "/rollback", _model(RolledBack), {"version": version},
                                  idempotency_key)

    def fork(self, session_id: str, new_id: Optional[str] = None, version: Optional[int] = None,
             idempotency_key: Optional[str] = None):
        """-> SessionInfo of a new session from a retained version (default: the current one)"""
        body = {k: v for k, v in (("id", new_id), ("version", version)) if v is not None}
        return self._session_call("POST", session_id, "/fork", _model(SessionInfo), body, idempotency_key)

    def patch_session(self, session_id: str, guard: Any = ..., frozen: Optional[bool] = None):
        """-> SessionInfo. `guard`: a dict sets or replaces it, None removes it, absent leaves it;
        `frozen`: False unfreezes, True freezes."""
        body: dict[str, Any] = {}
        if guard is not ...:
            body["guard"] = guard
        if frozen is not None:
            body["frozen"] = frozen
        return self._session_call("PATCH", session_id, "", _model(SessionInfo), body)

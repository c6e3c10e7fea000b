"""The /v1 routes of a session's history and guard.

    GET    /v1/sessions/{id}/versions    retained versions, newest first (?limit=1..1000, ?before=N):
                                         version, time, kind, examples, labelled, key_id, by,
                                         source, prequential so far, what the guard did
    POST   /v1/sessions/{id}/rollback    {version} -> 200 {id, version (new), rolled_back_to}
    POST   /v1/sessions/{id}/fork        {id?, version?} -> 201 the new session's info
    PATCH  /v1/sessions/{id}             {guard?: {...} | null, frozen?: bool} -> the session's info

A predict at a version is ``POST /v1/predict`` with ``version`` (server/api/v1.py). Rollback and
fork take an ``Idempotency-Key``: a retry answers the first response (``Idempotent-Replayed:
true``) and changes nothing again. A version that never existed or is no longer retained is 404
(``version_not_found``, ``version_not_retained``); another tenant's session is 404 like an unknown
one; bad guard settings are 422 ``invalid_guard``; an adapt of a frozen session is 409
``session_frozen``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from fastapi import Depends, FastAPI, Query, Response

from server.api.auth import Principal
from server.api.context import Api, fingerprint
from server.api.schemas import ForkRequest, RollbackRequest, RolledBack, SessionInfo, SessionPatch, VersionList
from server.api.v1 import REPLAYED, IdemKey, SessionId
from server.engine import SessionPatch as Patch


def add_routes(app: FastAPI, api: Api) -> None:
    engine = api.engine
    who = api.who

    @app.get("/v1/sessions/{session_id}/versions", response_model=VersionList, tags=["sessions"])
    async def list_versions(session_id: str = SessionId, p: Principal = Depends(who),
                            limit: int = Query(100, ge=1, le=1000), before: Optional[int] = Query(None, ge=0)):
        """The session's retained versions, newest first, with who applied each (API key id)."""
        entries, floor, current = await engine.session_versions(p.key(session_id), limit, before)
        return {"session_id": session_id, "version": current, "retained_from": floor, "versions": entries}

    @app.post("/v1/sessions/{session_id}/rollback", response_model=RolledBack, tags=["sessions"])
    async def rollback(body: RollbackRequest, response: Response, session_id: str = SessionId,
                       p: Principal = Depends(who), idempotency_key: Optional[str] = IdemKey):
        """Make a retained version's state current as a new version (durable before it answers)."""
        idem = None
        if idempotency_key is not None:
            idem = (idempotency_key, fingerprint({"rollback": session_id, "version": body.version}))
        answer, replayed = await engine.rollback_session(p.key(session_id), body.version, p.key_id, idem)
        if replayed:
            response.headers[REPLAYED] = "true"
        return answer

    @app.post("/v1/sessions/{session_id}/fork", status_code=201, response_model=SessionInfo, tags=["sessions"])
    async def fork(body: ForkRequest, response: Response, session_id: str = SessionId, p: Principal = Depends(who),
                   idempotency_key: Optional[str] = IdemKey):
        """A new session (in the caller's tenant, within its quota) from a retained version."""
        idem = None
        if idempotency_key is not None:
            idem = (idempotency_key, fingerprint({"fork": session_id, **body.model_dump(mode="json")}))
        info, replayed = await engine.fork_session(p.key(session_id), body.version, body.id, p.tenant,
                                                   p.max_sessions, p.key_id, idem)
        if replayed:
            response.headers[REPLAYED] = "true"
        return dataclasses.asdict(info)

    @app.patch("/v1/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def patch_session(body: SessionPatch, session_id: str = SessionId, p: Principal = Depends(who)):
        """Set, replace or remove the guard; unfreeze (or freeze) the session."""
        given = "guard" in body.model_fields_set
        guard = body.guard.model_dump(exclude_unset=True) if given and body.guard is not None else None
        info = await engine.patch_session(p.key(session_id), Patch(given, guard, body.frozen))
        return dataclasses.asdict(info)

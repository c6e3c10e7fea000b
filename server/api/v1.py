"""The /v1 routes: sessions, predict, adapt, admin.

    POST   /v1/sessions                 {rule, classes?, hyperparameters?, id?, init?} -> 201 {id, version}
    GET    /v1/sessions                 the caller's sessions in id order: ?limit=1..1000 (100), ?cursor=
                                        (next_cursor of the page before), ?rule=, ?tier=device|host|disk
    GET    /v1/sessions/{id}            rule, hyper-parameters, classes, version, examples_seen,
                                        prequential {correct, total, accuracy}, tier, created/updated
    POST   /v1/sessions/{id}/reset      head, state and statistics back to the start, as a new version
    GET    /v1/sessions/{id}/versions, POST .../rollback, .../fork, PATCH /v1/sessions/{id}:
                                        history, rollback, fork, guard (server/api/versions.py)
    DELETE /v1/sessions/{id}            204
    GET    /v1/sessions/{id}/export     application/octet-stream: safetensors (W, b, rule state)
                                        with the session's metadata under "fwserve"
    PUT    /v1/sessions/{id}/import     body = an export (application/octet-stream); 201 new, 200 replaced
    POST   /v1/predict                  {session_id? | support?, instances, top_k?, version?} -> predictions,
                                        the version that answered (version: a retained one; changes nothing)
    POST   /v1/adapt                    {session_id, instances with label} -> version, applied,
                                        pre-update (prequential) predictions, update_seconds
    GET    /v1/admin/tenants            admin key: tenants, their sessions and quotas
    GET    /v1/rules                    every rule: description, hyper-parameters, labels needed, learned,
                                        available here (a learned rule: trained for this backbone) or why not

Idempotency: ``Idempotency-Key: <1..255 chars>`` on POST /v1/sessions and POST /v1/adapt. A
retry with the same key (and the same body) answers the first response with
``Idempotent-Replayed: true`` and applies nothing again; the same key with another body is
422 ``idempotency_key_reused``. Keys are kept --idempotency-ttl-s (per session: the last
--idempotency-max-keys of them), with the session: in its snapshots and log records, so a
retry after a restart, or on another replica, is recognised too.

Consistency: every applied adapt is +1 version (so is a reset, import or rollback: a version
names one state for the life of a session id); an adapt acknowledged before a predict is sent
is visible to it; adapts of one session are applied in arrival order, none lost. A rejected
request (any 4xx) changes nothing; an adapt request is all-or-nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response

from server.api import access
from server.api.binary import parse_headers
from server.api.bodies import adapt_response, json_response, parse, predict_response, request_body
from server.api.context import Api, fingerprint
from server.api.auth import Principal
from server.api.errors import forbidden
from server.api.hot import IDEMPOTENCY_CHECK, IDEMPOTENCY_KEY, IDEMPOTENCY_LIMITS, header_param
from server.api.schemas import (
    AdaptRequest, AdaptResponse, PredictRequest, PredictResponse, RuleList, SessionCreate, SessionCreated,
    SessionInfo, SessionList,
)
from server.engine import AdaptJob, EpisodicJob, PredictJob
from server.errors import invalid
from server.keys import SESSION_ID_PATTERN

SessionId = Path(..., pattern=SESSION_ID_PATTERN, max_length=128)
IdemKey = Header(None, alias=IDEMPOTENCY_KEY, **IDEMPOTENCY_LIMITS,
                 description="a retry with the same key returns the first response and applies nothing again")
REPLAYED = "Idempotent-Replayed"
MAX_PAGE = 1000


def encode_cursor(session_id: str) -> str:
    """A page's cursor: opaque to clients (the last id of the page, base64url)."""
    return base64.urlsafe_b64encode(session_id.encode()).decode().rstrip("=")


def is_binary(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/octet-stream"


def decode_cursor(cursor: str) -> str:
    try:
        after = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        after = ""
    if not after:
        raise invalid("invalid_cursor", "cursor is not one this server gave out (next_cursor)")
    return after


def add_routes(app: FastAPI, api: Api) -> None:
    engine = api.engine
    who = api.who

    # ---- sessions ---------------------------------------------------------------------------

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated, tags=["sessions"])
    async def create_session(body: SessionCreate, response: Response, p: Principal = Depends(who),
                             idempotency_key: Optional[str] = IdemKey):
        idem = None
        if idempotency_key is not None:
            idem = (idempotency_key, fingerprint(body.model_dump(mode="json")))
        guard = body.guard.model_dump(exclude_unset=True) if body.guard is not None else None
        info, replayed = await engine.create_session(body.rule, body.classes, body.hyperparameters, body.init,
                                                     body.id, p.tenant, p.max_sessions, idem, guard, p.key_id)
        if replayed:
            response.headers[REPLAYED] = "true"
            return {"id": info.id, "version": 0}
        return {"id": info.id, "version": info.version}

    @app.get("/v1/rules", response_model=RuleList, tags=["sessions"])
    async def list_rules(p: Principal = Depends(who)):
        """The adaptation rules a session (or an episodic head) may use, and which this server can run."""
        return {"rules": [dataclasses.asdict(r) for r in await engine.rules()]}

    @app.get("/v1/sessions", response_model=SessionList, tags=["sessions"])
    async def list_sessions(p: Principal = Depends(who), limit: int = Query(100, ge=1, le=MAX_PAGE),
                            cursor: Optional[str] = Query(None, max_length=256),
                            rule: Optional[str] = Query(None, max_length=64),
                            tier: Optional[Literal["device", "host", "disk"]] = None):
        """The caller's sessions (its tenant's only), in id order, one page at a time."""
        after = decode_cursor(cursor) if cursor is not None else None
        page, more = await engine.list_sessions(p.tenant, after, limit, rule, tier)
        return {"sessions": [dataclasses.asdict(i) for i in page],
                "next_cursor": encode_cursor(page[-1].id) if more and page else None}

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def get_session(session_id: str = SessionId, p: Principal = Depends(who)):
        return dataclasses.asdict(await engine.get_session(p.key(session_id)))

    @app.post("/v1/sessions/{session_id}/reset", response_model=SessionCreated, tags=["sessions"])
    async def reset_session(session_id: str = SessionId, p: Principal = Depends(who)):
        info = await engine.reset_session(p.key(session_id), p.key_id)
        return {"id": info.id, "version": info.version}

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
    async def delete_session(session_id: str = SessionId, p: Principal = Depends(who)):
        await engine.delete_session(p.key(session_id))
        return Response(status_code=204)

    @app.get("/v1/sessions/{session_id}/export", tags=["sessions"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def export_session(session_id: str = SessionId, p: Principal = Depends(who)):
        data = await engine.export_session(p.key(session_id))
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.safetensors"'})

    @app.put("/v1/sessions/{session_id}/import", response_model=SessionInfo, tags=["sessions"],
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}})
    async def import_session(request: Request, response: Response, session_id: str = SessionId,
                             p: Principal = Depends(who)):
        info, created = await engine.import_session(p.key(session_id), await request.body(), p.max_sessions,
                                                    p.key_id)
        response.status_code = 201 if created else 200
        return dataclasses.asdict(info)

    @app.get("/v1/admin/tenants", tags=["admin"])
    async def admin_tenants(p: Principal = Depends(who)):
        """Admin key only: every configured tenant with its session count and quotas."""
        if not p.admin:
            raise forbidden("an admin key is needed")
        tenants = api.auth.tenants()
        n = await engine.tenant_counts(tenants)
        return {"tenants": [{"tenant": t, "sessions": n[t], "max_sessions": api.auth.quota(t),
                             "rps": api.auth.rps(t)} for t in tenants]}

    # ---- predict / adapt --------------------------------------------------------------------

    # predict and adapt answer both their framework routes (below: the OpenAPI document, any other
    # method) and the hot routes Guard serves directly (server/api/hot.py)

    async def predict(request: Request, p: Principal):
        raw = await request.body()
        deadline, budget, rec = api.deadline(request), api.decoder.budget(), access.record(request)
        inline = api.inline(raw)
        if is_binary(request):
            b = parse_headers(request.headers, adapt=False)
            api.check_top_k(b.top_k)
            inputs = await api.decode(api.decoder.tensor, b.datatype, b.shape, raw, "body", budget,
                                      deadline=deadline, inline=inline)
            job = PredictJob(inputs, session=p.key(b.session_id), top_k=b.top_k, tenant=p.tenant, deadline=deadline,
                             version=b.version)
            session_id = b.session_id
        else:
            body = parse(PredictRequest, raw)
            api.check_count(len(body.instances), "instances")
            api.check_count(len(body.support or ()), "support examples")
            api.check_top_k(body.top_k)
            inputs = await api.decode(api.decoder.instances, body.instances, "instances", budget, deadline=deadline,
                                      inline=inline)
            session_id = body.session_id
            if body.support is None:
                job = PredictJob(inputs, session=p.key(body.session_id), top_k=body.top_k, tenant=p.tenant,
                                 deadline=deadline, version=body.version)
            else:
                support = await api.decode(api.decoder.instances, body.support, "support", budget, deadline=deadline,
                                           inline=inline)
                job = EpisodicJob(inputs, support, [s.label for s in body.support], body.rule, body.hyperparameters,
                                  body.classes, body.steps, body.top_k, tenant=p.tenant, deadline=deadline)
        rec.update(session_key=p.key(session_id), rows=len(inputs))
        res = await engine.predict(job)
        rec.update(queue_seconds=res.queue_seconds)
        return json_response(predict_response(res))

    async def adapt(request: Request, p: Principal, idempotency_key: Optional[str]):
        raw = await request.body()
        deadline, rec = api.deadline(request), access.record(request)
        inline = api.inline(raw)
        if is_binary(request):
            b = parse_headers(request.headers, adapt=True)
            inputs = await api.decode(api.decoder.tensor, b.datatype, b.shape, raw, "body", api.decoder.budget(),
                                      deadline=deadline, inline=inline)
            session_id, labels = b.session_id, b.labels
        else:
            body = parse(AdaptRequest, raw)
            api.check_count(len(body.instances), "instances")
            inputs = await api.decode(api.decoder.instances, body.instances, deadline=deadline, inline=inline)
            session_id, labels = body.session_id, [i.label for i in body.instances]
        idem = None
        if idempotency_key is not None:  # the request as content: JSON or binary, key order and spacing do not count
            idem = (idempotency_key, fingerprint({"session_id": session_id,
                                                  "instances": [[x.key, y] for x, y in zip(inputs, labels)]}))
        rec.update(session_key=p.key(session_id), rows=len(inputs))
        res = await engine.adapt(AdaptJob(p.key(session_id), inputs, labels, idem, tenant=p.tenant, deadline=deadline,
                                          actor=p.key_id))
        rec.update(queue_seconds=res.queue_seconds)
        return json_response(adapt_response(res), headers={REPLAYED: "true"} if res.replayed else None)

    @app.post("/v1/predict", response_model=PredictResponse, tags=["inference"], name="predict",
              openapi_extra=request_body(PredictRequest, binary=True))
    async def predict_route(request: Request, p: Principal = Depends(who)):
        """Predict with a session's head (or the base head, or an episodic head adapted on `support`).
        The body is JSON (PredictRequest) or raw tensor bytes (server/api/binary.py)."""
        return await predict(request, p)

    @app.post("/v1/adapt", response_model=AdaptResponse, tags=["inference"], name="adapt",
              openapi_extra=request_body(AdaptRequest, binary=True))
    async def adapt_route(request: Request, p: Principal = Depends(who), idempotency_key: Optional[str] = IdemKey):
        """Adapt a session on labelled (or, for label-free rules, unlabelled) instances; answers the
        predictions made before the update. JSON (AdaptRequest) or raw tensor bytes."""
        return await adapt(request, p, idempotency_key)

    async def predict_hot(request: Request):
        return await predict(request, await who(request))

    async def adapt_hot(request: Request):
        p = await who(request)  # the framework solves the dependency before the header, too
        return await adapt(request, p, header_param(request, IDEMPOTENCY_KEY, IDEMPOTENCY_CHECK))

    api.hot.add("POST", "/v1/predict", predict_hot)
    api.hot.add("POST", "/v1/adapt", adapt_hot)

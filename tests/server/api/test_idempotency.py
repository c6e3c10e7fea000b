"""Idempotency-Key on session creation and adapt: a retry returns the first response and
applies nothing again, concurrently too, after a restart (wal), and keys expire."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from tests.server.conftest import arr, digits, live_server

XS = digits(4, seed=60)


def adapt_body(sid: str, i: int = 0, label: str = "a") -> dict:
    return {"session_id": sid, "instances": [{**arr(XS[i]), "label": label}]}


def post(c: httpx.Client, path: str, body: dict, key: str | None):
    headers = {"Idempotency-Key": key} if key else {}
    return c.post(path, content=json.dumps(body), headers={"content-type": "application/json", **headers})


def test_create_session_retry(server):
    with server.client() as c:
        body = {"rule": "sgd", "classes": ["a", "b"]}
        first = post(c, "/v1/sessions", body, "create-1")
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        again = post(c, "/v1/sessions", body, "create-1")
        assert again.status_code == 201 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        # the session moved on; the retry still answers the first response
        c.post("/v1/adapt", json=adapt_body(first.json()["id"]))
        assert post(c, "/v1/sessions", body, "create-1").json() == {"id": first.json()["id"], "version": 0}
        other = post(c, "/v1/sessions", {**body, "classes": ["x", "y"]}, "create-1")
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        # a key with an explicit id
        b2 = {**body, "id": "idem-explicit"}
        assert post(c, "/v1/sessions", b2, "create-2").status_code == 201
        assert post(c, "/v1/sessions", b2, "create-2").status_code == 201
        assert post(c, "/v1/sessions", b2, "create-3").status_code == 409  # another request, same id
        assert post(c, "/v1/sessions", b2, None).status_code == 409
        # a different key is a different request
        assert post(c, "/v1/sessions", body, "create-4").json()["id"] != first.json()["id"]


def test_adapt_retry_applies_once(server):
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"rule": "rls", "classes": ["a", "b"]}).json()["id"]
        first = post(c, "/v1/adapt", adapt_body(sid), "adapt-1")
        assert first.status_code == 200 and first.json()["version"] == 1
        exported = c.get(f"/v1/sessions/{sid}/export").content
        for _ in range(3):
            again = post(c, "/v1/adapt", adapt_body(sid), "adapt-1")
            assert again.status_code == 200 and again.json() == first.json()
            assert again.headers["idempotent-replayed"] == "true"
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 1
        assert c.get(f"/v1/sessions/{sid}/export").content == exported
        reused = post(c, "/v1/adapt", adapt_body(sid, 1, "b"), "adapt-1")
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
        assert post(c, "/v1/adapt", adapt_body(sid, 1, "b"), "adapt-2").json()["version"] == 2
        # a key is its tenant's: the same key on another session is refused, not applied there
        sid2 = c.post("/v1/sessions", json={"rule": "rls", "classes": ["a", "b"]}).json()["id"]
        other = post(c, "/v1/adapt", adapt_body(sid2), "adapt-1")
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        assert c.get(f"/v1/sessions/{sid2}").json()["version"] == 0
        # the same request with its JSON keys in another order and other spacing is the same request
        reordered = json.dumps({"instances": [{"label": "a", **arr(XS[0])}], "session_id": sid}, indent=1)
        again = c.post("/v1/adapt", content=reordered, headers={"content-type": "application/json",
                                                                "Idempotency-Key": "adapt-1"})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        # a rejected request is not remembered
        bad = post(c, "/v1/adapt", adapt_body(sid, 0, "zebra"), "adapt-3")
        assert bad.status_code == 422
        fixed = post(c, "/v1/adapt", adapt_body(sid, 0, "a"), "adapt-3")  # the corrected request goes through
        assert fixed.status_code == 200 and fixed.json()["version"] == 3
        for bad_key in ("", "x" * 256, "sp ace"):
            r = post(c, "/v1/adapt", adapt_body(sid), bad_key) if bad_key else c.post(
                "/v1/adapt", json=adapt_body(sid), headers={"Idempotency-Key": ""})
            assert r.status_code == 422, (bad_key, r.text)


WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "api-workers-2"])


@WORKERS
def test_concurrent_retries_apply_once(backbone, tmp_path, workers):
    with live_server(backbone, tmp_path, api_workers=workers, max_wait_ms=20.0) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                sid = (await c.post("/v1/sessions", json={"rule": "delta", "classes": ["a", "b"]})).json()["id"]
                body = json.dumps(adapt_body(sid))
                headers = {"content-type": "application/json", "Idempotency-Key": "burst"}
                rs = await asyncio.gather(*(c.post("/v1/adapt", content=body, headers=headers) for _ in range(16)))
                assert all(r.status_code == 200 for r in rs)
                assert {r.json()["version"] for r in rs} == {1}
                assert sum("idempotent-replayed" not in r.headers for r in rs) == 1
                assert (await c.get(f"/v1/sessions/{sid}")).json()["version"] == 1

        asyncio.run(main())


@WORKERS
def test_keys_survive_a_crash_in_wal_mode_and_expire(backbone, tmp_path, workers):
    ttl = 3.0 if workers == 1 else 60.0  # worker processes take seconds to start: the key must outlive that
    with live_server(backbone, tmp_path, api_workers=workers, durability="wal", idempotency_ttl_s=ttl) as srv, \
            srv.client() as c:
        sid = post(c, "/v1/sessions", {"rule": "sgd", "classes": ["a", "b"]}, "mk").json()["id"]
        first = post(c, "/v1/adapt", adapt_body(sid), "k1")
        assert first.json()["version"] == 1
        image = tmp_path / "image"
        shutil.copytree(tmp_path / "snapshots", image / "snapshots")  # what a kill -9 leaves
    with live_server(backbone, image, api_workers=workers, durability="wal", idempotency_ttl_s=ttl) as srv, \
            srv.client() as c:
        again = post(c, "/v1/adapt", adapt_body(sid), "k1")
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert post(c, "/v1/sessions", {"rule": "sgd", "classes": ["a", "b"]}, "mk").json() == {"id": sid, "version": 0}
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 1
        if workers > 1:
            return  # expiry is the engine's, checked with one process
        time.sleep(3.2)
        late = post(c, "/v1/adapt", adapt_body(sid), "k1")  # expired: a new request
        assert late.json()["version"] == 2 and "idempotent-replayed" not in late.headers


def test_a_key_is_the_tenants_on_create_too(server):
    with server.client() as c:
        body = {"rule": "sgd", "classes": ["a", "b"], "id": "tk-1"}
        assert post(c, "/v1/sessions", body, "tk").status_code == 201
        other = post(c, "/v1/sessions", {**body, "id": "tk-2"}, "tk")  # same key, another session
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        assert c.get("/v1/sessions/tk-2").status_code == 404


def test_answers_beyond_the_byte_budget_are_dropped_loudly(backbone, tmp_path):
    with live_server(backbone, tmp_path, idempotency_max_bytes=2048) as srv, srv.client() as c:
        sid = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"]}).json()["id"]
        for i in range(12):
            assert post(c, "/v1/adapt", adapt_body(sid), f"cap-{i}").status_code == 200
        assert post(c, "/v1/adapt", adapt_body(sid), "cap-11").headers.get("idempotent-replayed") == "true"
        assert srv.metric("fwserve_idempotency_evictions_total") > 0

"""GET /v1/sessions: the caller's sessions only, in id order, paginated by cursor, filtered by
rule and tier; with a directory or Redis store, the sessions this process does not hold too."""

from __future__ import annotations

import pytest

from server.api.auth import hash_key
from tests.server.conftest import arr, digits, live_server
from tests.server.redis_server import redis_server, redis_url  # noqa: F401 (fixtures)

KEYS = {"acme": "list-acme-key", "beta": "list-beta-key", "ops": "list-ops-key"}
LINES = "; ".join([f"acme {hash_key(KEYS['acme'])}", f"beta {hash_key(KEYS['beta'])}",
                   f"ops {hash_key(KEYS['ops'])} admin"])
X = digits(1, seed=170)[0]


def h(tenant: str, **extra) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}", **extra}


def all_pages(c, headers, **params) -> list[dict]:
    out, cursor = [], None
    for _ in range(50):
        q = {**params, **({"cursor": cursor} if cursor else {})}
        r = c.get("/v1/sessions", params=q, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["sessions"]) <= params.get("limit", 100)
        out += body["sessions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


def test_list_own_tenant_paginated_and_filtered(backbone, tmp_path):
    with live_server(backbone, tmp_path, api_keys=LINES, max_device_sessions=3, max_host_sessions=1) as srv, \
            srv.client() as c:
        for i, rule in enumerate(["sgd", "rls", "sgd", "prototype", "sgd"]):
            assert c.post("/v1/sessions", json={"rule": rule, "classes": ["a", "b"], "id": f"s{i}"},
                          headers=h("acme")).status_code == 201
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"], "id": "theirs"}, headers=h("beta"))
        c.post("/v1/adapt", json={"session_id": "s1", "instances": [{**arr(X), "label": "a"}]}, headers=h("acme"))
        listed = all_pages(c, h("acme"), limit=2)
        assert [s["id"] for s in listed] == ["s0", "s1", "s2", "s3", "s4"]
        assert {s["id"]: s["version"] for s in listed}["s1"] == 1
        assert set(listed[0]) == {"id", "rule", "classes", "init", "version", "tier", "created_at"}
        assert [s["id"] for s in all_pages(c, h("acme"), rule="sgd", limit=1)] == ["s0", "s2", "s4"]
        tiers = {s["id"]: s["tier"] for s in listed}
        assert set(tiers.values()) > {"device"}  # 3 device slots, 1 host, the rest on disk
        for tier in ("device", "host", "disk"):
            assert [s["id"] for s in all_pages(c, h("acme"), tier=tier)] == sorted(k for k, t in tiers.items()
                                                                                 if t == tier)
        assert [s["id"] for s in all_pages(c, h("beta"))] == ["theirs"]
        assert all_pages(c, h("ops")) == []
        assert [s["id"] for s in all_pages(c, h("ops", **{"X-Fwserve-Tenant": "beta"}))] == ["theirs"]
        assert c.get("/v1/sessions").status_code == 401
        for bad in ({"limit": 0}, {"limit": 1001}, {"cursor": "!!"}, {"tier": "gpu"}):
            r = c.get("/v1/sessions", params=bad, headers=h("acme"))
            assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message"}, bad


@pytest.mark.parametrize("store", ["directory", "redis"])
def test_list_sessions_the_process_does_not_hold(backbone, tmp_path, store, request):
    """After a restart nothing is held: the listing comes from the store (tier disk, the store's version)."""
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    kw = {"durability": "wal", **({"store": url} if url else {})}
    with live_server(backbone, tmp_path, api_keys=LINES, **kw) as srv, srv.client() as c:
        for sid, rule in (("b", "rls"), ("a", "sgd"), ("c", "delta")):
            c.post("/v1/sessions", json={"rule": rule, "classes": ["x", "y"], "id": sid}, headers=h("acme"))
        c.post("/v1/sessions", json={"rule": "sgd", "classes": ["x"], "id": "z"}, headers=h("beta"))
        for _ in range(2):  # logged adapts past the snapshot: the version comes from the store's head
            c.post("/v1/adapt", json={"session_id": "b", "instances": [{**arr(X), "label": "x"}]}, headers=h("acme"))
    with live_server(backbone, tmp_path, api_keys=LINES, **kw) as srv, srv.client() as c:
        listed = all_pages(c, h("acme"), limit=2)
        assert [(s["id"], s["rule"], s["version"], s["tier"]) for s in listed] == [
            ("a", "sgd", 0, "disk"), ("b", "rls", 2, "disk"), ("c", "delta", 0, "disk")]
        assert [s["id"] for s in all_pages(c, h("acme"), rule="rls")] == ["b"]
        c.get("/v1/sessions/a", headers=h("acme"))  # now held: answered from memory
        assert {s["id"]: s["tier"] for s in all_pages(c, h("acme"))}["a"] in ("host", "device")
        assert [s["id"] for s in all_pages(c, h("beta"))] == ["z"]

"""API keys, per-tenant namespaces, quotas, the admin key, and the warning when auth is off."""

from __future__ import annotations

import io
import sys

import pytest

from server import cli
from server.config import Settings
from server.api.auth import Auth, auth_warning, hash_key, parse_keys
from tests.server.conftest import arr, digits, live_server
from tests.server.redis_server import needs_redis, redis_server, redis_url  # noqa: F401 (fixtures)

KEYS = {"acme": "acme-key-0123", "beta": "beta-key-4567", "ops": "ops-admin-key-89", "slow": "slow-key-000"}
LINES = (f"acme {hash_key(KEYS['acme'])} sessions=2\n"
         f"# comment\nbeta {hash_key(KEYS['beta'])}\n"
         f"ops {hash_key(KEYS['ops'])} admin; slow {hash_key(KEYS['slow'])} rps=2")
X = digits(1, seed=70)[0]


def h(tenant: str, **extra) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}", **extra}


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "api-workers-2"])
def authed(backbone, tmp_path_factory, request):
    with live_server(backbone, tmp_path_factory.mktemp("auth"), api_workers=request.param, api_keys=LINES,
                     tenant_burst=4) as srv:
        yield srv


def test_keys_are_required(authed):
    with authed.client() as c:
        assert c.get("/v2/health/ready").status_code == 200  # probes and metrics stay open
        assert c.get("/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": "Basic x"}):
            r = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert c.post("/v1/predict", json={"instances": [arr(X)]}, headers=headers).status_code == 401
        r = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"], "id": "mine"},
                   headers={"X-API-Key": KEYS["acme"]})
        assert r.status_code == 201 and r.json()["id"] == "mine"


def test_tenants_see_only_their_own_sessions(authed):
    with authed.client() as c:
        for t in ("beta", "ops"):  # the same id in two namespaces
            assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "same"},
                          headers=h(t)).status_code == 201
        ad = {"session_id": "same", "instances": [{**arr(X), "label": "a"}]}
        assert c.post("/v1/adapt", json=ad, headers=h("beta")).json()["version"] == 1
        assert c.get("/v1/sessions/same", headers=h("ops")).json()["version"] == 0
        # acme reaches neither: 404 exactly like an id that does not exist
        for method, path, body in (("GET", "/v1/sessions/same", None), ("GET", "/v1/sessions/same/export", None),
                                   ("POST", "/v1/sessions/same/reset", None), ("DELETE", "/v1/sessions/same", None),
                                   ("POST", "/v1/adapt", ad),
                                   ("POST", "/v1/predict", {"session_id": "same", "instances": [arr(X)]})):
            r = c.request(method, path, json=body, headers=h("acme"))
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", (method, path)
            assert "beta" not in r.text and "ops" not in r.text
        infer = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32",
                             "data": X.reshape(-1).tolist()}], "parameters": {"session_id": "same"}}
        assert c.post("/v2/models/fwserve-mnist-vit/infer", json=infer, headers=h("acme")).status_code == 404
        r = c.post("/v2/models/fwserve-mnist-vit/infer", json=infer, headers=h("beta"))
        assert r.json()["parameters"] == {"session_id": "same", "session_version": 1}
        assert c.get("/v1/sessions/same", headers=h("beta")).json()["version"] == 1  # untouched by acme


def test_admin_acts_for_any_tenant(authed):
    with authed.client() as c:
        assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"], "id": "adm"},
                      headers=h("beta")).status_code == 201
        assert c.get("/v1/sessions/adm", headers=h("ops")).status_code == 404  # its own namespace by default
        r = c.get("/v1/sessions/adm", headers=h("ops", **{"X-Fwserve-Tenant": "beta"}))
        assert r.status_code == 200 and r.json()["id"] == "adm"
        r = c.get("/v1/sessions/adm", headers=h("acme", **{"X-Fwserve-Tenant": "beta"}))
        assert r.status_code == 403
        assert c.get("/v1/admin/tenants", headers=h("acme")).status_code == 403
        r = c.get("/v1/admin/tenants", headers=h("ops"))
        assert r.status_code == 200
        rows = {t["tenant"]: t for t in r.json()["tenants"]}
        assert set(rows) == {"acme", "beta", "ops", "slow"} and rows["acme"]["max_sessions"] == 2
        assert rows["slow"]["rps"] == 2
        assert rows["beta"]["sessions"] >= 2


def test_session_quota(authed):
    with authed.client() as c:
        n = c.get("/v1/admin/tenants", headers=h("ops")).json()["tenants"][0]["sessions"]
        for i in range(2 - n):
            assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"]}, headers=h("acme")).status_code == 201
        r = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"]}, headers=h("acme"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "session_quota" and "retry-after" in r.headers
        data = c.get("/v1/sessions/same/export", headers=h("beta")).content
        r = c.put("/v1/sessions/imported/import", content=data, headers=h("acme", **{
            "content-type": "application/octet-stream"}))
        assert r.status_code == 429
        assert c.delete("/v1/sessions/mine", headers=h("acme")).status_code == 204
        assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"]}, headers=h("acme")).status_code == 201


def test_rate_limit(authed):
    with authed.client() as c:
        codes = [c.get("/v1/sessions/none", headers=h("slow")) for _ in range(12)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        assert limited[0].json()["error"]["code"] == "rate_limited"
        assert int(limited[0].headers["retry-after"]) >= 1
        assert c.get("/v1/sessions/none", headers=h("acme")).status_code == 404  # others are not limited


@needs_redis
def test_quota_is_shared_through_redis(backbone, tmp_path, redis_url):
    lines = f"acme {hash_key(KEYS['acme'])} sessions=2"
    with live_server(backbone, tmp_path / "a", api_keys=lines, durability="wal", store=redis_url) as a, \
            live_server(backbone, tmp_path / "b", api_keys=lines, durability="wal", store=redis_url) as b, \
            a.client() as ca, b.client() as cb:
        body = {"rule": "sgd", "classes": ["a"]}
        assert ca.post("/v1/sessions", json=body, headers=h("acme")).status_code == 201
        assert cb.post("/v1/sessions", json=body, headers=h("acme")).status_code == 201
        assert ca.post("/v1/sessions", json=body, headers=h("acme")).status_code == 429
        assert cb.post("/v1/sessions", json=body, headers=h("acme")).status_code == 429


def test_parse_keys_and_errors(tmp_path):
    (t,) = parse_keys(f"x {hash_key('k')} sessions=3 rps=1.5 admin")
    assert (t.name, t.admin, t.max_sessions, t.rps) == ("x", True, 3, 1.5)
    assert len(parse_keys(f"a {hash_key('1')}; b {hash_key('2')}")) == 2
    for bad in ("a", "a plaintext-key", f"a/b {hash_key('k')}", f"a {hash_key('k')} sessions=-1",
                f"a {hash_key('k')} color=red", f"a {hash_key('k')} rps=nan"):
        with pytest.raises(ValueError):
            parse_keys(bad)
    with pytest.raises(ValueError, match="same key"):
        Auth(Settings(api_keys=f"a {hash_key('k')}\nb {hash_key('k')}"))
    f = tmp_path / "keys"
    f.write_text(LINES)
    auth = Auth(Settings(api_keys_file=f))
    assert auth.enabled and auth.tenants() == ["acme", "beta", "ops", "slow"]
    assert cli.main(["serve", "--api-keys", "acme plaintext"]) == 2
    assert cli.main(["serve", "--api-keys-file", str(tmp_path / "missing")]) == 2


def test_hash_key_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("s3cret")
    assert cli.main(["hash-key", "s3cret"]) == 2  # never on the command line


def test_loud_warning_without_auth_beyond_localhost():
    assert auth_warning(Settings()) is None
    assert auth_warning(Settings(host="0.0.0.0", api_keys=f"a {hash_key('k')}")) is None
    w = auth_warning(Settings(host="0.0.0.0"))
    assert w and "AUTH IS OFF" in w and "0.0.0.0" in w


def test_a_tenant_may_hold_two_keys_while_rotating(backbone, tmp_path):
    old, new = "acme-old-key", "acme-new-key"
    lines = f"acme {hash_key(old)} sessions=5 id=acme-2025\nacme {hash_key(new)} id=acme-2026"
    with live_server(backbone, tmp_path / "a", api_keys=lines) as srv, srv.client() as c:
        r = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"], "id": "shared"},
                   headers={"Authorization": f"Bearer {old}"})
        assert r.status_code == 201
        # the new key reaches the same sessions, under the same quota (given on the other line)
        assert c.get("/v1/sessions/shared", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert srv.app.state.api.auth.quota("acme") == 5
    # the old key's line removed: the old key is refused
    with live_server(backbone, tmp_path / "b", api_keys=lines.splitlines()[1]) as srv, srv.client() as c:
        assert c.get("/v1/sessions", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    with pytest.raises(ValueError, match="different max_sessions"):
        Auth(Settings(api_keys=f"acme {hash_key(old)} sessions=5\nacme {hash_key(new)} sessions=6"))


def test_the_feature_cache_is_kept_apart_per_tenant(authed):
    """Tenant B sending the image tenant A sent is a cache miss: the cache never tells one tenant,
    by an answer or by its timing, what another one sent."""
    img = {"instances": [arr(digits(1, seed=71)[0])]}
    with authed.client() as c:
        def misses():
            return authed.metric("fwserve_feature_cache_misses_total")

        m0 = misses()
        assert c.post("/v1/predict", json=img, headers=h("acme")).status_code == 200
        assert misses() == m0 + 1
        assert c.post("/v1/predict", json=img, headers=h("acme")).status_code == 200
        assert misses() == m0 + 1  # the same tenant: a hit
        assert c.post("/v1/predict", json=img, headers=h("beta")).status_code == 200
        assert misses() == m0 + 2

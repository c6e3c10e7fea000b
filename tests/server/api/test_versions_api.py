"""History, rollback, fork, predict at a version and guards over real HTTP: what the routes answer,
the audit (key ids, never keys), predictions at a version equal to solo predictions made back
then (also over the Open Inference Protocol), idempotent rollback, a guard tripping end to end
(response, metric, structured log event), exports with their history, a restart in wal mode, and
bad input (unknown version, version outside retention, another tenant's session, bad guard
settings, a frozen session, malformed bodies) answered 4xx with nothing changed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from safetensors.torch import load as st_load

from server.api.auth import hash_key
from server.client import Client, FwserveError
from server.sessions import codec
from tests.server.conftest import BACKBONE, arr, digits, live_server
from tests.server.redis_server import needs_redis, redis_server, redis_url  # noqa: F401 (fixtures)

KEYS = {"acme": "acme-secret-key-1", "beta": "beta-secret-key-2"}
LINES = f"acme {hash_key(KEYS['acme'])} sessions=3 id=acme-ci\nbeta {hash_key(KEYS['beta'])} id=beta-ci"
XS = digits(8, seed=90)


def _mnist_pairs() -> list[np.ndarray]:
    """Four real digits: a 0, a 1, another 0, another 1 (classes a head can tell apart)."""
    from models.data import load_mnist

    images, labels = load_mnist()
    zeros, ones = images[labels == 0], images[labels == 1]
    return [zeros[0], ones[0], zeros[1], ones[1]]


PAIRS = _mnist_pairs()


@pytest.fixture(scope="module")
def authed(backbone, tmp_path_factory):
    with live_server(backbone, tmp_path_factory.mktemp("versions"), api_keys=LINES, history_versions=4) as srv:
        yield srv


def client(srv, tenant: str) -> Client:
    return Client(srv.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def feed(c: Client, sid: str, n: int, flip: bool = False, start: int = 0) -> list:
    """n adapts of a 0 (label a) and a 1 (label b); `flip`: the labels swapped."""
    out = []
    for i in range(start, start + n):
        j = 2 * (i % 2)
        out.append(c.adapt(sid, [PAIRS[j], PAIRS[j + 1]], ["b", "a"] if flip else ["a", "b"]))
    return out


def snapshot_of(c: Client, sid: str) -> tuple:
    info = c.get_session(sid)
    return info.version, info.frozen, info.guard, {k: v.clone() for k, v in st_load(c.export_session(sid)).items()}


def unchanged(before: tuple, after: tuple) -> bool:
    return before[:3] == after[:3] and before[3].keys() == after[3].keys() and all(
        before[3][k].equal(after[3][k]) for k in before[3])


def test_versions_list_who_applied_each_and_never_the_key(authed):
    with client(authed, "acme") as c:
        sid = c.create_session("rls", classes=["a", "b"], session_id="audited").id
        feed(c, sid, 2)
        c.reset_session(sid)
        vl = c.versions(sid)
        assert vl.version == 3 and vl.retained_from == 0 and [v.version for v in vl.versions] == [3, 2, 1, 0]
        kinds = [(v.kind, v.key_id, v.examples, v.labelled) for v in vl.versions]
        assert kinds == [("reset", "acme-ci", 0, 0), ("adapt", "acme-ci", 2, 2), ("adapt", "acme-ci", 2, 2),
                         ("create", "acme-ci", 0, 0)]
        assert vl.versions[1].prequential.total == 4 and vl.versions[0].prequential.total == 0
        assert vl.versions[1].time >= vl.versions[2].time
        page = c.versions(sid, limit=1, before=3)
        assert [v.version for v in page.versions] == [2]
        exported = c.export_session(sid)
        history = codec.read_meta(exported)["history"]
        assert [h["version"] for h in history] == [0, 1, 2, 3] and history[1]["key_id"] == "acme-ci"
        for secret in KEYS.values():
            assert secret.encode() not in exported and secret not in str(vl.model_dump())
    with client(authed, "beta") as other:  # another tenant's session is unknown to it
        for call in (lambda: other.versions(sid), lambda: other.rollback(sid, 1), lambda: other.fork(sid),
                     lambda: other.patch_session(sid, frozen=True),
                     lambda: other.predict(XS[:1], session_id=sid, version=1)):
            with pytest.raises(FwserveError) as e:
                call()
            assert e.value.status == 404 and e.value.code == "session_not_found"
    with client(authed, "acme") as c:
        assert c.versions(sid).version == 3 and not c.get_session(sid).frozen


def test_retention_bounds_and_versions_outside_it_are_404(authed):
    with client(authed, "acme") as c:
        sid = c.create_session("delta", classes=["a", "b"], session_id="bounded").id
        feed(c, sid, 7)
        vl = c.versions(sid)
        assert vl.retained_from == 4 and [v.version for v in vl.versions] == [7, 6, 5, 4]  # --history-versions 4
        before = snapshot_of(c, sid)
        for call, code in ((lambda: c.predict(XS[:1], session_id=sid, version=3), "version_not_retained"),
                           (lambda: c.rollback(sid, 1), "version_not_retained"),
                           (lambda: c.fork(sid, version=0), "version_not_retained"),
                           (lambda: c.predict(XS[:1], session_id=sid, version=8), "version_not_found"),
                           (lambda: c.rollback(sid, 99), "version_not_found")):
            with pytest.raises(FwserveError) as e:
                call()
            assert e.value.status == 404 and e.value.code == code
        assert unchanged(before, snapshot_of(c, sid))
        c.delete_session(sid)


def test_fork_stays_in_the_callers_tenant_and_quota(authed):
    with client(authed, "acme") as c:
        for s in c.list_sessions().sessions:
            c.delete_session(s.id)
        sid = c.create_session("prototype", classes=["a", "b"], session_id="parent").id
        feed(c, sid, 3)
        child = c.fork(sid, new_id="child", version=2)
        assert child.id == "child" and child.version == 0 and child.examples_seen == 4
        assert c.versions("child").versions[0].source == {"session": "parent", "version": 2}
        p_then = c.predict(PAIRS, session_id=sid, version=2).predictions
        assert c.predict(PAIRS, session_id="child").predictions == p_then
        with pytest.raises(FwserveError) as e:
            c.fork(sid, new_id="child")
        assert e.value.status == 409
        c.fork(sid, new_id="third")
        with pytest.raises(FwserveError) as e:  # acme's quota is 3 sessions
            c.fork(sid, new_id="fourth")
        assert e.value.status == 429 and e.value.code == "session_quota"
        for s in ("child", "third"):  # room for a keyed fork and its retry
            c.delete_session(s)
        first = c.http.post(f"/v1/sessions/{sid}/fork", json={}, headers={"Idempotency-Key": "fork-1"})
        again = c.http.post(f"/v1/sessions/{sid}/fork", json={}, headers={"Idempotency-Key": "fork-1"})
        assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
        assert again.headers.get("Idempotent-Replayed") == "true" and len(c.list_sessions().sessions) == 2
    with client(authed, "beta") as other:
        assert all(s.id != "child" for s in other.list_sessions().sessions)


def test_predict_at_a_version_equals_a_solo_predict_made_then(server):
    with Client(server.url) as c:
        sid = c.create_session("t3a", init="base", hyperparameters={"adapt_on_predict": True}).id
        then = {}
        for v in range(4):
            then[v] = c.predict(XS[:3], session_id=sid, top_k=2)  # answered by v, then adapted on: v + 1
            assert then[v].version == v
        now = c.get_session(sid).version
        for v, p in then.items():
            q = c.predict(XS[:3], session_id=sid, top_k=2, version=v)
            assert q.version == v and q.predictions == p.predictions and q.applied is None
            r = c.infer(BACKBONE, np.stack(XS[:3]), session_id=sid, session_version=v, binary=False)
            assert r.parameters["session_version"] == v
            assert [o.data for o in r.outputs if o.name == "label"][0] == [x.label for x in p.predictions]
        assert c.get_session(sid).version == now  # predicting at a version changed nothing
        with pytest.raises(FwserveError) as e:  # the protocol's adapts always update the current version
            c.infer(BACKBONE, np.stack(XS[:1]), session_id=sid, session_version=1, labels=["1"])
        assert e.value.status == 422 and c.get_session(sid).version == now


def test_rollback_is_a_new_version_and_idempotent(server):
    with Client(server.url) as c:
        sid = c.create_session("delta", classes=["a", "b"], hyperparameters={"beta": 1.0}).id
        feed(c, sid, 2)
        at2 = c.predict(PAIRS, session_id=sid).predictions
        feed(c, sid, 2, flip=True, start=2)
        assert c.predict(PAIRS, session_id=sid).predictions != at2
        r = c.http.post(f"/v1/sessions/{sid}/rollback", json={"version": 2}, headers={"Idempotency-Key": "rb-1"})
        assert r.status_code == 200 and r.json() == {"id": sid, "version": 5, "rolled_back_to": 2}
        again = c.http.post(f"/v1/sessions/{sid}/rollback", json={"version": 2}, headers={"Idempotency-Key": "rb-1"})
        assert again.json() == r.json() and again.headers.get("Idempotent-Replayed") == "true"
        other = c.http.post(f"/v1/sessions/{sid}/rollback", json={"version": 1}, headers={"Idempotency-Key": "rb-1"})
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        p = c.predict(PAIRS, session_id=sid)
        assert p.version == 5 and p.predictions == at2
        assert c.versions(sid).versions[0].kind == "rollback" and c.versions(sid).versions[0].source == {"version": 2}
        assert c.rollback(sid, 4).version == 6  # rolling back a rollback: still forward


def test_bad_input_is_4xx_and_changes_nothing(server):
    with Client(server.url) as c:
        sid = c.create_session("sgd", classes=["a", "b"], session_id="target-v").id
        feed(c, sid, 1)
        before = snapshot_of(c, sid)
        bad = [
            ("post", f"/v1/sessions/{sid}/rollback", {"version": -1}, 422, "invalid_request"),
            ("post", f"/v1/sessions/{sid}/rollback", {"version": "1"}, 422, "invalid_request"),
            ("post", f"/v1/sessions/{sid}/rollback", {}, 422, "invalid_request"),
            ("post", f"/v1/sessions/{sid}/rollback", {"version": 7}, 404, "version_not_found"),
            ("post", "/v1/sessions/nope/rollback", {"version": 0}, 404, "session_not_found"),
            ("post", f"/v1/sessions/{sid}/fork", {"version": 9}, 404, "version_not_found"),
            ("post", f"/v1/sessions/{sid}/fork", {"id": "../x"}, 422, "invalid_request"),
            ("post", f"/v1/sessions/{sid}/fork", {"colour": 1}, 422, "invalid_request"),
            ("get", "/v1/sessions/nope/versions", None, 404, "session_not_found"),
            ("get", f"/v1/sessions/{sid}/versions?limit=0", None, 422, "invalid_request"),
            ("patch", f"/v1/sessions/{sid}", {"guard": {"action": "undo"}}, 422, "invalid_request"),
            ("patch", f"/v1/sessions/{sid}", {"guard": {"action": "freeze", "window": 3}}, 422, "invalid_guard"),
            ("patch", f"/v1/sessions/{sid}", {"guard": {"action": "freeze", "reference": "base"}}, 422,
             "invalid_guard"),
            ("patch", f"/v1/sessions/{sid}", {"guard": {"action": "freeze", "reference": 5}}, 422, "invalid_guard"),
            ("patch", f"/v1/sessions/{sid}", {"frozen": "yes"}, 422, "invalid_request"),
            ("post", "/v1/predict", {"instances": [arr(XS[0])], "version": 0}, 422, "invalid_request"),
            ("post", "/v1/predict", {"session_id": sid, "instances": [arr(XS[0])], "version": 5}, 404,
             "version_not_found"),
            ("post", "/v1/sessions", {"rule": "sgd", "classes": ["a"], "id": "g", "guard": {"action": "freeze",
                                                                                           "margin": 5}}, 422,
             "invalid_guard"),
            ("post", "/v1/sessions", {"rule": "sgd", "classes": ["a"], "id": "g", "guard": {"margin": 0.1}}, 422,
             "invalid_request"),
        ]
        for method, path, body, status, code in bad:
            r = getattr(c.http, method)(path, **({"json": body} if body is not None else {}))
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, body, r.text)
        assert unchanged(before, snapshot_of(c, sid))
        assert all(s.id != "g" for s in c.list_sessions().sessions)
        r = c.http.post(f"/v2/models/{BACKBONE}/infer", json={
            "inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": XS[0].ravel().tolist()}],
            "parameters": {"session_version": -1, "session_id": sid}})
        assert r.status_code == 422
        # frozen: adapts refused (409) and nothing applied, until unfrozen
        assert c.patch_session(sid, frozen=True).frozen
        with pytest.raises(FwserveError) as e:
            c.adapt(sid, XS[:1], ["a"])
        assert e.value.status == 409 and e.value.code == "session_frozen"
        assert c.get_session(sid).version == before[0]
        assert c.predict(XS[:1], session_id=sid).version == before[0]  # predicts still answer
        assert not c.patch_session(sid, frozen=False).frozen
        assert c.adapt(sid, XS[:1], ["a"]).version == before[0] + 1


def test_guard_set_replaced_and_removed_with_patch(server):
    with Client(server.url) as c:
        sid = c.create_session("sgd", init="base", guard={"action": "rollback"}).id
        info = c.get_session(sid)
        assert info.guard["action"] == "rollback" and info.guard["reference"] == "base" and info.guard["window"] == 64
        info = c.patch_session(sid, guard={"action": "alert", "margin": 0.2})
        assert info.guard["action"] == "alert" and info.guard["margin"] == 0.2
        assert info.guard["label_conflict"] is None  # off unless asked for
        info = c.patch_session(sid, guard={"action": "rollback", "label_conflict": 0.5})
        assert info.guard["label_conflict"] == 0.5
        with pytest.raises(FwserveError) as e:
            c.patch_session(sid, guard={"action": "rollback", "label_conflict": 2})
        assert e.value.status == 422 and c.get_session(sid).guard["label_conflict"] == 0.5
        assert c.patch_session(sid, guard=None).guard is None
        assert c.patch_session(sid).guard is None  # nothing given: nothing changed


def test_a_guard_trips_end_to_end(backbone, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fwserve.engine")
    with live_server(backbone, tmp_path, durability="wal") as srv, Client(srv.url) as c:
        sid = c.create_session("delta", classes=["a", "b"], hyperparameters={"beta": 1.0}).id
        feed(c, sid, 3)
        good = c.get_session(sid).version
        good_preds = c.predict(PAIRS, session_id=sid).predictions
        c.patch_session(sid, guard={"action": "rollback", "window": 8, "reference": good})
        before = srv.metric("fwserve_guard_trips_total", 'rule="delta",action="rollback"')
        outs = feed(c, sid, 3, flip=True, start=3) + feed(c, sid, 4, start=6)
        tripped = [o.guard for o in outs if o.guard]
        assert tripped and tripped[0]["action"] == "rollback" and tripped[0]["trigger"] == "accuracy"
        to = tripped[0]["to"]
        assert srv.metric("fwserve_guard_trips_total", 'rule="delta",action="rollback"') == before + len(tripped)
        events = [r for r in caplog.records if getattr(r, "event", None) == "guard_trip"]
        assert events and events[0].action == "rollback" and events[0].rule == "delta" and sid not in str(
            events[0].__dict__)  # the session is named by a hash, as in the access log
        entry = {v.version: v for v in c.versions(sid).versions}[tripped[0]["rollback_version"]]
        assert entry.kind == "rollback" and entry.by == "guard" and entry.source == {"version": to}
        assert c.predict(PAIRS, session_id=sid, version=to).predictions == c.predict(
            PAIRS, session_id=sid, version=tripped[0]["rollback_version"]).predictions
        assert to == good or [p.label for p in c.predict(PAIRS, session_id=sid, version=to).predictions] == [
            p.label for p in good_preds]
        listing = c.versions(sid)
        state = st_load(c.export_session(sid))
    with live_server(backbone, tmp_path, durability="wal") as srv, Client(srv.url) as c:  # a restart keeps it all
        again = c.versions(sid)
        assert again.version == listing.version and [v.model_dump() for v in again.versions] == [
            v.model_dump() for v in listing.versions]
        assert all(state[k].equal(t) for k, t in st_load(c.export_session(sid)).items())
        assert c.get_session(sid).guard["reference"] == good


def test_readme_history_block_runs_as_written(backbone, tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
                if "c.rollback(" in b]
    with live_server(backbone, tmp_path) as srv:
        p = subprocess.run([sys.executable, "-c", block.replace("http://127.0.0.1:8000", srv.url)], cwd=root,
                           env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        first, second = p.stdout.splitlines()
        assert first == "[(4, 'adapt', None), (3, 'adapt', None)]" and second == "2 5"
        with Client(srv.url) as c:
            (sid,) = [s.id for s in c.list_sessions().sessions if s.version == 5]
            assert c.get_session(sid).guard["action"] == "freeze" and len(c.list_sessions().sessions) == 2


@needs_redis
def test_rollback_is_replicated_like_an_adapt(backbone, tmp_path, redis_url):
    with live_server(backbone, tmp_path / "a", durability="wal", store=redis_url) as a, \
            live_server(backbone, tmp_path / "b", durability="wal", store=redis_url) as b, \
            Client(a.url) as ca, Client(b.url) as cb:
        sid = ca.create_session("delta", classes=["a", "b"], hyperparameters={"beta": 1.0}).id
        feed(ca, sid, 2)
        at2 = ca.predict(PAIRS, session_id=sid).predictions
        feed(cb, sid, 2, flip=True, start=2)  # B moves the session on; A's copy is stale
        assert cb.rollback(sid, 2).version == 5  # on B, compare-and-set on the store's head
        p = ca.predict(PAIRS, session_id=sid)  # A never serves its stale copy
        assert p.version == 5 and p.predictions == at2
        assert ca.adapt(sid, PAIRS[:2], ["a", "b"]).version == 6  # nor extends it
        assert [v.kind for v in cb.versions(sid).versions][:2] == ["adapt", "rollback"]
        assert ca.predict(PAIRS, session_id=sid, version=4).predictions != at2  # history read from the store

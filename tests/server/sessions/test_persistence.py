"""Durability modes and stores: sessions survive restarts (snapshot, wal), the log replays
exactly from a crash image, torn log tails are cut, compaction, the directory store's lock,
and replicas sharing a Redis store never serve or extend a stale copy."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from safetensors.torch import load as st_load

from server.client import AsyncClient, Client, FwserveError
from server.rules import RULES
from tests.server.conftest import digits, live_server
from tests.server.redis_server import needs_redis, redis_server, redis_url  # noqa: F401 (fixtures)

CLASSES = ["a", "b", "c"]
XS = digits(12, seed=50)


def feed(c: Client, sid: str, start: int, n: int) -> list:
    """n adapt requests of one or two instances each (always labelled: every rule accepts labels)."""
    out = []
    for i in range(start, start + n):
        k = 1 + i % 2
        xs = [XS[(i + j) % len(XS)] for j in range(k)]
        out.append(c.adapt(sid, xs, [CLASSES[(i + j) % 3] for j in range(k)]))
    return out


def tensors(c: Client, sid: str) -> dict:
    return st_load(c.export_session(sid))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def make_sessions(c: Client, n_adapts: int = 3) -> dict:
    state = {}
    for rule in RULES:
        sid = c.create_session(rule, classes=CLASSES, session_id=f"p-{rule}").id
        feed(c, sid, 0, n_adapts)
        info = c.get_session(sid)
        state[sid] = (info.version, info.examples_seen, info.prequential, tensors(c, sid))
    return state


def check_sessions(c: Client, state: dict) -> None:
    for sid, (version, seen, preq, t) in state.items():
        info = c.get_session(sid)
        assert (info.version, info.examples_seen, info.prequential) == (version, seen, preq), sid
        assert same(tensors(c, sid), t), sid


def crash_image(tmp_path, name="image"):
    """A copy of the store directory taken while the server runs: what a kill -9 leaves."""
    dst = tmp_path / name
    shutil.copytree(tmp_path / "snapshots", dst / "snapshots")
    return dst


@pytest.mark.parametrize("mode", ["wal", "snapshot"])
def test_restart_keeps_every_rule_exactly(backbone, tmp_path, mode):
    """Through every tier (2 device slots, 1 host entry), then a restart."""
    tiers = {"max_device_sessions": 2, "max_host_sessions": 1}
    with live_server(backbone, tmp_path, durability=mode, **tiers) as srv, Client(srv.url) as c:
        state = make_sessions(c)
        check_sessions(c, state)
    with live_server(backbone, tmp_path, durability=mode, **tiers) as srv, Client(srv.url) as c:
        check_sessions(c, state)
        sid = next(iter(state))
        assert feed(c, sid, 3, 1)[0].version == state[sid][0] + 1  # learning goes on where it left off


def test_none_mode_forgets_and_cleans_up(backbone, tmp_path):
    with live_server(backbone, tmp_path, max_device_sessions=1, max_host_sessions=0) as srv, Client(srv.url) as c:
        for i in range(3):
            c.create_session("sgd", classes=CLASSES, session_id=f"n{i}")
        assert len(list((tmp_path / "snapshots").glob("*.safetensors"))) == 2  # the spill tier
    assert not list((tmp_path / "snapshots").glob("*.safetensors"))
    with live_server(backbone, tmp_path) as srv, Client(srv.url) as c:
        with pytest.raises(FwserveError) as e:
            c.get_session("n0")
        assert e.value.status == 404


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_wal_replays_a_crash_image_exactly(backbone, tmp_path, head_dtype):
    """Copy the store while the server runs (no shutdown, no compaction): the log replays to the
    same heads, statistics and predictions (bfloat16 heads too: replay rounds as the pool did)."""
    with live_server(backbone, tmp_path, durability="wal", head_dtype=head_dtype) as srv, Client(srv.url) as c:
        state = make_sessions(c, n_adapts=4)
        preds = {sid: c.predict(XS[:3], session_id=sid, top_k=2) for sid in state}
        image = crash_image(tmp_path)
    assert list((image / "snapshots").glob("*.wal"))
    with live_server(backbone, image, durability="wal", head_dtype=head_dtype) as srv, Client(srv.url) as c:
        check_sessions(c, state)
        for sid, p in preds.items():
            q = c.predict(XS[:3], session_id=sid, top_k=2)
            assert q.version == p.version and q.predictions == p.predictions


def test_torn_log_tail_is_cut(backbone, tmp_path):
    with live_server(backbone, tmp_path, durability="wal") as srv, Client(srv.url) as c:
        sid = c.create_session("rls", classes=CLASSES, session_id="torn").id
        feed(c, sid, 0, 3)
        before = tensors(c, sid)
        image = crash_image(tmp_path)
    (wal,) = (image / "snapshots").glob("*.wal")
    good = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78partial record")  # a crash in the middle of an append
    with live_server(backbone, image, durability="wal") as srv, Client(srv.url) as c:
        assert c.get_session(sid).version == 3
        assert same(tensors(c, sid), before)
        assert wal.stat().st_size == good
        assert feed(c, sid, 3, 1)[0].version == 4


def test_wal_compaction(backbone, tmp_path):
    # every compaction pass folds whatever is logged (a threshold of 1 record; no history kept)
    with live_server(backbone, tmp_path, durability="wal", wal_compact_records=1, snapshot_interval_s=0.1,
                     history_versions=1) as srv, Client(srv.url) as c:
        sid = c.create_session("prototype", classes=CLASSES, session_id="compact").id
        feed(c, sid, 0, 7)
        deadline = time.monotonic() + 10
        while list((tmp_path / "snapshots").glob("*.wal")):
            assert time.monotonic() < deadline, "the log was not compacted"
            time.sleep(0.05)
        assert srv.engine.store.sync_state(sid)["snapshot"] == 7
        before = tensors(c, sid)
        feed(c, sid, 7, 1)  # one record after the snapshot
        after = tensors(c, sid)
        image = crash_image(tmp_path)
    with live_server(backbone, image, durability="wal") as srv, Client(srv.url) as c:
        assert c.get_session(sid).version == 8
        assert same(tensors(c, sid), after) and not same(after, before)


def test_snapshot_mode_writes_periodically(backbone, tmp_path):
    with live_server(backbone, tmp_path, durability="snapshot", snapshot_interval_s=0.1) as srv, \
            Client(srv.url) as c:
        sid = c.create_session("delta", classes=CLASSES, session_id="periodic").id
        feed(c, sid, 0, 2)
        deadline = time.monotonic() + 10
        while srv.engine.store.sync_state(sid)["synced"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t = tensors(c, sid)
        image = crash_image(tmp_path)
    with live_server(backbone, image, durability="snapshot") as srv, Client(srv.url) as c:
        assert c.get_session(sid).version == 2 and same(tensors(c, sid), t)


def test_directory_store_serves_one_process(backbone, tmp_path):
    from server.api import create_app
    from server.config import Settings

    with live_server(backbone, tmp_path, durability="wal"):
        app = create_app(Settings(snapshot_dir=tmp_path / "snapshots", durability="wal"), backbone=backbone)
        rt = app.state.engine
        rt.start()
        assert not rt.wait_loaded(30)
        assert "in use by another fwserve process" in rt.load_error
        rt.stop()


def test_64_concurrent_adapters_on_one_session_wal(backbone, tmp_path):
    n = 64
    xs = digits(n, seed=51)

    async def main(url):
        async with AsyncClient(url) as c:
            sid = (await c.create_session("rls", classes=CLASSES, session_id="hot")).id
            outs = await asyncio.gather(*(c.adapt(sid, [xs[i]], [CLASSES[i % 3]]) for i in range(n)))
            assert sorted(o.version for o in outs) == list(range(1, n + 1))
            return st_load(await c.export_session(sid))

    with live_server(backbone, tmp_path, durability="wal", max_wait_ms=20.0) as srv:
        live = asyncio.run(main(srv.url))
        image = crash_image(tmp_path)
    with live_server(backbone, image, durability="wal") as srv, Client(srv.url) as c:
        assert c.get_session("hot").version == n
        assert same(tensors(c, "hot"), live)


# ---- Redis: restarts and replicas ---------------------------------------------------------------


@needs_redis
def test_redis_store_restart_and_takeover(backbone, tmp_path, redis_url):
    with live_server(backbone, tmp_path / "a", durability="wal", store=redis_url) as a, Client(a.url) as ca:
        state = make_sessions(ca)
        # a second replica takes over while the first still runs (its log not compacted)
        with live_server(backbone, tmp_path / "b", durability="wal", store=redis_url) as b, Client(b.url) as cb:
            check_sessions(cb, state)
    with live_server(backbone, tmp_path / "c", durability="wal", store=redis_url) as c_, Client(c_.url) as cc:
        check_sessions(cc, state)


@needs_redis
def test_replicas_never_serve_or_extend_a_stale_copy(backbone, tmp_path, redis_url):
    xs = digits(24, seed=52)
    with live_server(backbone, tmp_path / "a", durability="wal", store=redis_url) as a, \
            live_server(backbone, tmp_path / "b", durability="wal", store=redis_url) as b, \
            Client(a.url) as ca, Client(b.url) as cb:
        sid = ca.create_session("delta", classes=CLASSES, hyperparameters={"beta": 1.0}, session_id="shared").id
        with pytest.raises(FwserveError) as e:
            cb.create_session("sgd", classes=CLASSES, session_id="shared")
        assert e.value.status == 409
        assert ca.adapt(sid, xs[:1], ["a"]).version == 1
        p = cb.predict(xs[:1], session_id=sid)
        assert p.version == 1 and p.predictions[0].label == "a"  # B loads A's write
        assert cb.adapt(sid, xs[:1], ["b"]).version == 2
        p = ca.predict(xs[:1], session_id=sid)  # A's copy (version 1) is stale: never served
        assert p.version == 2 and p.predictions[0].label == "b"
        assert ca.adapt(sid, xs[1:2], ["c"]).version == 3  # nor extended

        async def race():
            async with AsyncClient(a.url) as aa, AsyncClient(b.url) as ab:
                return await asyncio.gather(*((aa if i % 2 else ab).adapt(sid, [xs[i]], [CLASSES[i % 3]])
                                              for i in range(2, 22)))

        outs = asyncio.run(race())
        versions = [o.version for o in outs]
        assert sorted(versions) == list(range(4, 24))  # none lost, none applied twice
        ta, tb = tensors(ca, sid), tensors(cb, sid)
        assert same(ta, tb) and ca.get_session(sid).version == cb.get_session(sid).version == 23

        # the head equals applying the same requests one by one in the order of their versions
        ref = ca.create_session("delta", classes=CLASSES, hyperparameters={"beta": 1.0}, session_id="ref").id
        ca.adapt(ref, xs[:1], ["a"])
        ca.adapt(ref, xs[:1], ["b"])
        ca.adapt(ref, xs[1:2], ["c"])
        for i in sorted(range(2, 22), key=lambda i: versions[i - 2]):
            cb.adapt(ref, [xs[i]], [CLASSES[i % 3]])
        assert same(tensors(ca, ref), ta)

        cb.delete_session(sid)
        with pytest.raises(FwserveError) as e:
            ca.predict(xs[:1], session_id=sid)  # deleted on B: gone on A too
        assert e.value.status == 404


@needs_redis
def test_reset_and_import_never_revive_a_session_another_replica_deleted(backbone, tmp_path, redis_url):
    with live_server(backbone, tmp_path / "a", durability="wal", store=redis_url) as a, \
            live_server(backbone, tmp_path / "b", durability="wal", store=redis_url) as b, \
            Client(a.url) as ca, Client(b.url) as cb:
        sid = ca.create_session("sgd", classes=CLASSES, session_id="doomed").id
        exported = ca.export_session(sid)
        assert cb.get_session(sid).version == 0  # B holds a copy too
        ca.delete_session(sid)
        with pytest.raises(FwserveError) as e:
            cb.reset_session(sid)  # B's copy is stale: its reset must not write the session back
        assert e.value.status == 404
        with pytest.raises(FwserveError) as e:
            ca.get_session(sid)
        assert e.value.status == 404
        cb.import_session(sid, exported)  # an import creates it again, as asked
        assert ca.get_session(sid).version == 0


def test_secrets_in_the_store_url_never_reach_logs_or_responses(backbone, tmp_path, caplog):
    import logging
    import socket

    with socket.socket() as s:  # nothing listens there: the store cannot be reached
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:hunter2secret@127.0.0.1:{port}/0"
    from server.api import create_app
    from server.config import Settings

    caplog.set_level(logging.DEBUG)
    app = create_app(Settings(snapshot_dir=tmp_path / "s", durability="wal", store=url), backbone=backbone)
    engine = app.state.engine
    engine.start()
    assert not engine.wait_loaded(60)
    assert "hunter2secret" not in (engine.load_error or "") and "***" in engine.load_error
    assert "hunter2secret" not in caplog.text
    engine.stop()

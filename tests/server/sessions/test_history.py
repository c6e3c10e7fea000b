"""History through the session store (no HTTP, a small embed dim): every retained version's state
is bit for bit the state the session had then (all modes, through eviction, after a restart and
from a crash image with the log), reset / import / rollback append versions, rollback then adapt
equals replaying that history, a fork is independent of its parent, retention bounds hold, and
the backends keep what retention asks compaction to keep."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from server.config import Settings
from tests.server.learned import learned_params
from server.errors import NotFound
from server.rules import RULES, get_rule
from server.sessions import SessionStore, codec, history
from server.sessions.backends import Head, open_backend
from tests.server.redis_server import needs_redis, redis_server, redis_url  # noqa: F401 (fixtures)

D = 8
BASE = ["0", "1", "2"]
CLASSES = ["a", "b", "c"]


def new_store(root: Path, mode: str, **kw) -> SessionStore:
    s = Settings(snapshot_dir=root, durability=mode, **{"max_device_sessions": 4, "max_host_sessions": 2,
                                                        "max_classes": 6, **kw})
    g = torch.Generator().manual_seed(0)
    return SessionStore(s, D, torch.randn(3, D, generator=g), torch.randn(3, generator=g), BASE, "cpu", "test",
                        learned=learned_params(D))


def rows(seed: int, m: int = 3, n: int = 3, labelled: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, D, generator=g)
    y = torch.randint(0, n, (m,), generator=g) if labelled else torch.full((m,), -1)
    return x, y


def adapt(st: SessionStore, plan: list[tuple[str, int]], actor: str = "key-1") -> None:
    """One micro-batch: every (session, seed) of the plan in one grouped update per rule."""
    keys = [k for k, _ in plan]
    with st.batch(keys) as txn:
        by_rule: dict = {}
        for key, seed in plan:
            by_rule.setdefault((txn.found[key].rule.name, txn.width(key)), []).append((key, *rows(seed)))
        for (name, width), items in by_rule.items():  # one call per rule and pool width
            rule = get_rule(name)
            xs, ys = torch.cat([x for _, x, _ in items]), torch.cat([y for _, _, y in items])
            slots = torch.tensor([txn.slot(k) for k, x, _ in items for _ in range(len(x))])
            srows = torch.tensor([txn.state_row(k) for k, x, _ in items for _ in range(len(x))]) if rule.state \
                else None
            txn.apply(rule, xs, ys, slots, srows, width)
            for k, x, y in items:
                txn.commit(k, len(x), 0, len(x), actor=actor)
    assert txn.errors == {}


def state(st: SessionStore, key: str) -> dict:
    return st_load(st.export(key))


def bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].view(torch.int32).equal(b[k].view(torch.int32)) for k in a)


def state_at(st: SessionStore, key: str, version: int) -> dict:
    """A retained version's whole state, through the public calls (a fork of it, exported)."""
    fork = f"probe-{key}-{version}-{time.monotonic_ns()}"
    st.fork(key, version, fork, None)
    try:
        return state(st, fork)
    finally:
        st.delete(fork)


def build_history(st: SessionStore) -> dict[str, dict[int, dict]]:
    """Two sessions of different rules sharing kernel calls, with a reset, an import onto one of
    them and a rollback in the middle -> {key: {version: its state then}}."""
    live: dict[str, dict[int, dict]] = {}
    for key, rule in (("r", "rls"), ("s", "sgd")):
        st.create(rule, CLASSES, {}, session_id=key, actor="creator")
        live[key] = {0: state(st, key)}
    seed = 0
    for step in range(9):
        adapt(st, [("r", seed), ("s", seed + 1)] if step % 3 else [("r", seed)])
        seed += 2
        for key in live:
            live[key][st.info(key).version] = state(st, key)
        if step == 3:
            st.reset("s", actor="key-2")
            live["s"][st.info("s").version] = state(st, "s")
        if step == 5:
            st.import_("s", st.export("s"), actor="key-3")  # the same kind of session: a new version of it
            live["s"][st.info("s").version] = state(st, "s")
            st.rollback("r", 2, actor="key-2")
            live["r"][st.info("r").version] = state(st, "r")
    return live


def check_history(st: SessionStore, live: dict) -> None:
    for key, versions in live.items():
        for v, want in versions.items():
            head = st.version_head(key, v)
            assert head.version == v and head.W.equal(want["W"]) and head.b.equal(want["b"]), (key, v)
            assert bits_equal(state_at(st, key, v), want), (key, v)


@pytest.mark.parametrize("mode", ["none", "snapshot", "wal"])
def test_every_retained_version_is_its_state_bit_for_bit(tmp_path, mode):
    st = new_store(tmp_path, mode, wal_compact_records=3)
    live = build_history(st)
    assert max(live["r"]) == st.info("r").version == 10 and max(live["s"]) == st.info("s").version == 8
    check_history(st, live)
    for i in range(6):  # every session goes through the host and disk tiers
        st.create("delta", ["x"], {}, session_id=f"filler{i}")
    assert st.info("r").tier in ("host", "disk") or st.info("s").tier in ("host", "disk")
    check_history(st, live)
    if mode == "wal":  # a crash image (no shutdown, no compaction), then a clean restart
        shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-image")
    st.close()
    if mode == "wal":
        for root in (tmp_path.parent / f"{tmp_path.name}-image", tmp_path):
            again = new_store(root, mode)
            try:
                check_history(again, live)
                entries, floor, current = again.versions("s")
                assert floor == 0 and current == 8
                kinds = {e["version"]: (e["kind"], e["key_id"]) for e in entries}
                assert kinds[0] == ("create", "creator") and kinds[3] == ("reset", "key-2")
                assert kinds[6] == ("import", "key-3") and kinds[1] == ("adapt", "key-1")
            finally:
                again.close()


def test_reset_import_and_rollback_append_versions(tmp_path):
    st = new_store(tmp_path, "wal")
    st.create("sgd", CLASSES, {}, session_id="s")
    adapt(st, [("s", 1)])
    adapt(st, [("s", 2)])
    at2 = state(st, "s")
    assert st.reset("s").version == 3 and st.info("s").examples_seen == 0
    answer, replayed = st.rollback("s", 2)
    assert answer == {"id": "s", "version": 4, "rolled_back_to": 2} and not replayed
    assert bits_equal(state(st, "s"), at2) and st.info("s").examples_seen == 6  # the statistics as at 2
    info, created = st.import_("s", st.export("s"))
    assert not created and info.version == 5
    other = new_store(tmp_path / "other", "none")
    other.create("prototype", ["p", "q"], {}, session_id="s")
    info, created = st.import_("s", other.export("s"))  # another kind of session: it starts afresh...
    assert not created and info.version == 6 and info.rule == "prototype"  # ...and its versions go on
    entries, floor, _ = st.versions("s")
    assert floor == 6 and [e["kind"] for e in entries] == ["import"]
    other.close()
    st.close()


def test_rollback_then_adapt_equals_replaying_that_history(tmp_path):
    st = new_store(tmp_path, "wal")
    for key in ("a", "b"):
        st.create("rls", CLASSES, {}, session_id=key)
    for seed in range(5):
        adapt(st, [("a", seed)])
    st.rollback("a", 2)
    adapt(st, [("a", 99)])
    for seed in (0, 1, 99):  # b: the history a now has: versions 1, 2, then the last adapt
        adapt(st, [("b", seed)])
    assert bits_equal(state(st, "a"), state(st, "b"))
    st.close()
    again = new_store(tmp_path, "wal")  # and so does its log, replayed
    assert bits_equal(state(again, "a"), state(again, "b"))
    again.close()


def test_a_fork_is_independent_of_its_parent(tmp_path):
    st = new_store(tmp_path, "wal")
    st.create("prototype", CLASSES, {}, session_id="p")
    for seed in range(4):
        adapt(st, [("p", seed)])
        if seed == 1:
            at2 = state(st, "p")
    info, replayed = st.fork("p", 2, "f", None)
    assert info.version == 0 and not replayed and info.examples_seen == 6
    assert bits_equal(state(st, "f"), at2)
    parent = state(st, "p")
    adapt(st, [("f", 50)])
    assert bits_equal(state(st, "p"), parent)  # the parent did not move
    child = state(st, "f")
    adapt(st, [("p", 51)])
    assert bits_equal(state(st, "f"), child)
    st.delete("p")
    assert bits_equal(state(st, "f"), child)
    (entry,) = st.versions("f")[0][-1:]
    assert entry["kind"] == "fork" and entry["source"] == {"session": "p", "version": 2}
    st.close()


@pytest.mark.parametrize("mode", ["none", "wal"])
def test_retention_by_count(tmp_path, mode):
    st = new_store(tmp_path, mode, history_versions=5, wal_compact_records=4)
    st.create("sgd", CLASSES, {}, session_id="s")
    live = {}
    for seed in range(20):
        adapt(st, [("s", seed)])
        live[st.info("s").version] = state(st, "s")
        st.checkpoint()
    entries, floor, current = st.versions("s")
    assert current == 20 and floor == 16 and [e["version"] for e in entries] == [20, 19, 18, 17, 16]
    for v in range(16, 21):
        assert st.version_head("s", v).W.equal(live[v]["W"])
    for v, code in ((15, "version_not_retained"), (0, "version_not_retained"), (21, "version_not_found")):
        with pytest.raises(NotFound) as e:
            st.version_head("s", v)
        assert e.value.code == code
    held = st.held["s"]
    if mode == "wal":  # the store keeps what retention needs and one compaction interval more
        stored = st.backend.history("s")
        assert len(stored.records) <= 5 + 4 and min(stored.anchors) <= floor
    else:
        ring = held.history.ring
        assert len(ring.records) <= 5 + history.anchor_interval(st.retention) and min(ring.anchors) <= floor
    st.close()


def test_retention_by_age(tmp_path, monkeypatch):
    st = new_store(tmp_path, "none", history_max_age_s=100.0)
    st.create("sgd", CLASSES, {}, session_id="s")
    for seed in range(3):
        adapt(st, [("s", seed)])
    later = time.time() + 1000
    monkeypatch.setattr(history.time, "time", lambda: later)
    entries, floor, _ = st.versions("s")
    assert floor == 3 and [e["version"] for e in entries] == [3]  # only the current version stays
    with pytest.raises(NotFound):
        st.version_head("s", 2)
    st.close()


def test_retention_by_bytes_bounds_the_in_memory_history(tmp_path):
    st = new_store(tmp_path, "none", history_max_bytes=4096)
    st.create("rls", CLASSES, {}, session_id="s")  # an rls state copy alone is D * D floats and more
    for seed in range(40):
        adapt(st, [("s", seed)])
        assert st.held["s"].history.ring.bytes <= 4096
    entries, floor, current = st.versions("s")
    assert current == 40 and floor > 0 and len(entries) < 40
    assert st.version_head("s", floor).W.shape == (3, D)
    st.close()


def test_without_history_only_the_current_version_is_addressable(tmp_path):
    st = new_store(tmp_path, "none", history_versions=1)
    st.create("sgd", CLASSES, {}, session_id="s")
    adapt(st, [("s", 1)], actor="k")
    entries, floor, current = st.versions("s")
    assert floor == current == 1 and entries[0]["key_id"] == "k"
    assert st.held["s"].history.ring is None
    with pytest.raises(NotFound):
        st.version_head("s", 0)
    st.close()


def test_materialised_versions_are_cached_and_bounded(tmp_path):
    st = new_store(tmp_path, "wal", version_cache_entries=2)
    st.create("sgd", CLASSES, {}, session_id="s")
    for seed in range(4):
        adapt(st, [("s", seed)])
    for v in (1, 2, 3):
        st.version_head("s", v)
    assert len(st.version_cache._items) == 2  # the current version is never cached: it is live
    assert st.version_cache.get(("s", st.held["s"].session.inc, 3)) is not None
    st.close()


# ---- the backends keep what retention asks -------------------------------------------------------


def _snap(inc: str, version: int) -> bytes:
    return codec.encode({"W": torch.full((1,), float(version))}, {"incarnation": inc, "version": version})


def _rec(inc: str, version: int) -> bytes:
    return codec.Record(version, 1, 0, 1, 0.0, []).encode(inc)


def check_keep_from(b) -> None:
    assert b.create("k", "i", _snap("i", 0)) == "ok"
    assert b.append({"k": (Head("i", 0), [_rec("i", v) for v in range(1, 7)])}) == {}
    assert b.put("k", "i", 6, _snap("i", 6), Head("i", 6), keep_from=0)  # keep everything from 0
    h = b.history("k")
    assert sorted(h.anchors) == [0, 6] and [codec.record_head(r)[1] for r in h.records] == [1, 2, 3, 4, 5, 6]
    assert b.heads(["k"])["k"] == Head("i", 6)
    assert b.append({"k": (Head("i", 6), [_rec("i", v) for v in range(7, 10)])}) == {}
    assert b.put("k", "i", 9, _snap("i", 9), Head("i", 9), keep_from=6)  # 6 is archived, 0 and 1..6 go
    h = b.history("k")
    assert sorted(h.anchors) == [6, 9] and [codec.record_head(r)[1] for r in h.records] == [7, 8, 9]
    assert b.load("k").archives == [6] and b.heads(["k"])["k"] == Head("i", 9)
    assert b.append({"k": (Head("i", 9), [_rec("i", 10)])}) == {}  # the log goes on from the head
    assert b.put("k", "i", 10, _snap("i", 10), Head("i", 10))  # no keep_from: the history goes
    h = b.history("k")
    assert sorted(h.anchors) == [10] and h.records == []
    assert b.put("k", "j", 3, _snap("j", 3), Head("i", 10), keep_from=0)  # another incarnation: afresh
    assert sorted(b.history("k").anchors) == [3] and b.heads(["k"])["k"] == Head("j", 3)
    assert b.delete("k") and b.history("k") is None


def test_directory_backend_keeps_history_from_keep_from(tmp_path):
    b = open_backend(str(tmp_path / "dir"))
    check_keep_from(b)
    assert not list((tmp_path / "dir").glob("*.safetensors")) and not list((tmp_path / "dir").glob("*.wal"))
    b.close()


@needs_redis
def test_redis_backend_keeps_history_from_keep_from(redis_url):
    b = open_backend(redis_url, namespace=f"hist{time.monotonic_ns()}")
    check_keep_from(b)
    b.close()


def test_every_rule_replays_a_history_with_state_records(tmp_path):
    """A crash image of a log holding resets and rollbacks replays to the live state, every rule."""
    st = new_store(tmp_path / "live", "wal", wal_compact_records=1000, max_device_sessions=16)  # every rule at once
    keys = []
    for i, rule in enumerate(sorted(RULES)):
        st.create(rule, CLASSES, {}, session_id=f"s{i}")
        keys.append(f"s{i}")
    for r in range(5):
        adapt(st, [(k, 10 * r + j) for j, k in enumerate(keys)])
        if r == 2:
            st.rollback(keys[0], 1)
            st.reset(keys[1])
    live = {k: state(st, k) for k in keys}
    shutil.copytree(tmp_path / "live", tmp_path / "image")
    again = new_store(tmp_path / "image", "wal", max_device_sessions=8)
    try:
        for k in keys:
            assert bits_equal(state(again, k), live[k]), k
    finally:
        again.close()
        st.close()

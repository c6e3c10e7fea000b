"""Property tests on the session store (no HTTP, a small embed dim), through its public calls:

- an imported state goes through the host and disk tiers, a snapshot and a restart bit for bit
  (any finite float32 values, signed zeros, denormals, the extremes, and +inf where a rule's
  state may hold it) with its metadata;
- replaying the write-ahead log on one session reproduces, bit for bit, what the live grouped
  updates computed while that session shared its kernel calls with others (random sessions,
  rows, labels, unlabelled rows for label-free rules, several adapts per micro-batch)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from server.config import Settings
from tests.server.learned import learned_params
from server.rules import RULES
from server.sessions import SessionStore
from server.sessions import codec

D = 8
BASE = ["0", "1", "2"]
RULE_NAMES = sorted(RULES)
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def new_store(root: Path, **kw) -> SessionStore:
    s = Settings(snapshot_dir=root, durability="wal", max_device_sessions=4, max_host_sessions=2, max_classes=6, **kw)
    g = torch.Generator().manual_seed(0)
    return SessionStore(s, D, torch.randn(3, D, generator=g), torch.randn(3, generator=g), BASE, "cpu", "test",
                        learned=learned_params(D))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and bits(a[k]).equal(bits(b[k])) for k in a)


def random_state(rng: np.random.Generator, shapes: dict, inf_ok: tuple = ()) -> dict:
    special = np.array([-0.0, 0.0, 1e-45, 3.4e38, -3.4e38], dtype=np.float32)
    out = {}
    for k, shape in shapes.items():
        a = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 4))
        mask = rng.random(shape) < 0.1
        pool = np.append(special, np.float32(np.inf)) if k in inf_ok else special
        a[mask] = rng.choice(pool, size=int(mask.sum()))
        out[k] = torch.from_numpy(a)
    return out


def export_of(store: SessionStore, key: str, version: int, stats: dict, state: dict, rule: str, classes) -> bytes:
    meta = {"format": codec.EXPORT_FORMAT, "backbone": "test", "embed_dim": D, "id": key, "rule": rule,
            "hyperparameters": {}, "classes": classes, "init": "zeros", "version": version, **stats}
    return codec.encode(state, meta)


@PROPERTY
@given(rule=st.sampled_from(RULE_NAMES), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       version=st.integers(0, 10**6), evict=st.booleans())
def test_state_round_trips_through_tiers_snapshots_and_restarts(rule, n, seed, version, evict):
    rng = np.random.default_rng(seed)
    r = RULES[rule]
    classes = [f"c{i}" for i in range(n)]
    shapes = {"W": (n, D), "b": (n,), **r.state_shapes(n, D)}
    state = random_state(rng, shapes, r.inf_state)
    stats = {"examples_seen": 3 * version, "prequential_correct": version, "prequential_total": 2 * version}
    with tempfile.TemporaryDirectory() as tmp:
        store = new_store(Path(tmp))
        store.import_("s", export_of(store, "s", version, stats, state, rule, classes))
        if evict:  # through the host and disk tiers
            for i in range(6):
                store.create("sgd", ["a"], {}, session_id=f"filler{i}")
        assert same_bits(st_load(store.export("s")), state)
        meta = store.info("s")
        store.close()  # snapshots every session
        again = new_store(Path(tmp))
        try:
            assert same_bits(st_load(again.export("s")), state)
            info = again.info("s")
            for k in ("rule", "hyperparameters", "classes", "init", "version", "examples_seen", "prequential"):
                assert getattr(info, k) == getattr(meta, k), k
        finally:
            again.close()


def adapt_round(store: SessionStore, plan: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """One micro-batch round as the engine runs it: one grouped update per rule over the rows
    of every session in the plan, then one commit per session, then the log flush."""
    with store.batch([k for k, _, _ in plan]) as txn:
        assert not txn.missing
        by_rule: dict[tuple[str, int], list] = {}  # one call per rule and pool width
        for key, x, y in plan:
            by_rule.setdefault((txn.found[key].rule.name, txn.width(key)), []).append((key, x, y))
        for (name, width), items in by_rule.items():
            rule = RULES[name]
            xs = torch.cat([x for _, x, _ in items])
            ys = torch.cat([y for _, _, y in items])
            slots = torch.tensor([txn.slot(k) for k, x, _ in items for _ in range(len(x))])
            rows = torch.tensor([txn.state_row(k) for k, x, _ in items for _ in range(len(x))]) if rule.state else None
            txn.apply(rule, xs, ys, slots, rows, width)
            for k, x, y in items:
                txn.commit(k, len(x), 0, int((y >= 0).sum()))
    assert txn.errors == {}


@PROPERTY
@given(rules=st.lists(st.sampled_from(RULE_NAMES), min_size=2, max_size=4), seed=st.integers(0, 2**31 - 1),
       rounds=st.integers(1, 6))
def test_wal_replay_equals_live_updates(rules, seed, rounds):
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp())
    try:
        store = new_store(tmp / "live", wal_compact_records=1000)
        keys = []
        for i, rule in enumerate(rules):
            n = int(rng.integers(2, 6))
            keys.append(store.create(rule, [f"c{j}" for j in range(n)], {}, session_id=f"s{i}")[0].id)
        for _ in range(rounds):
            plan = []
            for key in keys:
                if rng.random() < 0.3:
                    continue
                info = store.info(key)
                m = int(rng.integers(1, 4))
                x = torch.from_numpy(rng.standard_normal((m, D)).astype(np.float32))
                y = torch.from_numpy(rng.integers(0, len(info.classes), m))
                if not RULES[info.rule].needs_labels:
                    y[torch.from_numpy(rng.random(m) < 0.5)] = -1  # unlabelled rows
                plan.append((key, x, y))
            if plan:
                adapt_round(store, plan)
        live = {k: (store.info(k).version, st_load(store.export(k))) for k in keys}
        shutil.copytree(tmp / "live", tmp / "image")  # a crash image: snapshots at version 0 plus the logs
        replayed = new_store(tmp / "image")
        try:
            for k, (version, tensors) in live.items():
                assert replayed.info(k).version == version
                assert same_bits(st_load(replayed.export(k)), tensors), (k, replayed.info(k).rule)
        finally:
            replayed.close()
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@PROPERTY
@given(rules=st.lists(st.sampled_from(RULE_NAMES), min_size=2, max_size=3), seed=st.integers(0, 2**31 - 1),
       rounds=st.integers(2, 6))
def test_replay_with_resets_and_rollbacks_equals_live_and_every_version_is_exact(rules, seed, rounds):
    """Resets and rollbacks are state records in the log: a crash image replays to the live heads,
    and every version the session had is materialised bit for bit (from the log, after the restart)."""
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp())
    try:
        store = new_store(tmp / "live", wal_compact_records=1000)
        keys = [store.create(rule, ["c0", "c1", "c2"], {}, session_id=f"s{i}")[0].id for i, rule in enumerate(rules)]
        seen = {k: {0: st_load(store.export(k))} for k in keys}
        for _ in range(rounds):
            plan = []
            for key in keys:
                x = torch.from_numpy(rng.standard_normal((int(rng.integers(1, 4)), D)).astype(np.float32))
                y = torch.from_numpy(rng.integers(0, 3, len(x)))
                if not RULES[store.info(key).rule].needs_labels:
                    y[torch.from_numpy(rng.random(len(x)) < 0.5)] = -1
                plan.append((key, x, y))
            adapt_round(store, plan)
            key = keys[int(rng.integers(0, len(keys)))]
            if rng.random() < 0.3:
                store.reset(key)
            elif rng.random() < 0.5:
                store.rollback(key, int(rng.integers(0, store.info(key).version + 1)))
            for k in keys:
                seen[k][store.info(k).version] = st_load(store.export(k))
        shutil.copytree(tmp / "live", tmp / "image")
        replayed = new_store(tmp / "image")
        try:
            for k, versions in seen.items():
                assert replayed.info(k).version == max(versions)
                assert same_bits(st_load(replayed.export(k)), versions[max(versions)])
                for v, tensors in versions.items():
                    head = replayed.version_head(k, v)
                    assert bits(head.W).equal(bits(tensors["W"])) and bits(head.b).equal(bits(tensors["b"])), (k, v)
        finally:
            replayed.close()
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

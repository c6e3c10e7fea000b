"""One job's failure is its own: inside a micro-batch, a session whose update would go
non-finite, a rule whose kernel raises, a failing episodic head, a session the store cannot load
or save — each fails only the requests it belongs to, nothing it failed is applied or logged,
and every other job in the batch completes."""

from __future__ import annotations

import pytest
import torch

from server.config import Settings
from server.engine.batcher import Pending
from server.engine.engine import resolve_episodic
from server.engine.executor import Executor
from server.engine.feature_cache import FeatureCache
from server.engine.messages import AdaptJob, AdaptResult, EpisodicJob, Input, PredictJob, PredictResult
from server.engine.metrics import Metrics
from server.errors import Internal, InvalidInput, Unavailable
from server.rules import RULES, Hyper, Rule, register
from server.sessions import SessionStore, StoreError
from server.sessions.backends import DirectoryBackend
from tests.server.conftest import digits


class Explode(Rule):
    """Writes +inf into the head of every session whose row is labelled 1."""

    name = "test-explode"
    hyper = {"lr": Hyper(1.0, 0.0, 10.0)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        heads.W[slots, 0] += 1.0
        bad = slots[y == 1]
        heads.W[bad, 0] = float("inf")
        return 0


class Huge(Rule):
    """Label 0: two huge finite weights, whose sum overflows; label 1: a NaN bias."""

    name = "test-huge"
    hyper = {"lr": Hyper(1.0, 0.0, 10.0)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        heads.W[slots[y == 0], 0, :2] = 3e38
        heads.b[slots[y == 1], 0] = float("nan")
        return 0


class Broken(Rule):
    name = "test-broken"

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        heads.W[slots] += 1.0  # half-way through: the head is changed, then the kernel fails
        raise RuntimeError("device error")


@pytest.fixture(scope="module", autouse=True)
def test_rules():
    register(Explode())
    register(Huge())
    register(Broken())
    yield
    RULES.pop("test-huge")
    RULES.pop("test-explode")
    RULES.pop("test-broken")


def make(backbone, tmp_path, **kw):
    s = Settings(snapshot_dir=tmp_path, **kw)
    m = Metrics()
    bb = backbone
    backend = DirectoryBackend(tmp_path)
    store = SessionStore(s, bb.embed_dim, bb.head.weight, bb.head.bias, bb.class_names, "cpu", s.backbone, m,
                         backend=backend)
    return Executor(bb, store, FeatureCache(64, m), m, s), store, backend


def inputs(backbone, n, seed):
    return [Input(f"arr:{seed}:{i}", backbone.preprocess(a)) for i, a in enumerate(digits(n, seed=seed))]


def run(ex, items):
    for i in items:
        assert i.future.set_running_or_notify_cancel()
    ex.run(items)
    return [i.future.exception() or i.future.result() for i in items]


def export(store, key):
    from safetensors.torch import load

    return load(store.export(key))


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_a_diverging_session_fails_alone_and_is_not_applied(backbone, tmp_path, durability):
    ex, store, _ = make(backbone, tmp_path, durability=durability)
    for sid in ("bad", "good"):
        store.create("test-explode", ["a", "b"], {}, session_id=sid)
    before = export(store, "bad")
    x = inputs(backbone, 2, 1)
    bad, good, pred = run(ex, [Pending(AdaptJob("bad", x[:1], ["b"])), Pending(AdaptJob("good", x[1:], ["a"])),
                               Pending(PredictJob(x, session="bad"))])
    assert isinstance(bad, InvalidInput) and bad.code == "diverged"
    assert isinstance(good, AdaptResult) and good.version == 1
    assert isinstance(pred, PredictResult) and pred.version == 0
    assert store.info("bad").version == 0 and all(export(store, "bad")[k].equal(v) for k, v in before.items())
    assert torch.isfinite(export(store, "good")["W"]).all()
    store.close()
    if durability == "wal":  # nothing of the undone update was logged: a restart replays only the good one
        _, again, _ = make(backbone, tmp_path, durability=durability)
        assert again.info("bad").version == 0 and again.info("good").version == 1
        assert all(export(again, "bad")[k].equal(v) for k, v in before.items())
        again.close()


def test_only_non_finite_values_make_an_update_diverge(backbone, tmp_path):
    """Huge but finite weights are applied (their sum overflowing decides nothing); a NaN
    anywhere in the head, the bias included, is undone."""
    ex, store, _ = make(backbone, tmp_path)
    for sid in ("huge", "nan"):
        store.create("test-huge", ["a", "b"], {}, session_id=sid)
    x = inputs(backbone, 2, 3)
    huge, nan = run(ex, [Pending(AdaptJob("huge", x[:1], ["a"])), Pending(AdaptJob("nan", x[1:], ["b"]))])
    assert isinstance(huge, AdaptResult) and huge.version == 1
    assert export(store, "huge")["W"].max() > 1e38 and torch.isfinite(export(store, "huge")["W"]).all()
    assert isinstance(nan, InvalidInput) and nan.code == "diverged" and store.info("nan").version == 0
    assert torch.isfinite(export(store, "nan")["b"]).all()
    store.close()


def test_a_failing_kernel_fails_its_rule_group_only(backbone, tmp_path):
    ex, store, _ = make(backbone, tmp_path)
    store.create("test-broken", ["a", "b"], {}, session_id="b1")
    store.create("sgd", ["a", "b"], {}, session_id="ok")
    before = export(store, "b1")
    x = inputs(backbone, 2, 2)
    broken, ok, base = run(ex, [Pending(AdaptJob("b1", x[:1], ["a"])), Pending(AdaptJob("ok", x[1:], ["b"])),
                                Pending(PredictJob(x))])
    assert isinstance(broken, Internal) and "nothing was changed" in broken.message
    assert isinstance(ok, AdaptResult) and ok.version == 1 and isinstance(base, PredictResult)
    assert store.info("b1").version == 0 and all(export(store, "b1")[k].equal(v) for k, v in before.items())
    store.close()


def test_a_failing_episodic_head_fails_alone(backbone, tmp_path):
    ex, store, _ = make(backbone, tmp_path)
    store.create("sgd", ["a", "b"], {}, session_id="ok")
    x = inputs(backbone, 2, 3)
    job = EpisodicJob(x[:1], x, ["a", "b"], "test-broken")
    ep, ok = run(ex, [Pending(job, episodic=resolve_episodic(job, store.C, 10)), Pending(AdaptJob("ok", x[:1], ["a"]))])
    assert isinstance(ep, Internal) and isinstance(ok, AdaptResult) and ok.version == 1
    store.close()


def test_a_failed_append_fails_only_its_session(backbone, tmp_path):
    ex, store, backend = make(backbone, tmp_path, durability="wal")
    for sid in ("s1", "s2"):
        store.create("sgd", ["a", "b"], {}, session_id=sid)
    real = backend.append

    def append(batch):
        out = real({k: v for k, v in batch.items() if k != "s1"})
        return {**out, "s1": "error: disk full"} if "s1" in batch else out

    backend.append = append
    x = inputs(backbone, 2, 4)
    r1, r2 = run(ex, [Pending(AdaptJob("s1", x[:1], ["a"])), Pending(AdaptJob("s2", x[1:], ["a"]))])
    backend.append = real
    assert isinstance(r1, Unavailable) and r1.code == "store_unavailable"
    assert isinstance(r2, AdaptResult) and r2.version == 1
    assert store.info("s1").version == 0 and store.info("s2").version == 1
    store.close()


def test_an_append_whose_outcome_is_unknown_is_resolved_from_the_store(backbone, tmp_path):
    """The append call fails as a whole after writing: the store is asked, and what it holds is
    acknowledged (never a 5xx for an adapt that was applied)."""
    ex, store, backend = make(backbone, tmp_path, durability="wal")
    store.create("sgd", ["a", "b"], {}, session_id="s")
    real = backend.append

    def append(batch):
        real(batch)
        raise StoreError("connection reset after the write")

    backend.append = append
    (r,) = run(ex, [Pending(AdaptJob("s", inputs(backbone, 1, 5), ["a"]))])
    backend.append = real
    assert isinstance(r, AdaptResult) and r.version == 1 and store.info("s").version == 1
    store.close()


def test_a_session_the_store_cannot_load_fails_alone(backbone, tmp_path):
    ex, store, backend = make(backbone, tmp_path, durability="wal", max_device_sessions=2, max_host_sessions=0)
    for sid in ("s1", "s2", "s3"):  # s1 goes to the disk tier (the store)
        store.create("sgd", ["a", "b"], {}, session_id=sid)
    real = backend.load
    backend.load = lambda key: (_ for _ in ()).throw(StoreError("read error")) if key == "s1" else real(key)
    x = inputs(backbone, 2, 6)
    r1, r3 = run(ex, [Pending(AdaptJob("s1", x[:1], ["a"])), Pending(AdaptJob("s3", x[1:], ["b"]))])
    backend.load = real
    assert isinstance(r1, Unavailable) and isinstance(r3, AdaptResult) and r3.version == 1
    (again,) = run(ex, [Pending(AdaptJob("s1", x[:1], ["a"]))])  # the store recovered
    assert isinstance(again, AdaptResult) and again.version == 1
    store.close()

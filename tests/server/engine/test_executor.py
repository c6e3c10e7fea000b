"""One micro-batch through the executor (no HTTP, no queue): one backbone pass for repeated
images, results as dataclasses, a bad job failing alone, adapts of one session as successive
rounds, episodic heads, and Idempotency-Key answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.config import Settings
from server.engine.batcher import Pending
from server.engine.engine import resolve_episodic
from server.engine.executor import Executor
from server.engine.feature_cache import FeatureCache
from server.engine.messages import AdaptJob, AdaptResult, EpisodicJob, Input, PredictJob, PredictResult
from server.engine.metrics import Metrics
from server.errors import InvalidInput, NotFound
from server.sessions import SessionStore
from tests.server.conftest import digits


class Counting:
    """The backbone, counting the rows it computes features for."""

    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, 0

    def features(self, x):
        self.rows += x.shape[0]
        return self.inner.features(x)


@pytest.fixture
def parts(backbone, tmp_path):
    s = Settings(snapshot_dir=tmp_path, max_wait_ms=1.0)
    metrics = Metrics()
    bb = backbone
    store = SessionStore(s, bb.embed_dim, bb.head.weight, bb.head.bias, bb.class_names, "cpu", s.backbone, metrics)
    ex = Executor(Counting(bb), store, FeatureCache(64, metrics), metrics, s)
    yield ex, store, metrics
    store.close()


def inputs(backbone, arrays) -> list[Input]:
    return [Input(f"arr:{hash(a.tobytes())}", backbone.preprocess(a)) for a in arrays]


def episodic_job(job: EpisodicJob, store) -> Pending:
    return Pending(job, episodic=resolve_episodic(job, store.C, max_steps=10))


def run(ex, items):
    for i in items:
        assert i.future.set_running_or_notify_cancel()
    ex.run(items)
    return [i.future.exception() or i.future.result() for i in items]


def test_one_batch_of_mixed_jobs(parts, backbone):
    ex, store, metrics = parts
    store.create("prototype", ["a", "b"], {}, session_id="s")
    xs = inputs(backbone, digits(3, seed=80))
    items = [
        Pending(AdaptJob("s", xs[:2], ["a", "b"])),
        Pending(AdaptJob("s", xs[2:3], ["nope"])),  # a bad label fails this job only
        Pending(AdaptJob("s", xs[2:3], ["a"])),  # the session's second adapt here: a second round
        Pending(PredictJob(xs[:1])),  # the base head
        Pending(PredictJob(xs[:2], session="ghost")),
        episodic_job(EpisodicJob(xs[:1], xs[:2], ["x", "y"], "prototype"), store),
    ]
    first, bad, second, base, ghost, episodic = run(ex, items)
    assert isinstance(first, AdaptResult) and first.version == 1 and first.applied == 2
    assert [p.true_label for p in first.predictions] == ["a", "b"]
    assert isinstance(bad, InvalidInput) and bad.code == "unknown_label"
    assert isinstance(second, AdaptResult) and second.version == 2
    assert isinstance(base, PredictResult) and base.head == "base" and base.version is None
    assert isinstance(ghost, NotFound)
    assert isinstance(episodic, PredictResult) and episodic.head == "episodic"
    assert episodic.predictions[0].label == "x"
    assert store.info("s").version == 2
    # the three distinct images ran through the backbone once, whatever the number of jobs
    assert ex.backbone.rows == 3


def test_an_idempotency_key_is_answered_from_the_first_response(parts, backbone):
    ex, store, _ = parts
    store.create("sgd", ["a", "b"], {}, session_id="s")
    xs = inputs(backbone, digits(1, seed=81))
    a, dup, reused = run(ex, [Pending(AdaptJob("s", xs, ["a"], ("k", "fp"))),
                              Pending(AdaptJob("s", xs, ["a"], ("k", "fp"))),
                              Pending(AdaptJob("s", xs, ["b"], ("k", "other")))])
    assert a.version == 1 and not a.replayed
    assert dup.replayed and dup.version == 1 and dup.predictions == a.predictions
    assert isinstance(reused, InvalidInput) and reused.code == "idempotency_key_reused"
    (later,) = run(ex, [Pending(AdaptJob("s", xs, ["a"], ("k", "fp")))])
    assert later.replayed and later.version == 1
    assert store.info("s").version == 1


def test_predictions_follow_the_head(parts, backbone):
    ex, store, _ = parts
    store.create("prototype", ["a", "b"], {}, session_id="s")
    x = inputs(backbone, digits(2, seed=82))
    run(ex, [Pending(AdaptJob("s", x, ["a", "b"]))])
    (p,) = run(ex, [Pending(PredictJob(x, session="s", top_k=2))])
    assert [q.label for q in p.predictions] == ["a", "b"] and p.version == 1
    assert all(len(q.top_k) == 2 and abs(sum(t.score for t in q.top_k) - 1) < 1e-5 for q in p.predictions)
    np.testing.assert_array_less(0, [q.score for q in p.predictions])
    assert torch.is_tensor(x[0].pixels)


def test_updates_get_the_rounds_forward_logits_of_exactly_their_rows(parts, backbone, monkeypatch):
    """Where the Triton path runs (forced here: on CPU the executor hands none, the torch path
    recomputes its own), each rule that reuses logits gets the round's forward logits of its own
    rows, in its rows' order: the predictions' forward is the adapt's one read of the heads."""
    import kernels
    from server.rules import RULES

    ex, store, _ = parts
    store.create("sgd", ["a", "b", "c"], {}, session_id="s1")
    store.create("sgd", ["a", "b"], {}, session_id="s2")
    store.create("tent", ["a", "b"], {"adapt_on_predict": True}, session_id="t")
    store.create("prototype", ["a", "b"], {}, session_id="p")
    xs = inputs(backbone, digits(6, seed=83))
    seen: dict[str, list] = {}
    for name in ("sgd", "tent", "prototype"):
        rule = RULES[name]
        original = rule.update

        def spy(heads, x, y, slots, state_rows, batch=None, _name=name, _original=original, **kwargs):
            expected = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
            seen.setdefault(_name, []).append((kwargs.get("logits"), expected))
            return _original(heads, x, y, slots, state_rows, batch=batch, **kwargs)

        monkeypatch.setattr(rule, "update", spy)
    monkeypatch.setattr(kernels.dispatch, "logits_reusable", lambda x: True)
    run(ex, [Pending(PredictJob(xs[:1])),  # the base head first: its row shifts every later one
             Pending(AdaptJob("s1", xs[1:3], ["a", "c"])),
             Pending(PredictJob(xs[3:4], session="t")),  # adapt_on_predict: an unlabelled tent update
             Pending(AdaptJob("p", xs[4:5], ["b"])),
             Pending(AdaptJob("s2", xs[5:6], ["b"]))])
    (sgd_logits, sgd_expected), = seen["sgd"]
    assert sgd_logits is not None and sgd_logits.shape == (3, 4)  # the 4-wide pool of these heads
    torch.testing.assert_close(sgd_logits, sgd_expected, rtol=1e-5, atol=1e-5)  # rows of s1 then s2
    (tent_logits, tent_expected), = seen["tent"]
    torch.testing.assert_close(tent_logits, tent_expected, rtol=1e-5, atol=1e-5)
    (proto_logits, _), = seen["prototype"]
    assert proto_logits is None  # prototype does not reuse logits: nothing handed in
    assert store.info("s1").version == 1 and store.info("s2").version == 1


def test_heads_of_every_width_share_a_batch_as_if_sent_alone(parts, backbone, tmp_path, monkeypatch):
    """Sessions of 2, 10 and 30 classes (pools 4, 12 and 32 wide) in one batch: one update call
    per width, and each answer and head exactly what the session gets in a batch of its own."""
    from server.rules import RULES

    ex, store, metrics = parts
    widths = {"w2": 2, "w10": 10, "w30": 30, "v10": 10}
    classes = {k: [f"c{i}" for i in range(n)] for k, n in widths.items()}
    xs = inputs(backbone, digits(8, seed=91))
    jobs = lambda: [Pending(AdaptJob(k, xs[2 * i:2 * i + 2], [classes[k][i], classes[k][0]]))  # noqa: E731
                    for i, k in enumerate(widths)]
    calls = []
    original = RULES["sgd"].update
    monkeypatch.setattr(RULES["sgd"], "update", lambda heads, *a, **kw: (calls.append(heads.W.shape[1]),
                                                                          original(heads, *a, **kw))[1])
    for k in widths:
        store.create("sgd", classes[k], {}, session_id=k)
    together = run(ex, jobs())
    assert sorted(calls) == [4, 12, 32]  # one call per width: v10 shares w10's

    alone_store = SessionStore(Settings(snapshot_dir=tmp_path / "alone"), backbone.embed_dim, backbone.head.weight,
                               backbone.head.bias, backbone.class_names, "cpu", "x", Metrics())
    alone_ex = Executor(Counting(backbone), alone_store, FeatureCache(64, Metrics()), Metrics(),
                        Settings(snapshot_dir=tmp_path))
    try:
        for k in widths:
            alone_store.create("sgd", classes[k], {}, session_id=k)
        for job, first in zip(jobs(), together):
            (alone,) = run(alone_ex, [job])
            assert isinstance(alone, AdaptResult) and alone.version == first.version == 1
            assert [(p.label, p.score) for p in alone.predictions] == [(p.label, p.score) for p in first.predictions]
        for k in widths:
            assert _same_head(alone_store, store, k), k
    finally:
        alone_store.close()


def _same_head(a, b, key) -> bool:
    from safetensors.torch import load as st_load

    ta, tb = st_load(a.export(key)), st_load(b.export(key))
    return ta.keys() == tb.keys() and all(ta[n].equal(tb[n]) for n in ta)


def test_the_engine_logs_and_exports_the_head_ops_implementation(backbone, tmp_path, caplog):
    import logging

    from server.engine import Engine

    engine = Engine(Settings(snapshot_dir=tmp_path, warmup=False), backbone=backbone)
    with caplog.at_level(logging.INFO, logger="fwserve"):
        engine.start()
        assert engine.wait_loaded(60), engine.load_error
    try:
        assert any(r.getMessage() == "head ops on cpu: head_forward torch, sgd_step torch, delta_step torch, "
                   "prototype_step torch, rls_step torch, support_step torch, entropy_step torch, "
                   "class_mean_head_step torch" for r in caplog.records)
        assert 'kernels="torch"' in engine.metrics.scrape().decode()
    finally:
        engine.stop()


def test_predictions_rank_as_a_stable_descending_torch_sort():
    """Host-side ranking of a round's probabilities: the order torch.sort(descending, stable)
    gives, ties to the lowest index, NaN first, masked classes (beyond the session's) never shown."""
    from server.engine.executor import _predictions

    g = torch.Generator().manual_seed(5)
    probs = torch.rand(64, 12, generator=g).div(0.25).floor().div(4)  # few distinct values: many ties
    probs[3, 5] = probs[7, 0] = probs[7, 9] = float("nan")
    classes = [f"c{i}" for i in range(10)]
    for top_k in (1, 3, 10, 50):
        got = _predictions(probs.tolist(), classes, top_k)
        vals, idx = torch.sort(probs[:, :10], dim=1, descending=True, stable=True)
        for row, pred, v_row, i_row in zip(probs.tolist(), got, vals.tolist(), idx.tolist()):
            k = min(top_k, 10)
            assert [t.index for t in pred.top_k] == i_row[:k]
            assert [t.label for t in pred.top_k] == [classes[i] for i in i_row[:k]]
            assert [repr(t.score) for t in pred.top_k] == [repr(row[i]) for i in i_row[:k]]  # nan == nan
            assert (pred.label, pred.index) == (classes[i_row[0]], i_row[0])


def test_a_round_of_one_rules_adapts_updates_with_the_forwards_rows(parts, backbone, monkeypatch):
    """When every row of a round goes to one rule's update, the update gets the forward's very
    rows, batch and (where reused) logits, and computes what a fresh batch would."""
    import kernels
    from server.rules import RULES

    ex, store, _ = parts
    for sid in ("s1", "s2", "r1", "r2"):
        store.create("sgd", ["a", "b", "c"], {}, session_id=sid)
    xs = inputs(backbone, digits(3, seed=84))
    seen = []
    original = RULES["sgd"].update

    def spy(heads, x, y, slots, state_rows, batch=None, **kwargs):
        seen.append((x.clone(), slots.tolist(), kwargs.get("logits"),
                     kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)))
        return original(heads, x, y, slots, state_rows, batch=batch, **kwargs)

    monkeypatch.setattr(RULES["sgd"], "update", spy)
    monkeypatch.setattr(kernels.dispatch, "logits_reusable", lambda x: True)
    run(ex, [Pending(AdaptJob("s1", xs[:2], ["a", "c"])), Pending(AdaptJob("s2", xs[2:], ["b"]))])
    monkeypatch.setattr(kernels.dispatch, "logits_reusable", lambda x: False)
    run(ex, [Pending(AdaptJob("r1", xs[:2], ["a", "c"])), Pending(AdaptJob("r2", xs[2:], ["b"]))])
    (x, slots, logits, expected), (x_ref, _, none, _) = seen
    assert torch.equal(x, x_ref) and len(slots) == 3 and none is None
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for a, b in (("s1", "r1"), ("s2", "r2")):
        assert torch.equal(export_head(store, a), export_head(store, b)), a


def export_head(store, key):
    from safetensors.torch import load

    return load(store.export(key))["W"]


@pytest.mark.parametrize("owns_process", [False, True])
def test_only_an_engine_that_owns_its_process_freezes_the_collector_once_loaded(backbone, tmp_path, owns_process):
    import gc

    from server.engine import Engine

    gc.unfreeze()
    engine = Engine(Settings(snapshot_dir=tmp_path, warmup=False), backbone=backbone)
    engine.owns_process = owns_process
    engine.start()
    try:
        assert engine.wait_loaded(60), engine.load_error
        assert (gc.get_freeze_count() > 0) == owns_process
    finally:
        gc.unfreeze()
        engine.stop()

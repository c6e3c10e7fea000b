"""The rule registry: a rule added from one file is served end to end (sessions, adapt,
predict, episodic heads, export/import, write-ahead-log replay after a restart), and every
built-in rule's module follows the same contract."""

from __future__ import annotations

import sys

import pytest
import torch

from server.client import Client, FwserveError
from server.rules import RULES, Rule, get_rule, per_slot_hyper
from server.errors import InvalidInput
from tests.server.conftest import digits, live_server

TOY = "tests.server.rules.toy_rule"


@pytest.fixture
def toy_rule():
    yield
    RULES.pop("hebb", None)  # the registry is process-wide: leave it as the other tests expect
    sys.modules.pop(TOY, None)


def test_a_rule_from_one_file_is_served_end_to_end(backbone, tmp_path, toy_rule):
    xs = digits(4, seed=70)
    with live_server(backbone, tmp_path, rule_modules=TOY, durability="wal") as srv, Client(srv.url) as c:
        assert "hebb" in RULES
        sid = c.create_session("hebb", classes=["a", "b"], hyperparameters={"lr": 2.0}, session_id="toy").id
        r = c.adapt(sid, xs[:2], ["a", "b"])
        assert r.version == 1 and r.applied == 2
        p = c.predict(xs[:2], session_id=sid)
        assert [q.label for q in p.predictions] == ["a", "b"] and p.version == 1
        with pytest.raises(FwserveError) as e:
            c.create_session("hebb", classes=["a"], hyperparameters={"lr": 50.0})
        assert e.value.status == 422 and e.value.code == "invalid_hyperparameter"
        ep = c.predict_episodic(xs[2:4], xs[2:4], ["x", "y"], rule="hebb")
        assert [q.label for q in ep.predictions] == ["x", "y"]
        exported = c.export_session(sid)
        before = c.predict(xs, session_id=sid, top_k=2)
    with live_server(backbone, tmp_path, rule_modules=TOY, durability="wal") as srv, Client(srv.url) as c:
        after = c.predict(xs, session_id="toy", top_k=2)  # replayed from the log
        assert after.version == 1 and after.predictions == before.predictions
        c.import_session("copy", exported)
        assert c.predict(xs, session_id="copy", top_k=2).predictions == before.predictions


@pytest.mark.parametrize("name", ["sgd", "delta", "prototype", "rls", "t3a", "tent", "feature_stats",
                                  "feature_stats_t3a", "lame"])
def test_built_in_rules_follow_the_contract(name):
    rule = get_rule(name)
    assert isinstance(rule, Rule) and rule.name == name and rule.description
    hyper = rule.validate({})
    assert set(hyper) == set(rule.hyper)
    n, d = 3, 8
    state = rule.init_state(n, d, hyper, head={"W": torch.randn(n, d), "b": torch.randn(n),
                                               "feature_mean": torch.randn(d), "feature_var": torch.rand(d) + 0.5})
    for k, shape in rule.state_shapes(n, d).items():
        assert tuple(state[k].shape) == shape and state[k].dtype == torch.float32, k
    assert {k for k in state if k not in ("W", "b")} == set(rule.state)
    assert all(k in per_slot_hyper() for k, h in rule.hyper.items() if h.per_slot)
    for k, values in rule.search_space.items():
        assert k in rule.hyper and all(rule.validate({k: v})[k] == float(v) for v in values)


def test_unknown_rules_and_hyper_parameters_are_refused():
    with pytest.raises(InvalidInput) as e:
        get_rule("nope")
    assert e.value.code == "unknown_rule"
    with pytest.raises(InvalidInput) as e:
        get_rule("sgd").validate({"lr": -1.0})
    assert e.value.code == "invalid_hyperparameter"
    with pytest.raises(InvalidInput):
        get_rule("sgd").validate({"momentum": 0.9})


def test_the_warm_up_runs_every_rule_at_the_store_width_and_every_batch_size():
    """Before readiness every rule's update runs on heads as wide as the store's, at the batch
    sizes a micro-batch can have (on CUDA that compiles each kernel specialisation up front)."""
    from server.engine.engine import warm_head_ops
    from server.rules import register

    seen = []

    class Recorder(Rule):
        name = "test-recorder"

        def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
            seen.append((heads.W.shape[1], x.shape[0]))
            return 0

    register(Recorder())
    try:
        warm_head_ops(64, 8, "cpu", 16)
    finally:
        RULES.pop("test-recorder")
    assert seen == [(64, 1), (64, 2), (64, 16)]

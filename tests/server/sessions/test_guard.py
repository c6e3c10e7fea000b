"""Guards through the session store, driven the way the executor drives them (one transaction per
request: forward, shadow reference predictions, apply, evidence, commit), on synthetic features
whose base head is the Bayes head: bad settings are refused, a burst of wrong labels trips the
guard and its action (rollback to a version from before the burst, bit for bit and replayed
exactly from the log; freeze until unfrozen, durable; alert only), clean streams never trip,
label-free collapse is told apart from a stream of one class, update-size limits refuse an update
whole, the tent rule's own reset is reported as a trip, and a pinned reference scores with the
pinned version's head."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load as st_load

import kernels
from server.config import Settings
from server.errors import Conflict, InvalidInput
from server.rules import get_rule
from server.sessions import SessionStore, StoreEvents
from server.sessions.guard import Watch, parse

D, C = 8, 3
CLASSES = [str(i) for i in range(C)]
MU = 3.0 * torch.eye(C, D)
BASE_W, BASE_B = MU.clone(), -(MU ** 2).sum(1) / 2


class Trips(StoreEvents):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def guard_tripped(self, rule, action, trigger, session_key, version):
        self.seen.append((rule, action, trigger))


def new_store(root: Path, mode: str = "wal", events=None, **kw) -> SessionStore:
    s = Settings(snapshot_dir=root, durability=mode, max_device_sessions=4, max_host_sessions=2, max_classes=6, **kw)
    return SessionStore(s, D, BASE_W, BASE_B, CLASSES, "cpu", "test", events=events)


def data(n: int, seed: int, wrong: bool = False, one_class: Optional[int] = None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g) if one_class is None else torch.full((n,), one_class)
    x = MU[y] + 0.8 * torch.randn(n, D, generator=g)
    return x, ((y + 1) % C if wrong else y)


def step(st: SessionStore, key: str, x: torch.Tensor, y: torch.Tensor, actor: Optional[str] = None):
    """One adapt request as the executor runs it -> the guard's outcome, or the error refusing it."""
    with st.batch([key]) as txn:
        err = txn.admit(key, len(x))
        if err is not None:
            return err
        slots = torch.tensor([txn.slot(key)] * len(x))
        probs = torch.softmax(txn.forward(x, slots, txn.width(key)).float(), dim=1)
        ref = txn.reference_probs(x, [key] * len(x)) if txn.guarded(key) else None
        rule = txn.found[key].rule
        rows = torch.tensor([txn.state_row(key)] * len(x)) if rule.state else None
        _, undone = txn.apply(rule, x, y, slots, rows, txn.width(key))
        if key in undone:
            return undone[key]
        if ref is not None:
            txn.observe(key, x, y.tolist(), probs, ref)
        labelled = y >= 0
        txn.commit(key, len(x), int((probs.argmax(1) == y)[labelled].sum()), int(labelled.sum()), actor=actor)
        out = txn.guard_outcome(key)
    assert txn.errors == {}
    return out


def attack(st: SessionStore, key: str, clean_first: int = 6, burst: int = 4, after: int = 8, batch: int = 8):
    """Clean labelled requests, a burst of wrong labels, clean again -> (states by version, outcomes)."""
    states, outcomes = {0: st_load(st.export(key))}, []
    seed = 0
    for phase, n in (("clean", clean_first), ("burst", burst), ("clean", after)):
        for _ in range(n):
            seed += 1
            out = step(st, key, *data(batch, seed, wrong=phase == "burst"))
            if out is not None:
                outcomes.append(out)
            states[st.info(key).version] = st_load(st.export(key))
    return states, outcomes


GUARD = {"action": "rollback", "window": 16}


@pytest.mark.parametrize("spec, says", [
    ({}, "guard.action"), ({"action": "undo"}, "guard.action"), ({"action": "freeze", "margin": 2}, "margin"),
    ({"action": "freeze", "window": 4}, "window"), ({"action": "freeze", "window": 10.5}, "integer"),
    ({"action": "freeze", "color": "red"}, "unknown guard settings"),
    ({"action": "freeze", "reference": 3}, "reference"), ({"action": "freeze", "reference": True}, "reference"),
    ({"action": "freeze", "max_step_norm": -1}, "max_step_norm"), ({"action": "freeze", "max_lr": 0.01}, "max_lr"),
    ({"action": "freeze", "entropy_drift": "high"}, "number"), ({"action": "freeze", "label_conflict": 1.5}, "label_conflict"),
    ({"action": "freeze", "label_conflict": 0}, "label_conflict"),
])
def test_bad_guard_settings_are_refused_and_nothing_is_made(tmp_path, spec, says):
    st = new_store(tmp_path)
    with pytest.raises(InvalidInput) as e:
        st.create("sgd", CLASSES, {}, session_id="s", guard=spec)
    assert e.value.code == "invalid_guard" and says in e.value.message
    assert st.tenant_count(None) == 0
    with pytest.raises(InvalidInput):  # 'base' needs the backbone's classes
        st.create("sgd", ["x", "y"], {}, session_id="t", guard={"action": "freeze", "reference": "base"})
    st.close()


def test_defaults_fill_in_and_the_reference_follows_the_classes():
    cfg = parse({"action": "rollback"}, classes=CLASSES, base_classes=CLASSES, version=0, hyper={})
    assert cfg["reference"] == "base" and cfg["margin"] == 0.1 and cfg["window"] == 64
    cfg = parse({"action": "alert"}, classes=["x", "y"], base_classes=CLASSES, version=7, hyper={})
    assert cfg["reference"] == 7  # pinned: the version current when the guard is set


def test_a_burst_of_wrong_labels_trips_and_rolls_back_to_before_it(tmp_path):
    trips = Trips()
    st = new_store(tmp_path / "live", events=trips)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s", guard=GUARD)
    states, outcomes = attack(st, "s")
    (out,) = outcomes[:1]
    assert out["trigger"] == "accuracy" and out["action"] == "rollback"
    assert out["to"] <= 6 + 1  # the last clean version, or the first of the burst before it learnt much
    v = out["rollback_version"]
    assert torch.equal(states[v]["W"], states[out["to"]]["W"])  # that version's state, bit for bit
    entries = {e["version"]: e for e in st.versions("s")[0]}
    assert entries[v]["kind"] == "rollback" and entries[v]["by"] == "guard" and entries[v]["source"] == {
        "version": out["to"]}
    assert entries[out["version"]]["guard"]["action"] == "rollback"
    assert ("sgd", "rollback", "accuracy") in trips.seen
    live = st_load(st.export("s"))
    shutil.copytree(tmp_path / "live", tmp_path / "image")  # a crash image: the log replays the rollback
    again = new_store(tmp_path / "image")
    assert torch.equal(st_load(again.export("s"))["W"], live["W"])
    assert torch.equal(again.version_head("s", v).W, states[out["to"]]["W"])
    again.close()
    st.close()


def test_freeze_stops_adapts_until_unfrozen_and_survives_a_restart(tmp_path):
    st = new_store(tmp_path)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s", guard={**GUARD, "action": "freeze"})
    _, outcomes = attack(st, "s")
    assert outcomes[0]["action"] == "freeze" and st.info("s").frozen
    version = st.info("s").version
    err = step(st, "s", *data(8, 100))
    assert isinstance(err, Conflict) and err.code == "session_frozen" and st.info("s").version == version
    st.close()
    st = new_store(tmp_path)  # frozen is durable (the log carries it)
    assert st.info("s").frozen
    assert not st.patch("s", frozen=False).frozen
    assert step(st, "s", *data(8, 101)) is None and st.info("s").version == version + 1
    st.close()
    st = new_store(tmp_path)
    assert not st.info("s").frozen
    st.close()


def test_alert_only_reports(tmp_path):
    trips = Trips()
    st = new_store(tmp_path, events=trips)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s", guard={**GUARD, "action": "alert"})
    states, outcomes = attack(st, "s")
    assert outcomes and all(o["action"] == "alert" for o in outcomes) and not st.info("s").frozen
    assert {e["kind"] for e in st.versions("s")[0]} == {"create", "adapt"}  # no version was made for it
    assert ("sgd", "alert", "accuracy") in trips.seen
    st.close()


def test_clean_streams_never_trip(tmp_path):
    st = new_store(tmp_path, "none")
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s", guard=GUARD)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="u")
    for i in range(40):
        x, y = data(8, 500 + i)
        assert step(st, "s", x, y) is None
        step(st, "u", x, y)
    assert torch.equal(st_load(st.export("s"))["W"], st_load(st.export("u"))["W"])  # the guard changed nothing
    st.close()


def test_collapse_is_told_apart_from_a_stream_of_one_class():
    cfg = parse({"action": "rollback", "window": 16}, classes=CLASSES, base_classes=CLASSES, version=0, hyper={})
    one_hot = torch.eye(C)
    diverse = one_hot[torch.arange(16) % C]
    same = one_hot[torch.zeros(16, dtype=torch.int64)]
    w = Watch(cfg, C)  # the stream is one class: the reference says so too
    assert w.observe(1, torch.zeros(16, D), [-1] * 16, same, same) is None
    w = Watch(cfg, C)  # the head collapsed: the reference still sees three classes
    assert w.observe(1, torch.zeros(16, D), [-1] * 16, same, diverse) == "collapse"
    rows = w.evidence("collapse")
    assert not w.judge("collapse", rows, same) and w.judge("collapse", rows, diverse)


def test_update_size_limits_refuse_an_update_whole(tmp_path):
    st = new_store(tmp_path)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s",
              guard={"action": "alert", "max_examples": 4, "max_step_norm": 0.5})
    before = st_load(st.export("s"))
    err = step(st, "s", *data(8, 1))
    assert isinstance(err, InvalidInput) and err.code == "update_too_large" and "4" in err.message
    err = step(st, "s", 10 * MU[:2], torch.tensor([1, 0]))  # far outside: a big step
    assert isinstance(err, InvalidInput) and err.code == "update_too_large" and "per request" in err.message
    assert st.info("s").version == 0 and torch.equal(st_load(st.export("s"))["W"], before["W"])
    assert step(st, "s", *data(2, 2)) is None and st.info("s").version == 1
    x, y = data(2, 3, wrong=True)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="u")
    step(st, "u", x, y)
    d = st_load(st.export("u"))
    one = float(((d["W"] - BASE_W) ** 2).sum() + ((d["b"] - BASE_B) ** 2).sum()) ** 0.5  # one request's move
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="b",
              guard={"action": "alert", "window": 8, "max_window_norm": 1.5 * one})
    accepted = [step(st, "b", x, y) is None for _ in range(12)]  # 2 examples each: 4 requests fill the window
    # a budget of head movement over the last 8 examples offered: a request gets through once the
    # accepted one has left the window; refused ones move the window too, so learning goes on
    assert accepted[:5] == [True, False, False, False, False] and accepted[5]
    assert st.info("b").version == sum(accepted) < 12
    st.close()


def test_max_lr_is_a_ceiling_on_the_rule_step(tmp_path):
    st = new_store(tmp_path)
    with pytest.raises(InvalidInput) as e:
        st.create("sgd", CLASSES, {"lr": 0.5}, session_id="s", guard={"action": "alert", "max_lr": 0.1})
    assert "lr=0.5" in e.value.message
    st.create("sgd", CLASSES, {"lr": 0.05}, session_id="s", guard={"action": "alert", "max_lr": 0.1})
    st.close()


def test_tent_reset_is_its_default_guard_and_a_guard_takes_it_over(tmp_path):
    trips = Trips()
    st = new_store(tmp_path, "none", events=trips)
    hyper = {"collapse_window": 2, "collapse_share": 0.01, "min_confidence": 0.0}
    st.create("tent", CLASSES, hyper, init="base", session_id="t")
    out = step(st, "t", *data(4, 1, one_class=0)[:1], torch.full((4,), -1))
    assert out["action"] == "reset" and ("tent", "reset", "collapse") in trips.seen
    assert st.versions("t")[0][0]["guard"]["action"] == "reset"
    st.create("tent", CLASSES, hyper, init="base", session_id="g", guard={"action": "alert"})
    assert st.info("g").hyperparameters["collapse_reset"] == 0.0 and st.info("t").hyperparameters["collapse_reset"] == 1
    assert step(st, "g", *data(4, 1, one_class=0)[:1], torch.full((4,), -1)) is None  # no kernel reset
    st.close()


def test_a_pinned_reference_scores_with_that_versions_head(tmp_path):
    st = new_store(tmp_path)
    st.create("delta", ["x", "y", "z"], {"beta": 1.0}, session_id="s")
    for i in range(3):
        step(st, "s", *data(4, i))
    pinned = st.version_head("s", 2)
    st.patch("s", guard={"action": "alert", "reference": 2})
    step(st, "s", *data(4, 9))
    x = torch.randn(5, D)
    with st.batch(["s"]) as txn:
        got = txn.reference_probs(x, ["s"] * 5)
    W = torch.zeros(1, st.C, D)
    W[0, :3] = pinned.W
    b = torch.zeros(1, st.C)
    b[0, :3] = pinned.b
    want = torch.softmax(kernels.head_forward(x, W, b, torch.zeros(5, dtype=torch.int64), torch.tensor([3]),
                                              normalize=torch.tensor([get_rule("delta").normalize])), dim=1)
    assert torch.allclose(got, want)
    st.close()
    again = new_store(tmp_path)  # the reference head is kept with the guard
    assert again.info("s").guard["reference"] == 2 and torch.equal(again.held["s"].watch.ref["W"], pinned.W)
    again.close()


def test_feature_drift_trips_when_asked_and_not_by_default():
    cfg = parse({"action": "alert", "window": 16, "feature_drift": 0.5}, classes=CLASSES, base_classes=CLASSES,
                version=0, hyper={})
    probs = torch.eye(C)[torch.arange(16) % C]
    g = torch.Generator().manual_seed(0)
    w = Watch(cfg, C)
    assert w.observe(1, torch.randn(16, D, generator=g), [-1] * 16, probs, probs) is None  # the baseline window
    assert w.observe(2, torch.randn(16, D, generator=g), [-1] * 16, probs, probs) is None  # the same inputs
    assert w.observe(3, torch.randn(16, D, generator=g) + 3.0, [-1] * 16, probs, probs) == "feature_drift"
    default = parse({"action": "alert", "window": 16}, classes=CLASSES, base_classes=CLASSES, version=0, hyper={})
    w = Watch(default, C)
    for v in (1, 2):
        assert w.observe(v, torch.randn(16, D, generator=g) + 3.0 * v, [-1] * 16, probs, probs) is None


CONFLICT = {"action": "rollback", "window": 16, "label_conflict": 0.4, "margin": 1.0}  # the accuracy trigger off


def test_label_conflict_trips_during_a_burst_and_rolls_back_to_before_it(tmp_path):
    """A burst of labels the base head predicts otherwise trips the guard while it lasts (the
    accuracy trigger, off here, sees it only once correct labels return)."""
    trips = Trips()
    st = new_store(tmp_path, events=trips)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="s", guard=CONFLICT)
    states, outcomes = attack(st, "s", clean_first=6, burst=4, after=0)
    assert outcomes, "the burst did not trip the guard"
    out = outcomes[0]
    assert out["trigger"] == "label_conflict" and out["action"] == "rollback"
    assert 6 < out["version"] <= 6 + 4  # during the burst
    assert out["to"] == 6  # the last version before the first contradicted label
    assert torch.equal(states[out["rollback_version"]]["W"], states[6]["W"])
    assert ("sgd", "rollback", "label_conflict") in trips.seen
    st.close()


def test_label_conflict_stays_quiet_on_clean_labels_and_is_off_by_default(tmp_path):
    st = new_store(tmp_path)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="on", guard=CONFLICT)
    st.create("sgd", CLASSES, {"lr": 0.5}, init="base", session_id="off", guard={**CONFLICT, "label_conflict": None})
    _, quiet = attack(st, "on", clean_first=12, burst=0, after=0)
    assert quiet == []
    _, outcomes = attack(st, "off", clean_first=6, burst=4, after=0)
    assert all(o["trigger"] != "label_conflict" for o in outcomes)
    st.close()

"""The learned rules over HTTP: sessions and episodic heads of meta_sgd and hyper learn digits the
backbone never saw; their logged adapts replay after a restart; a backbone without their
parameters refuses them with a clear 4xx, and parameters trained for other weights stop the start."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from models import bundled_weights
from models.data import NOVEL_CLASSES, mnist_split
from models.rule_params import rule_params_path
from server.api import create_app
from server.client import Client, FwserveError
from server.config import Settings
from tests.server.conftest import BACKBONE, LiveServer, backbone, digits, live_server  # noqa: F401 (the shared backbone fixture)

pytestmark = pytest.mark.skipif(bundled_weights(BACKBONE) is None, reason="the learned rules ship for the bundled backbone")
CLASSES = [str(c) for c in NOVEL_CLASSES]


def novel_digits(split: str, per_class: int, skip: int = 0):
    data = mnist_split(split).subset(NOVEL_CLASSES)
    xs, ys = [], []
    for c in NOVEL_CLASSES:
        idx = np.flatnonzero(data.labels == c)[skip:skip + per_class]
        xs += [data.images[i].astype(np.float32) for i in idx]
        ys += [str(c)] * len(idx)
    order = np.random.default_rng(0).permutation(len(xs))
    return [xs[i] for i in order], [ys[i] for i in order]


@pytest.mark.parametrize("rule,floor", [("hyper", 0.45), ("meta_sgd", 0.35)])
def test_a_learned_rule_session_learns_new_digits_from_five_labels_each(backbone, tmp_path, rule, floor):
    support, labels = novel_digits("train", 5)
    queries, truth = novel_digits("selection", 10)
    with live_server(backbone, tmp_path) as srv, Client(srv.url) as c:
        sid = c.create_session(rule, CLASSES).id
        for i in range(0, len(support), 10):  # online, ten labels per adapt
            c.adapt(sid, support[i:i + 10], labels[i:i + 10])
        assert c.get_session(sid).version == 3
        got = [p.label for p in c.predict(queries, session_id=sid).predictions]
        accuracy = np.mean([g == t for g, t in zip(got, truth)])
        assert accuracy >= floor, f"{rule}: {accuracy:.2f} on 50 unseen digits (chance 0.20)"
        # the episodic head of the same rule on the same support answers the same (hyper: exactly)
        episodic = c.predict_episodic(queries[:10], support, labels, rule=rule, classes=CLASSES)
        if rule == "hyper":
            assert [p.label for p in episodic.predictions] == got[:10]
        assert all(p.label in CLASSES for p in episodic.predictions)


def test_learned_rule_sessions_replay_from_the_log_after_a_restart(backbone, tmp_path):
    support, labels = novel_digits("train", 3)
    queries, _ = novel_digits("selection", 2)
    settings = dict(durability="wal", snapshot_interval_s=3600)
    before = {}
    with live_server(backbone, tmp_path, **settings) as srv, Client(srv.url) as c:
        for rule in ("hyper", "meta_sgd"):
            c.create_session(rule, CLASSES, session_id=f"s-{rule}")
            c.adapt(f"s-{rule}", support[:8], labels[:8])
            c.adapt(f"s-{rule}", support[8:], labels[8:])
            before[rule] = [p.top_k[0].score for p in c.predict(queries, session_id=f"s-{rule}", top_k=1).predictions]
    with live_server(backbone, tmp_path, **settings) as srv, Client(srv.url) as c:
        for rule in ("hyper", "meta_sgd"):
            assert c.get_session(f"s-{rule}").version == 2
            after = [p.top_k[0].score for p in c.predict(queries, session_id=f"s-{rule}", top_k=1).predictions]
            assert after == before[rule], rule


def test_a_backbone_without_their_parameters_refuses_the_learned_rules(tmp_path):
    from models import load_backbone

    other = load_backbone(BACKBONE, random_init=True)  # other weights: the bundled parameters are not for it
    xs = digits(4, seed=3)
    with live_server(other, tmp_path) as srv, Client(srv.url) as c:
        for rule in ("meta_sgd", "hyper"):
            with pytest.raises(FwserveError) as e:
                c.create_session(rule, ["a", "b"])
            assert e.value.status == 422 and e.value.code == "rule_not_trained", e.value
            assert "fwserve train-rule" in e.value.message
            with pytest.raises(FwserveError) as e:
                c.predict_episodic(xs[:1], xs[:2], ["a", "b"], rule=rule)
            assert e.value.status == 422 and e.value.code == "rule_not_trained"
        assert c.list_sessions().sessions == []  # nothing was created
        c.create_session("prototype", ["a", "b"], session_id="still-fine")
        assert c.predict_episodic(xs[:1], xs[:2], ["a", "b"]).predictions[0].label in ("a", "b")


def test_rule_parameters_for_other_weights_stop_the_start(tmp_path):
    from models import load_backbone

    other = load_backbone(BACKBONE, random_init=True)
    given = rule_params_path(bundled_weights(BACKBONE), "hyper")
    app = create_app(Settings(snapshot_dir=tmp_path / "s", rule_params=str(given)), backbone=other)
    srv = LiveServer(app)
    srv.thread.start()
    try:
        engine = app.state.engine
        for _ in range(600):  # the app starts its engine's loader when it starts serving
            if engine._loader is not None:
                break
            time.sleep(0.05)
        engine.wait_loaded(60)
        assert not engine.ready and "trained for backbone weights" in engine.load_error and "hyper" in engine.load_error
        r = httpx.get(srv.url + "/v2/health/ready")
        assert r.status_code == 503 and "trained for backbone weights" in r.text
    finally:
        srv.stop()


def test_the_rule_list_says_which_rules_this_server_can_use(backbone, tmp_path):
    from models import load_backbone
    from server.rules import RULES

    with live_server(backbone, tmp_path) as srv, Client(srv.url) as c:
        listed = {r.name: r for r in c.rules().rules}
        assert set(listed) == set(RULES)
        assert all(r.available and r.reason is None for r in listed.values())
        assert listed["hyper"].learned and not listed["sgd"].learned
        assert not listed["tent"].needs_labels and listed["rls"].needs_labels
        lr = listed["sgd"].hyperparameters["lr"]
        assert (lr.default, lr.low, lr.low_excluded, lr.high) == (0.1, 0.0, True, 10.0)
        assert listed["t3a"].hyperparameters["adapt_on_predict"].flag
    with live_server(load_backbone(BACKBONE, random_init=True), tmp_path / "other") as srv, Client(srv.url) as c:
        listed = {r.name: r for r in c.rules().rules}
        for name in ("meta_sgd", "hyper"):
            assert not listed[name].available and "fwserve train-rule" in listed[name].reason
        assert listed["prototype"].available


def test_a_parameter_file_without_a_tensor_the_rule_needs_stops_the_start(backbone, tmp_path):
    from models import RuleParams
    from models.rule_params import save_rule_params

    path = save_rule_params(tmp_path / "partial.safetensors",
                            RuleParams("meta_sgd", {"feature_rates": torch.ones(backbone.embed_dim)}, backbone.fingerprint))
    app = create_app(Settings(snapshot_dir=tmp_path / "s", rule_params=str(path)), backbone=backbone)
    srv = LiveServer(app)
    srv.thread.start()
    try:
        engine = app.state.engine
        for _ in range(600):
            if engine._loader is not None:
                break
            time.sleep(0.05)
        engine.wait_loaded(60)
        assert not engine.ready and "lack bias_rate, steps" in engine.load_error
    finally:
        srv.stop()

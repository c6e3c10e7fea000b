"""Label-free rules (t3a, tent): they beat a static head on a synthetic shift, their safeguards
trigger on a collapsing stream, and they work through /v1/adapt without labels and on
/v1/predict for sessions that opt in."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from server.client import Client, FwserveError
from server.rules import RULES, scratch_heads
from tests.server.conftest import arr, backbone, digits, live_server  # noqa: F401 (the shared backbone fixture)
from tests.server.learned import learned_params

D, C = 16, 4
MU = 3.0 * torch.eye(C, D)  # source class means
W0, B0 = MU.clone(), -(MU**2).sum(1) / 2  # the Bayes head for the source: the "base head"
# the source's feature statistics (classes equally likely, unit noise), as the backbone's come with its base head
SOURCE = {"feature_mean": MU.mean(0), "feature_var": 1.0 + MU.var(0, unbiased=False)}


def one_session(rule_name: str, hyper: dict | None = None):
    """A single-slot Heads for `rule` started from the base head (zeros for rules that cannot)."""
    rule = RULES[rule_name]
    hp = rule.validate(hyper or {})
    head = {"W": W0.clone(), "b": B0.clone()} if rule.base_init else {"W": torch.zeros(C, D), "b": torch.zeros(C)}
    state = rule.init_state(C, D, hp, head={**head, **SOURCE} if rule.base_init else dict(head))
    heads, _ = scratch_heads([(rule, hp, C, {**head, **state})], C, D, "cpu", learned=learned_params(D))
    return rule, heads


def stream(rule_name, X, Y, labelled: bool, hyper=None, batch=8):
    """Prequential accuracy of a rule on a stream, the resets its guard reported, the heads."""
    rule, heads = one_session(rule_name, hyper)
    correct, resets, preds = 0, 0, []
    for i in range(0, len(X), batch):
        x, y = X[i:i + batch], Y[i:i + batch]
        slots = torch.zeros(len(x), dtype=torch.int64)
        logits = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
        preds.append(logits.argmax(1))
        correct += int((logits.argmax(1) == y).sum())
        out = rule.update(heads, x, y if labelled else torch.full_like(y, -1), slots, slots if rule.state else None)
        resets += n_reset(out)
    return correct / len(X), resets, torch.cat(preds), heads


def n_reset(out) -> int:
    """Sessions a rule's update reports reset: a tensor of their slots, or a count."""
    return len(out) if isinstance(out, torch.Tensor) else int(out or 0)


def shifted_stream(n=400, seed=0):
    """Source clusters rotated by 0.7 rad in two planes and offset: the base head drops to ~75%."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randint(0, C, (n,), generator=g)
    X = MU[Y] + torch.randn(n, D, generator=g)
    A = torch.eye(D)
    for i, j in ((0, 1), (2, 3)):
        A[i, i] = A[j, j] = math.cos(0.7)
        A[i, j], A[j, i] = -math.sin(0.7), math.sin(0.7)
    return X @ A.T + 0.5, Y


TENT_SHIFT = {"lr": 1.0, "min_confidence": 0.5}  # feature scale ~4: the default lr is for real backbones


@pytest.mark.parametrize("rule_name", list(RULES))
def test_every_rule_beats_the_static_head_on_a_synthetic_shift(rule_name):
    X, Y = shifted_stream()
    static = float(((X @ W0.T + B0).argmax(1) == Y).float().mean())
    assert 0.6 < static < 0.85
    labelled = RULES[rule_name].needs_labels
    acc, _, _, _ = stream(rule_name, X, Y, labelled, TENT_SHIFT if rule_name == "tent" else None)
    assert acc > static + 0.02, f"{rule_name}: prequential {acc:.3f} vs static {static:.3f} after {len(X)} rows"


def test_label_free_rules_use_labels_when_given():
    X, Y = shifted_stream(seed=1)
    static = float(((X @ W0.T + B0).argmax(1) == Y).float().mean())
    for name in ("t3a", "tent"):
        acc, _, _, _ = stream(name, X, Y, True, TENT_SHIFT if name == "tent" else None)
        assert acc > static + 0.05, name


def collapsing_stream(seed=1):
    """A long run of one class, then i.i.d. rows: entropy minimisation with a large step drifts
    the head onto the run's class."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.cat([torch.zeros(200, dtype=torch.int64), torch.randint(0, C, (200,), generator=g)])
    return MU[Y] + 1.5 * torch.randn(len(Y), D, generator=g), Y


def test_tent_collapse_guard_resets_on_a_collapsing_stream():
    X, Y = collapsing_stream()
    hyper = {"lr": 5.0, "min_confidence": 0.5}
    _, resets_off, preds_off, _ = stream("tent", X, Y, False, {**hyper, "collapse_window": 1e6})
    _, resets_on, preds_on, _ = stream("tent", X, Y, False, hyper)
    assert resets_off == 0 and resets_on >= 1
    after_off = float((preds_off[200:] == Y[200:]).float().mean())
    after_on = float((preds_on[200:] == Y[200:]).float().mean())
    assert after_on > after_off + 0.05, (after_on, after_off)


def test_tent_reset_restores_the_initial_head_and_confidence_filter_skips_unsure_rows():
    rule, heads = one_session("tent", {"lr": 1.0, "min_confidence": 0.99, "collapse_window": 8, "collapse_share": 0.8})
    x = MU * 0.1  # one row per class near the origin: nobody is 99% sure
    slots = torch.zeros(4, dtype=torch.int64)
    assert n_reset(rule.update(heads, x, torch.full((4,), -1), slots, slots)) == 0
    assert torch.equal(heads.W[0], W0) and torch.equal(heads.b[0], B0)  # filtered: unchanged
    # Confident rows of one class: the head moves, then the histogram says "collapse": reset.
    x = MU[torch.zeros(8, dtype=torch.int64)] * 2
    heads.hyper["min_confidence"][:] = 0.5
    heads.W[0] += 0.01  # a drifted head
    assert n_reset(rule.update(heads, x, torch.full((8,), -1), torch.zeros(8, dtype=torch.int64),
                               torch.zeros(8, dtype=torch.int64))) == 1
    assert torch.equal(heads.W[0], W0) and torch.equal(heads.b[0], B0)
    assert torch.equal(heads.pools["tent"]["class_hist"][0], torch.zeros(C))


def test_feature_stats_undoes_an_offset_and_scale_of_the_features():
    """Source features under x -> 0.5 x + o (o towards class 0): after a stream the session's head
    on raw features scores like the base head on the source, and the statistics are the stream's."""
    g = torch.Generator().manual_seed(3)
    Y = torch.randint(0, C, (400,), generator=g)
    X = MU[Y] + torch.randn(400, D, generator=g)
    offset = torch.zeros(D)
    offset[0], offset[1] = 2.0, -1.0
    shifted = 0.5 * X + offset
    source_acc = float(((X @ W0.T + B0).argmax(1) == Y).float().mean())
    static = float(((shifted @ W0.T + B0).argmax(1) == Y).float().mean())
    acc, _, preds, heads = stream("feature_stats", shifted, Y, False, {"prior_count": 0.0})
    adapted = float((preds[200:] == Y[200:]).float().mean())
    assert static < source_acc - 0.2 and adapted > source_acc - 0.05, (static, adapted, source_acc)
    pool = heads.pools["feature_stats"]
    torch.testing.assert_close(pool["mean"][0], shifted.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(pool["var"][0], shifted.var(0, unbiased=False), atol=1e-4, rtol=1e-4)
    assert float(pool["count"][0, 0]) == 400.0


def test_feature_stats_ignore_labels_and_need_source_statistics():
    from server.errors import InvalidInput

    X, Y = shifted_stream(seed=2)
    _, _, with_labels, _ = stream("feature_stats", X, Y, True)
    _, _, without, _ = stream("feature_stats", X, Y, False)
    assert torch.equal(with_labels, without)
    with pytest.raises(InvalidInput) as e:
        RULES["feature_stats"].init_state(C, D, RULES["feature_stats"].validate({}), head={"W": W0, "b": B0})
    assert e.value.code == "missing_source_stats"


def test_lame_memory_follows_the_recent_rows_and_forgets_older_ones():
    """A run of class 0, then a run of class 1: the memory's class-0 part decays at (1 - 1/memory)
    per row, and the affinity term then favours class 1 for class-1 rows."""
    g = torch.Generator().manual_seed(4)
    runs = [MU[torch.full((160,), c)] + torch.randn(160, D, generator=g) for c in (0, 1)]
    rule, heads = one_session("lame", {"affinity": 4.0, "memory": 20.0})
    pool = heads.pools["lame"]
    norms = []
    for X in runs:
        for i in range(0, len(X), 8):
            slots = torch.zeros(8, dtype=torch.int64)
            rule.update(heads, X[i:i + 8], torch.full((8,), -1), slots, slots)
        norms.append(float(pool["M"][0, 0].norm()))
    assert norms[1] < 0.05 * norms[0]
    u = (runs[1] - pool["mean"][0]) / pool["var"][0].sum().sqrt()
    term = u @ pool["M"][0].T  # [rows, C]: the memory's affinity per class
    assert float((term.argmax(1) == 1).float().mean()) > 0.9


def test_t3a_drops_uncertain_rows_and_caps_supports():
    rule, heads = one_session("t3a", {"supports_per_class": 3, "max_entropy": 0.3})
    pool = heads.pools["t3a"]
    assert int(pool["support_priority"][0].isfinite().sum()) == C  # one base-weight support per class
    unsure = torch.zeros(5, D) + 0.01  # equidistant from every class: entropy ~ log C
    rule.update(heads, unsure, torch.full((5,), -1), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))
    assert int(pool["support_priority"][0].isfinite().sum()) == C
    sure = MU[torch.ones(10, dtype=torch.int64)] + 0.1 * torch.randn(10, D)
    rule.update(heads, sure, torch.full((10,), -1), torch.zeros(10, dtype=torch.int64),
                torch.zeros(10, dtype=torch.int64))
    assert int(pool["support_priority"][0, 1].isfinite().sum()) == 3  # capped
    assert float(pool["support_priority"][0, 1, :3].min()) == 0.0  # the base support stays


# ---- over HTTP ------------------------------------------------------------------------------


LABEL_FREE = ["t3a", "tent", "feature_stats", "feature_stats_t3a", "lame"]


@pytest.mark.parametrize("rule", LABEL_FREE)
def test_unlabelled_adapt_over_http(server, rule):
    xs = digits(6, seed=3)
    with Client(server.url) as c:
        sid = c.create_session(rule, init="base").id
        out = c.adapt(sid, xs[:4])  # no labels
        assert out.version == 1 and out.applied == 4
        assert all(p.true_label is None and p.correct is None for p in out.predictions)
        out = c.adapt(sid, xs[4:], labels=["1", None])
        assert out.version == 2 and out.predictions[0].true_label == "1" and out.predictions[1].correct is None
        info = c.get_session(sid)
        assert info.examples_seen == 6 and info.prequential.total == 1
        data = c.export_session(sid)
        copy = c.import_session(sid + "-copy", data)
        assert copy.version == 0 and copy.examples_seen == 6  # a new session: its own versions from 0
        a = c.predict(xs, session_id=sid)
        b = c.predict(xs, session_id=sid + "-copy")
        assert [p.label for p in a.predictions] == [p.label for p in b.predictions]
        assert a.applied is None and a.version == 2


def test_supervised_rules_still_need_labels(server):
    with Client(server.url) as c:
        sid = c.create_session("sgd", classes=["a", "b"]).id
        with pytest.raises(FwserveError) as e:
            c.adapt(sid, digits(1))
        assert e.value.status == 422 and e.value.code == "missing_label"
        assert c.get_session(sid).version == 0
        with pytest.raises(FwserveError) as e:
            c.create_session("sgd", classes=["a", "b"], hyperparameters={"adapt_on_predict": True})
        assert e.value.code == "invalid_hyperparameter"


@pytest.mark.parametrize("rule", LABEL_FREE)
def test_adapt_on_predict(server, rule):
    xs = digits(4, seed=4)
    with Client(server.url) as c:
        sid = c.create_session(rule, init="base", hyperparameters={"adapt_on_predict": True}).id
        before = server.metric("fwserve_adapted_examples_total", f'rule="{rule}"')
        r = c.predict(xs[:3], session_id=sid)
        assert r.version == 0 and r.applied == 3  # predicted with version 0, then adapted
        r = c.predict(xs[3:], session_id=sid)
        assert r.version == 1 and r.applied == 1
        assert c.get_session(sid).version == 2
        assert server.metric("fwserve_adapted_examples_total", f'rule="{rule}"') == before + 4
        assert c.get_session(sid).hyperparameters["adapt_on_predict"] == 1.0
        plain = c.create_session(rule, init="base").id
        assert c.predict(xs, session_id=plain).applied is None
        assert c.get_session(plain).version == 0


def test_collapse_resets_are_counted_in_the_metrics(server):
    with Client(server.url) as c:
        sid = c.create_session("tent", init="base", hyperparameters={
            "collapse_window": 2, "collapse_share": 0.01, "min_confidence": 0.0}).id
        before = server.metric("fwserve_label_free_resets_total", 'rule="tent"')
        c.adapt(sid, digits(4, seed=5))
        assert server.metric("fwserve_label_free_resets_total", 'rule="tent"') >= before + 1


@pytest.mark.parametrize("rule", LABEL_FREE)
def test_episodic_heads_accept_label_free_rules(server, rule):
    xs = digits(4, seed=6)
    with Client(server.url) as c:
        r = c.predict_episodic(xs[:2], xs, labels=["a", "b", "a", "b"], rule=rule)
        assert r.head == "episodic" and len(r.predictions) == 2


def test_label_free_rules_on_bfloat16_heads(backbone, tmp_path):
    """With --head-dtype bfloat16 every label-free rule adapts from the base head and answers
    finite scores, as with float32 storage (the statistics and supports stay float32 state)."""
    xs = digits(8, seed=5)
    with live_server(backbone, tmp_path, head_dtype="bfloat16") as srv, Client(srv.url) as c:
        for rule in LABEL_FREE:
            sid = c.create_session(rule, init="base").id
            base = [p.label for p in c.predict(xs, session_id=sid).predictions]
            out = c.adapt(sid, xs[:6])
            assert out.version == 1 and out.applied == 6, rule
            after = c.predict(xs, session_id=sid)
            assert after.version == 1, rule
            assert all(math.isfinite(p.score) and 0.0 <= p.score <= 1.0 for p in after.predictions), rule
            assert all(p.label in c.get_session(sid).classes for p in after.predictions), rule
            assert len(base) == len(after.predictions)

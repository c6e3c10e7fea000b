"""The learned rules (meta_sgd, hyper): their updates are their kernels' math, their parameters
travel in files tied to one backbone's weights, and a rule without parameters is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

import kernels
from kernels.class_mean_head import class_mean_head_step_ref
from models import RuleParams, RuleParamsMismatch, bundled_weights, load_backbone, load_rule_params
from models.rule_params import bundled_rule_params, read_rule_params, rule_params_path, save_rule_params
from server.errors import InvalidInput
from server.rules import RULES, check_trained, scratch_heads
from tests.server.learned import learned_params

D, C = 12, 5


def _heads(rule_name: str, n_slots: int = 3, seed: int = 0):
    rule = RULES[rule_name]
    hp = rule.validate({})
    heads, rows = scratch_heads([(rule, hp, C, None)] * n_slots, C, D, "cpu", learned=learned_params(D, seed))
    return rule, heads, torch.tensor(rows)


def _batch(n_rows: int, n_slots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, D, generator=g)
    y = torch.randint(0, C, (n_rows,), generator=g)
    slots = torch.randint(0, n_slots, (n_rows,), generator=g)
    slots[0] = -1  # a skipped row
    return x, y, slots


def test_meta_sgd_is_its_learned_number_of_sgd_steps_with_learned_rates():
    rule, heads, rows = _heads("meta_sgd")
    x, y, slots = _batch(11, 3, seed=1)
    p = learned_params(D)["meta_sgd"]
    W, b = heads.W.clone(), heads.b.clone()
    rule.update(heads, x, y, slots, None)
    for _ in range(int(p["steps"])):
        W, b = kernels.reference.sgd_step_ref(x, y, slots, W, b, heads.n_classes, 1.0, 0.0,
                                              feature_rates=p["feature_rates"], bias_rate=float(p["bias_rate"]))
    torch.testing.assert_close(heads.W, W.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads.b, b.float(), rtol=1e-5, atol=1e-6)
    assert heads.W.abs().sum() > 0


def test_meta_sgd_rate_scale_scales_the_step():
    rule, a, _ = _heads("meta_sgd")
    hp = rule.validate({"rate_scale": 1e-6})
    tiny, _ = scratch_heads([(rule, hp, C, None)] * 3, C, D, "cpu", learned=learned_params(D))
    x, y, slots = _batch(9, 3, seed=2)
    rule.update(a, x, y, slots, None)
    rule.update(tiny, x, y, slots, None)
    assert a.W.abs().max() > 1e-2 and tiny.W.abs().max() < 1e-5 and tiny.b.abs().max() < 1e-5


def test_hyper_regenerates_the_touched_classes_from_class_means_through_the_metric():
    rule, heads, rows = _heads("hyper")
    pool = heads.pools["hyper"]
    metric = learned_params(D)["hyper"]["metric"]
    for seed in (3, 4):  # two calls: the class sums carry over
        x, y, slots = _batch(10, 3, seed=seed)
        state_rows = rows.index_select(0, slots.clamp_min(0))
        want = class_mean_head_step_ref(x, y, slots, state_rows, pool["sums"], pool["counts"], heads.W, heads.b,
                                        heads.n_classes, metric, heads.hyper["logit_scale"])
        rule.update(heads, x, y, slots, state_rows)
        for got, ref in zip((pool["sums"], pool["counts"], heads.W, heads.b), want):
            torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)


def test_a_learned_rule_without_parameters_is_refused_with_the_reason():
    check_trained(RULES["sgd"], {})  # hand-made rules need nothing
    with pytest.raises(InvalidInput) as e:
        check_trained(RULES["hyper"], {})
    assert e.value.code == "rule_not_trained" and "fwserve train-rule hyper" in e.value.message
    with pytest.raises(InvalidInput) as e:
        check_trained(RULES["meta_sgd"], {}, {"meta_sgd": "trained for other weights"})
    assert "trained for other weights" in e.value.message
    rule = RULES["hyper"]
    heads, rows = scratch_heads([(rule, rule.validate({}), C, None)], C, D, "cpu")  # no learned parameters
    x, y, slots = _batch(4, 1, seed=5)
    with pytest.raises(InvalidInput):
        rule.update(heads, x, y, slots, torch.zeros_like(slots))
    assert heads.W.abs().sum() == 0


def test_parameter_files_round_trip_and_refuse_other_weights(tmp_path):
    tensors = learned_params(D)["hyper"]
    path = save_rule_params(tmp_path / "w.rule-hyper.safetensors",
                            RuleParams("hyper", tensors, "a" * 64, {"seed": 3, "selection": {"5-shot": 61.0}}))
    back = read_rule_params(path)
    assert back.rule == "hyper" and back.fingerprint == "a" * 64 and back.card["seed"] == 3
    assert torch.equal(back.tensors["metric"], tensors["metric"])
    assert torch.equal(load_rule_params(path, "a" * 64).tensors["metric"], tensors["metric"])
    with pytest.raises(RuleParamsMismatch) as e:
        load_rule_params(path, "b" * 64)
    assert "aaaaaaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbbbbbb" in str(e.value) and "train-rule" in str(e.value)
    # beside weights: found when the fingerprint matches, refused (with the reason) when not
    weights = tmp_path / "w.safetensors"
    assert rule_params_path(weights, "hyper") == path
    found, refused = bundled_rule_params(weights, lambda: "a" * 64)
    assert set(found) == {"hyper"} and not refused
    found, refused = bundled_rule_params(weights, lambda: "c" * 64)
    assert not found and "trained for backbone weights" in refused["hyper"]


@pytest.mark.skipif(bundled_weights("fwserve-mnist-vit") is None, reason="no bundled backbone")
def test_the_bundled_backbone_ships_parameters_for_both_learned_rules(tmp_path):
    bb = load_backbone("fwserve-mnist-vit")
    assert set(bb.rule_params) == {"meta_sgd", "hyper"} and not bb.rule_params_refused
    for name, p in bb.rule_params.items():
        assert p.fingerprint == bb.fingerprint
        assert set(p.tensors) == set(RULES[name].learned)
        assert all(torch.isfinite(t).all() for t in p.tensors.values())
        assert p.card["selection"]["candidates"] and p.card["data"]["images"].startswith("training split")
    # the same files beside other weights are refused, naming the reason
    weights = tmp_path / "other.safetensors"
    shutil.copy(bundled_weights("fwserve-mnist-vit"), weights)
    for name, p in bb.rule_params.items():
        shutil.copy(p.path, rule_params_path(weights, name))
    other = load_backbone("fwserve-mnist-vit", weights=weights)
    assert set(other.rule_params) == {"meta_sgd", "hyper"}  # identical weights: accepted
    other.model.head.bias.data += 1.0  # not these weights any more
    del other.__dict__["fingerprint"]
    found, refused = bundled_rule_params(weights, lambda: other.fingerprint)
    assert not found and set(refused) == {"meta_sgd", "hyper"}

"""`fwserve train-rule`: a short seeded run writes a parameter file and card for exactly the
backbone it trained on, the same command gives the same file, and the server serves it."""

from __future__ import annotations

import json

import pytest
import torch

from eval import train_rule
from models import RuleParamsMismatch, bundled_weights, load_backbone, load_rule_params
from models.rule_params import read_rule_params
from server.rules import RULES

pytestmark = pytest.mark.skipif(bundled_weights("fwserve-mnist-vit") is None, reason="needs the bundled backbone")
QUICK = ["--symmetries", "none", "--iterations", "6", "--batch", "2", "--selection-episodes", "6", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("features"))


@pytest.mark.parametrize("rule,extra", [("meta_sgd", ["--steps", "1", "2"]), ("hyper", ["--lams", "0.3"])])
def test_a_short_run_writes_parameters_and_a_card_for_this_backbone(tmp_path, capsys, cache, rule, extra):
    out = tmp_path / f"w.rule-{rule}.safetensors"
    argv = [rule, "--out", str(out), "--cache-dir", cache, *QUICK, *extra]
    assert train_rule.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out) and printed["chosen"]
    params = read_rule_params(out)
    bb = load_backbone("fwserve-mnist-vit")
    assert params.rule == rule and params.fingerprint == bb.fingerprint
    assert set(params.tensors) == set(RULES[rule].learned)
    assert all(torch.isfinite(t).all() for t in params.tensors.values())
    card = params.card
    assert card["data"]["classes"] == 5 and card["data"]["images"].startswith("training split")
    assert len(card["selection"]["candidates"]) == 2 and card["chosen"] in {c["candidate"] for c in
                                                                           card["selection"]["candidates"]}
    for c in card["selection"]["candidates"]:
        for k in ("1-shot", "5-shot"):
            lo, hi = c["selection"][k]["ci95"]
            assert 0 <= lo <= c["selection"][k]["mean"] <= hi <= 100
    md = out.with_suffix(".md").read_text()
    assert card["chosen"] in md and "selection" in md.lower()
    # the same command, the same parameters (seeded)
    again = tmp_path / "again.safetensors"
    assert train_rule.main([rule, "--out", str(again), "--cache-dir", cache, *QUICK, *extra]) == 0
    for k, t in read_rule_params(again).tensors.items():
        assert torch.equal(t, params.tensors[k]), k
    # other weights refuse them
    with pytest.raises(RuleParamsMismatch):
        load_rule_params(out, load_backbone("fwserve-mnist-vit", random_init=True).fingerprint)

"""The learned rules' update benchmark runs and reports every rule beside sgd (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from loadtests import rule_update_bench
from models import bundled_weights


@pytest.mark.skipif(bundled_weights("fwserve-mnist-vit") is None, reason="the learned rules ship for the bundled backbone")
def test_a_short_run_reports_every_rule_and_its_ratio_to_sgd(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert rule_update_bench.main(["--sessions", "6", "--rows", "1", "9", "--repeats", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["d"] == 128 and data["meta_sgd_steps"] >= 1
    assert set(data["rows"]) == {"1", "9"}
    for per_rule in data["rows"].values():
        assert set(per_rule) == set(rule_update_bench.RULE_NAMES)
        assert per_rule["sgd"]["vs_sgd"] == 1.0
        assert all(v["us"] > 0 for v in per_rule.values())
    assert "meta_sgd" in capsys.readouterr().out

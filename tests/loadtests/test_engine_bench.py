"""The engine benchmark runs, times every batch size and counts the torch ops of a predict and an
adapt batch (no timing asserted)."""

from __future__ import annotations

import json

from loadtests import engine_bench


def test_a_short_run_reports_cpu_and_torch_ops_per_batch_size(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert engine_bench.main(["--rows", "1,3", "--pairs", "24", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["rows"] for r in rows] == [1, 3]
    for r in rows:
        assert r["blocks"] >= 1 and 0 < r["cpu_ms_per_pair_min"] <= r["cpu_ms_per_pair_median"]
        # an adapt batch updates and logs on top of the forward a predict batch runs
        assert 0 < r["torch_ops_predict_batch"] < r["torch_ops_adapt_batch"]
    assert "torch ops, adapt batch" in capsys.readouterr().out

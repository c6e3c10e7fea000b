"""eval.diagnostics: the ridge heads it compares are the ones rls reaches online, and a quick run
reports every ceiling for the selection split."""

from __future__ import annotations

import json

import pytest
import torch

from eval import diagnostics
from kernels.reference import rls_step_ref
from models import bundled_weights


@pytest.mark.parametrize("prior", [False, True])
def test_ridge_head_is_what_rls_reaches_from_the_same_starting_P(prior):
    g = torch.Generator().manual_seed(3)
    n, d, ways, lam = 23, 7, 4, 3.0
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, ways, (n,), generator=g)
    if prior:  # a within-class covariance as the penalty: P starts at its inverse
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        penalty = lam * (A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
    else:
        penalty = lam * torch.eye(d, dtype=torch.float64)
    W, _ = rls_step_ref(x, y, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                        torch.zeros(1, ways, d, dtype=torch.float64), torch.linalg.inv(penalty)[None],
                        torch.tensor([ways]))
    torch.testing.assert_close(diagnostics.ridge_head(x, y, ways, penalty), W[0], rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(bundled_weights("fwserve-mnist-vit") is None, reason="needs the bundled backbone")
def test_a_quick_run_reports_every_ceiling(tmp_path, capsys):
    out = tmp_path / "diag.json"
    argv = ["--limit", "24", "--episodes", "4", "--seeds", "2", "--corruptions", "brightness",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert diagnostics.main(argv) == 0
    text = capsys.readouterr().out
    assert "Few-shot episodes" in text and "Label-free" in text and "New classes" in text
    res = json.loads(out.read_text())
    assert res["split"] == "selection"
    covs = {r["covariance"] for r in res["few_shot"]["rows"]}
    assert len(covs) == 2 and any(c.startswith("oracle") for c in covs)
    assert all(0 <= r[k] <= 100 for r in res["few_shot"]["rows"] for k in ("1-shot", "5-shot"))
    lf = res["label_free"]
    assert [r["corruption"] for r in lf["rows"]] == ["brightness"] and lf["ratio_to_static"]["static"] == 1.0
    rows = res["new_classes"]["rows"]
    assert rows[0]["method"].endswith("(rls)") and len(rows) > 1
    # 24 images per class: checkpoints below that, the rest held out
    assert set(rows[0]) == {"method", "after 5/class", "after 10/class", "after 20/class"}

"""Per-session feature statistics (feature_stats_step), re-standardised rows
(standardize_features) and folded heads (standardized_head) against their float64 references,
on fresh random problems with NaN-poisoned state that no slot owns."""

import pytest
import torch

from kernels import feature_stats_step, head_forward, standardize_features, standardized_head
from kernels import label_free_reference as ref
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, TOLERANCE, assert_matches, make_problem, relative_rmse, tolerance


def stats_pools(p, poison: bool = True):
    """count [R, 1], mean / var / src_mean / src_var [R, d], V [R, C, d], c0 [R, C]; rows of
    state that no slot of the batch uses are NaN (the ops must neither read nor write them)."""
    g = torch.Generator().manual_seed(p.seed + 1)
    R, C, d = p.sums.shape
    with torch.device("cpu"):
        pools = {
            "count": torch.randint(0, 50, (R, 1), generator=g).float(),
            "mean": torch.randn(R, d, generator=g), "var": 0.1 + torch.rand(R, d, generator=g),
            "src_mean": torch.randn(R, d, generator=g), "src_var": 0.1 + 2 * torch.rand(R, d, generator=g),
            "V": torch.randn(R, C, d, generator=g), "c0": torch.randn(R, C, generator=g),
        }
        if poison:
            used = torch.zeros(R, dtype=torch.bool)
            used[p.state_rows[p.slots >= 0].long().cpu()] = True
            for t in pools.values():
                t[~used] = float("nan")
    return {k: v.to(p.x.device) for k, v in pools.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_feature_stats_step_matches_reference(case, impl):
    p = make_problem(**case)
    t = stats_pools(p)
    window = (10.0 + 40 * p.per_slot) if case["layout"] == "mixed" else 7.0  # some merges hit the window
    count, mean, var = t["count"].clone(), t["mean"].clone(), t["var"].clone()
    feature_stats_step(p.x, p.slots, p.state_rows, count, mean, var, window, impl=impl)
    e_count, e_mean, e_var = ref.feature_stats_step_ref(p.x, p.slots, p.state_rows, t["count"], t["mean"], t["var"],
                                                        window)
    tol = TOLERANCE[case["dtype"]]
    assert_matches(count, e_count, tol, "count", p.seed)
    assert_matches(mean, e_mean, tol, "mean", p.seed)
    assert_matches(var, e_var, tol, "var", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_feature_stats_are_the_pooled_statistics_of_every_row(impl):
    """From count 0, successive calls give exactly the mean and variance of all rows so far
    (below the window), however the rows were split into calls."""
    p = make_problem(C=10, d=100, B=30, layout="one_session", poison=False)
    R, d = p.sums.shape[0], p.x.shape[1]
    count, mean, var = torch.zeros(R, 1), torch.zeros(R, d), torch.zeros(R, d)
    rows = []
    for lo, hi in ((0, 7), (7, 8), (8, 19), (19, 30)):
        feature_stats_step(p.x[lo:hi], p.slots[lo:hi], p.state_rows[lo:hi], count, mean, var, 1e6, impl=impl)
        rows.append(p.x[lo:hi])
    r = int(p.state_rows[0])
    every = torch.cat(rows).double()
    torch.testing.assert_close(mean[r].double(), every.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(var[r].double(), every.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert float(count[r, 0]) == 30.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_standardize_features_matches_reference(case, impl):
    p = make_problem(**case)
    t = stats_pools(p)
    power = p.per_slot if case["layout"] == "mixed" else 1.0
    out = standardize_features(p.x, p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"], power,
                               impl=impl)
    expected = ref.standardize_features_ref(p.x, p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"],
                                            t["src_var"], power)
    assert_matches(out, expected, TOLERANCE[case["dtype"]], "x'", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_standardized_head_matches_reference(case, impl):
    p = make_problem(**case)
    t = stats_pools(p)
    power = p.per_slot if case["layout"] == "mixed" else 0.5
    W, b = p.W.clone(), p.b.clone()
    standardized_head(p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"], t["V"], t["c0"], W, b,
                      p.n_classes, power, impl=impl)
    e_W, e_b = ref.standardized_head_ref(p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"],
                                         t["V"], t["c0"], p.W, p.b, p.n_classes, power)
    tol = tolerance(case)  # W, b in the case's head storage
    assert_matches(W, e_W, tol, "W", p.seed)
    assert_matches(b, e_b, tol, "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_folded_head_scores_the_standardised_rows(impl):
    """head_forward(x, W, b) after standardized_head == V x' + c0 on the standardised rows."""
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    t = stats_pools(p, poison=False)
    W, b = p.W.clone(), p.b.clone()
    standardized_head(p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"], t["V"], t["c0"], W, b,
                      p.n_classes, 1.0, impl=impl)
    logits = head_forward(p.x, W, b, p.slots, p.n_classes, impl=impl)
    xs = standardize_features(p.x, p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"], 1.0,
                              impl=impl)
    valid = p.slots >= 0
    r = p.state_rows[valid].long()
    expected = torch.einsum("bcd,bd->bc", t["V"][r], xs[valid]) + t["c0"][r]
    live = torch.arange(10, device=p.x.device) < p.n_classes[p.slots[valid].long()].unsqueeze(1)
    torch.testing.assert_close(logits[valid][live], expected[live], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=10, d=100, B=10, poison=False)
    t = stats_pools(p, poison=False)
    count, mean, var = t["count"].clone(), t["mean"].clone(), t["var"].clone()
    e = (t["count"].double(), t["mean"].double(), t["var"].double())
    for _ in range(3):
        batch = p.next_batch()
        feature_stats_step(batch.x, batch.slots, batch.state_rows, count, mean, var, 25.0, impl=impl)
        e = ref.feature_stats_step_ref(batch.x, batch.slots, batch.state_rows, *e, 25.0)
    for got, want in zip((count, mean, var), e):
        assert relative_rmse(got, want) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_changes_nothing(impl):
    p = make_problem(C=10, d=100, layout="empty")
    t = stats_pools(p)
    before = {k: v.clone() for k, v in t.items()}
    feature_stats_step(p.x, p.slots, p.state_rows, t["count"], t["mean"], t["var"], 10.0, impl=impl)
    W, b = p.W.clone(), p.b.clone()
    standardized_head(p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"], t["V"], t["c0"], W, b,
                      p.n_classes, 1.0, impl=impl)
    assert standardize_features(p.x, p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"],
                                impl=impl).shape == (0, 100)
    for k, v in t.items():
        assert torch.equal(v.nan_to_num(7.0), before[k].nan_to_num(7.0)), k
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))


def test_triton_writes_every_standardised_row():
    from kernels.label_free_ops import _hyper
    from kernels.triton.feature_stats import standardize_features_triton

    p = make_problem(C=10, d=100, layout="mixed")
    t = stats_pools(p)
    out = torch.full(p.x.shape, float("nan"), device=p.x.device)
    standardize_features_triton(p.x, p.slots, p.state_rows, t["mean"], t["var"], t["src_mean"], t["src_var"],
                                _hyper(1.0, p.x.device), out=out)
    assert not out.isnan().any()
    assert torch.equal(out[p.slots < 0], torch.zeros_like(out[p.slots < 0]))

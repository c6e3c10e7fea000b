import pytest
import torch

from kernels import head_forward, prototype_step, reference
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, assert_matches, tolerance, make_problem, relative_rmse


def _run(p, impl, temperature, W=None):
    state = p.clone_state()
    W = state["W"] if W is None else W
    prototype_step(p.x, p.y, p.slots, p.state_rows, state["sums"], state["counts"], W, p.n_classes,
                   temperature, impl=impl)
    return state["sums"], state["counts"], W


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    temperature = 10.0 * p.per_slot if case["layout"] == "mixed" else 16.0
    # The op writes exactly the (slot, class) cells that received rows: poison the touched heads
    # whole, so a cell it should write and does not keeps NaN, and one it writes by mistake loses it.
    W = p.W.clone()
    W[p.slots[p.slots >= 0]] = float("nan")
    poisoned = W.clone()
    sums, counts, W = _run(p, impl, temperature, W)
    sums_ref, counts_ref, W_ref = reference.prototype_step_ref(
        p.x, p.y, p.slots, p.state_rows, p.sums, p.counts, poisoned, p.n_classes, temperature)
    tol = tolerance(case)
    assert_matches(sums, sums_ref, tol, "sums", p.seed)
    assert_matches(counts, counts_ref, 0.0, "counts", p.seed)
    assert_matches(W, W_ref, tol, "W", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_prediction_is_temperature_times_cosine_to_class_means(impl):
    C, d, T = 10, 100, 12.0
    x = torch.randn(8, d)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])
    slots, state_rows = torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
    sums, counts, W = torch.zeros(1, C, d), torch.zeros(1, C), torch.zeros(1, C, d)
    n = torch.tensor([6])
    prototype_step(x, y, slots, state_rows, sums, counts, W, n, T, impl=impl)
    query = torch.randn(3, d)
    logits = head_forward(query, W, torch.zeros(1, C), torch.zeros(3, dtype=torch.int64), n,
                          normalize=torch.tensor([True]), impl=impl)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    expected = T * torch.nn.functional.cosine_similarity(query[:, None], means[None], dim=2)
    torch.testing.assert_close(logits[:, :4], expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(logits[:, 4:6], torch.zeros(3, 2))  # live classes never seen: weight 0
    assert torch.isneginf(logits[:, 6:]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=37, d=100, B=10, poison=False)
    state = p.clone_state()
    sums_ref, counts_ref, W_ref = p.sums.double(), p.counts.double(), p.W.double()
    for _ in range(4):
        batch = p.next_batch()
        prototype_step(batch.x, batch.y, batch.slots, batch.state_rows, state["sums"], state["counts"],
                       state["W"], p.n_classes, 5.0, impl=impl)
        sums_ref, counts_ref, W_ref = reference.prototype_step_ref(
            batch.x, batch.y, batch.slots, batch.state_rows, sums_ref, counts_ref, W_ref, p.n_classes, 5.0)
    assert relative_rmse(state["sums"], sums_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"
    assert torch.equal(state["counts"].double(), counts_ref)
    assert relative_rmse(state["W"], W_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    p = make_problem(C=10, d=100, layout="empty")
    sums, counts, W = _run(p, impl, 4.0)
    for new, old in ((sums, p.sums), (counts, p.counts), (W, p.W)):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))

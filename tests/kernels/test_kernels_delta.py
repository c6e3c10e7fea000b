import pytest
import torch

from kernels import delta_step, reference
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, assert_matches, tolerance, make_problem, relative_rmse, stored_bf16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    beta = p.per_slot if case["layout"] == "mixed" else 0.6
    W = p.W.clone()
    delta_step(p.x, p.y, p.slots, W, p.n_classes, beta, impl=impl)
    if W.dtype == torch.bfloat16 and impl == "triton":
        # bf16 heads on the Triton path are stored (rounded) after every row, which the next
        # row reads back: the reference does the same, one row per call.
        W_ref = p.W
        for i in range(p.x.shape[0]):
            row = slice(i, i + 1)
            W_ref = reference.delta_step_ref(p.x[row], p.y[row], p.slots[row], W_ref, p.n_classes, beta)
            W_ref = stored_bf16(W_ref)
        W_ref = W_ref.double()
    else:
        W_ref = reference.delta_step_ref(p.x, p.y, p.slots, p.W, p.n_classes, beta)
    assert_matches(W, W_ref, tolerance(case), "W", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_are_sequential_not_a_mini_batch(impl):
    """With beta = 1 every row is stored exactly, so the last row of a slot is always recalled
    exactly — which a mean over the slot's rows would not do."""
    d, C = 100, 10
    x = torch.randn(5, d)
    y = torch.tensor([3, 1, 4, 1, 5])
    W = torch.zeros(2, C, d)
    delta_step(x, y, torch.ones(5, dtype=torch.int64), W, torch.tensor([C, C]), 1.0, impl=impl)
    recall = W[1] @ torch.nn.functional.normalize(x[-1], dim=0)
    torch.testing.assert_close(recall, torch.nn.functional.one_hot(y[-1], C).float(), atol=1e-5, rtol=0)
    assert torch.equal(W[0], torch.zeros(C, d))


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=10, d=192, B=10, poison=False)
    W, W_ref = p.W.clone(), p.W.double()
    for _ in range(4):
        batch = p.next_batch()
        delta_step(batch.x, batch.y, batch.slots, W, p.n_classes, p.per_slot, impl=impl)
        W_ref = reference.delta_step_ref(batch.x, batch.y, batch.slots, W_ref, p.n_classes, p.per_slot)
    assert relative_rmse(W, W_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    p = make_problem(C=37, d=100, layout="empty")
    W = p.W.clone()
    delta_step(p.x, p.y, p.slots, W, p.n_classes, 0.5, impl=impl)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0))

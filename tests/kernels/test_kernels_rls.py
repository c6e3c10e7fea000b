import pytest
import torch

from kernels import reference, rls_step
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, TOLERANCE, assert_matches, tolerance, make_problem, relative_rmse, stored_bf16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    W, P = p.W.clone(), p.P.clone()
    rls_step(p.x, p.y, p.slots, p.state_rows, W, P, p.n_classes, impl=impl)
    if W.dtype == torch.bfloat16 and impl == "triton":
        # bf16 heads on the Triton path are stored (rounded) after every row: so is the reference's.
        W_ref, P_ref = p.W, p.P
        for i in range(p.x.shape[0]):
            row = slice(i, i + 1)
            W_ref, P_ref = reference.rls_step_ref(p.x[row], p.y[row], p.slots[row], p.state_rows[row], W_ref, P_ref,
                                                  p.n_classes)
            W_ref = stored_bf16(W_ref)
        W_ref = W_ref.double()
    else:
        W_ref, P_ref = reference.rls_step_ref(p.x, p.y, p.slots, p.state_rows, p.W, p.P, p.n_classes)
    assert_matches(W, W_ref, tolerance(case), "W", p.seed)
    assert_matches(P, P_ref, TOLERANCE[case["dtype"]], "P", p.seed)  # P is float32 storage
    live = P.isfinite().all(dim=2).all(dim=1)
    assert torch.equal(P[live], P[live].transpose(1, 2)), f"P lost its symmetry, seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_closed_form_ridge(impl):
    """Rows fed over two calls (and interleaved with another session's rows) give exactly the
    ridge solution W = Y^T X (X^T X + lambda I)^-1, P = (X^T X + lambda I)^-1."""
    d, C, n, lam = 100, 10, 7, 0.8
    X = torch.randn(16, d)
    Y = torch.randint(0, n, (16,))
    # Even rows: the ridge session (slot 2, state row 1); odd rows: another session (slot 0).
    x = torch.stack([X, torch.randn(16, d)], 1).reshape(32, d)
    y = torch.stack([Y, torch.zeros_like(Y)], 1).reshape(32)
    is_ridge_row = torch.arange(32) % 2 == 0
    slots = torch.where(is_ridge_row, 2, 0)
    state_rows = torch.where(is_ridge_row, 1, 0)
    W, P = torch.zeros(3, C, d), (torch.eye(d) / lam).repeat(2, 1, 1)
    n_classes = torch.tensor([3, C, n])
    for half in (slice(0, 16), slice(16, 32)):
        rls_step(x[half], y[half], slots[half], state_rows[half], W, P, n_classes, impl=impl)
    X = X.double()
    inverse = torch.linalg.inv(X.T @ X + lam * torch.eye(d, dtype=torch.float64))
    ridge = torch.nn.functional.one_hot(Y, n).double().T @ X @ inverse
    torch.testing.assert_close(P[1].double(), inverse, atol=2e-5 * inverse.abs().max().item(), rtol=0)
    torch.testing.assert_close(W[2, :n].double(), ridge, atol=2e-5 * ridge.abs().max().item(), rtol=0)
    assert torch.equal(W[2, n:], torch.zeros(C - n, d)) and torch.equal(W[1], torch.zeros(C, d))
    assert torch.equal(P[1], P[1].T)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=37, d=100, B=8, poison=False)
    W, P = p.W.clone(), p.P.clone()
    W_ref, P_ref = p.W.double(), p.P.double()
    for _ in range(3):
        batch = p.next_batch()
        rls_step(batch.x, batch.y, batch.slots, batch.state_rows, W, P, p.n_classes, impl=impl)
        W_ref, P_ref = reference.rls_step_ref(batch.x, batch.y, batch.slots, batch.state_rows, W_ref, P_ref,
                                              p.n_classes)
    assert relative_rmse(W, W_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"
    assert relative_rmse(P, P_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    p = make_problem(C=10, d=100, layout="empty")
    W, P = p.W.clone(), p.P.clone()
    rls_step(p.x, p.y, p.slots, p.state_rows, W, P, p.n_classes, impl=impl)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(P.nan_to_num(7.0), p.P.nan_to_num(7.0))

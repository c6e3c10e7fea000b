import pytest
import torch

from kernels import reference, sgd_step
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, assert_matches, tolerance, make_problem, relative_rmse


def _hyper(p, layout):
    """Per-slot tensors for one layout, plain floats for the other: both forms are accepted."""
    if layout == "mixed":
        return p.per_slot, 0.05 * p.per_slot
    return 0.7, 0.01


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    lr, wd = _hyper(p, case["layout"])
    W, b = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, lr, weight_decay=wd, impl=impl)
    W_ref, b_ref = reference.sgd_step_ref(p.x, p.y, p.slots, p.W, p.b, p.n_classes, lr, wd)
    tol = tolerance(case)
    assert_matches(W, W_ref, tol, "W", p.seed)
    assert_matches(b, b_ref, tol, "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=37, d=100, B=10, poison=False, index_dtype=torch.int32)
    W, b = p.W.clone(), p.b.clone()
    W_ref, b_ref = p.W.double(), p.b.double()
    for _ in range(4):
        batch = p.next_batch()
        sgd_step(batch.x, batch.y.int(), batch.slots.int(), W, b, p.n_classes, p.per_slot, 0.01, impl=impl)
        W_ref, b_ref = reference.sgd_step_ref(batch.x, batch.y, batch.slots, W_ref, b_ref, p.n_classes,
                                              p.per_slot, 0.01)
    assert relative_rmse(W, W_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"
    assert relative_rmse(b, b_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"
    assert not torch.equal(W.nan_to_num(), p.W.nan_to_num()), "the steps changed nothing"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_no_session_rows_change_nothing(impl):
    p = make_problem(C=10, d=100, layout="empty")
    W, b = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, weight_decay=0.1, impl=impl)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))
    x = torch.randn(5, 100)
    sgd_step(x, torch.zeros(5, dtype=torch.int64), torch.full((5,), -1), W, b, p.n_classes, 0.5, 0.1, impl=impl)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))


def test_triton_writes_every_grad_logit():
    from kernels.triton.sgd import sgd_step_triton
    from kernels.dispatch import per_slot

    p = make_problem(C=37, d=100, layout="mixed")
    scratch = torch.full((p.x.shape[0], 37), float("nan"))
    S = p.W.shape[0]
    sgd_step_triton(p.x, p.y, p.slots, p.W.clone(), p.b.clone(), p.n_classes, per_slot(0.5, S, p.W.device),
                    per_slot(0.0, S, p.W.device), grad_logits=scratch)
    assert not scratch.isnan().any()
    # Rows of one slot sum to zero over classes (softmax minus one-hot), skipped rows are zero.
    torch.testing.assert_close(scratch.sum(1), torch.zeros(p.x.shape[0]), atol=1e-6, rtol=0)
    assert torch.equal(scratch[p.slots < 0], torch.zeros_like(scratch[p.slots < 0]))


def test_reference_is_the_autograd_step_of_a_linear_layer():
    """The float64 reference equals what a user writes: nn.Linear + cross-entropy (mean over
    the slot's rows) + torch.optim.SGD with weight decay on the weight only."""
    C, d, n = 10, 24, 7
    x, y = torch.randn(9, d, dtype=torch.float64), torch.randint(0, n, (9,))
    W0 = torch.randn(1, C, d, dtype=torch.float64)
    b0 = torch.randn(1, C, dtype=torch.float64)
    lin = torch.nn.Linear(d, n, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W0[0, :n])
        lin.bias.copy_(b0[0, :n])
    opt = torch.optim.SGD([{"params": [lin.weight], "weight_decay": 0.03},
                           {"params": [lin.bias], "weight_decay": 0.0}], lr=0.4)
    torch.nn.functional.cross_entropy(lin(x), y).backward()
    opt.step()
    W, b = reference.sgd_step_ref(x, y, torch.zeros(9, dtype=torch.int64), W0, b0, torch.tensor([n]), 0.4, 0.03)
    torch.testing.assert_close(W[0, :n], lin.weight.detach())
    torch.testing.assert_close(b[0, :n], lin.bias.detach())
    assert torch.equal(W[0, n:], W0[0, n:]) and torch.equal(b[0, n:], b0[0, n:])

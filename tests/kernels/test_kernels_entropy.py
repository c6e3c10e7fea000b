import pytest
import torch

from kernels import entropy_step, reference, sgd_step
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, assert_matches, tolerance, make_problem, relative_rmse


def _unlabel(p, every: int = 2):
    """Every other row unlabelled (y = -1)."""
    y = p.y.clone()
    y[::every] = -1
    return y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    y = _unlabel(p)
    # Heads scaled up so that some rows are confident and some are not.
    W, b = 3.0 * p.W, p.b.clone()
    lr = p.per_slot if case["layout"] == "mixed" else 0.7
    conf = 0.3 if case["layout"] == "mixed" else 0.5 * p.per_slot
    W_new, b_new = W.clone(), b.clone()
    entropy_step(p.x, y, p.slots, W_new, b_new, p.n_classes, lr, conf, impl=impl)
    W_ref, b_ref = reference.entropy_step_ref(p.x, y, p.slots, W, b, p.n_classes, lr, conf)
    tol = tolerance(case)
    assert_matches(W_new, W_ref, tol, "W", p.seed)
    assert_matches(b_new, b_ref, tol, "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_labelled_rows_are_an_sgd_step(impl):
    p = make_problem(C=10, d=100, layout="mixed")
    W, b = p.W.clone(), p.b.clone()
    entropy_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, 0.99, impl=impl)
    W_sgd, b_sgd = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W_sgd, b_sgd, p.n_classes, 0.5, impl="torch")
    assert_matches(W, W_sgd, 2e-5, "W", p.seed)
    assert_matches(b, b_sgd, 2e-5, "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_lowers_the_entropy_of_confident_rows_and_skips_the_others(impl):
    torch.manual_seed(0)
    C, d = 4, 32
    W, b = torch.randn(1, C, d), torch.zeros(1, C)
    x = torch.randn(8, d)
    y, slots, n = torch.full((8,), -1), torch.zeros(8, dtype=torch.int64), torch.tensor([C])

    def mean_entropy(W, b):
        p = torch.softmax(x @ W[0].T + b[0], 1)
        return float(-(p * p.log()).sum(1).mean())

    before = mean_entropy(W, b)
    W1, b1 = W.clone(), b.clone()
    entropy_step(x, y, slots, W1, b1, n, 0.05, 0.0, impl=impl)
    assert mean_entropy(W1, b1) < before
    W2, b2 = W.clone(), b.clone()
    entropy_step(x, y, slots, W2, b2, n, 0.05, 1.01, impl=impl)  # nobody is that confident
    assert torch.equal(W2, W) and torch.equal(b2, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=10, d=100, B=10, poison=False)
    W, b = p.W.clone(), p.b.clone()
    W_ref, b_ref = p.W.double(), p.b.double()
    for _ in range(3):
        batch = p.next_batch()
        y = batch.y.clone()
        y[1::2] = -1
        entropy_step(batch.x, y, batch.slots, W, b, p.n_classes, p.per_slot, 0.2, impl=impl)
        W_ref, b_ref = reference.entropy_step_ref(batch.x, y, batch.slots, W_ref, b_ref, p.n_classes, p.per_slot,
                                                  0.2)
    assert relative_rmse(W, W_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"
    assert relative_rmse(b, b_ref) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_changes_nothing(impl):
    p = make_problem(C=10, d=100, layout="empty")
    W, b = p.W.clone(), p.b.clone()
    entropy_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, 0.1, impl=impl)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))


def test_triton_writes_every_grad_logit():
    from kernels.dispatch import per_slot
    from kernels.triton.entropy import entropy_step_triton

    p = make_problem(C=37, d=100, layout="mixed")
    scratch = torch.full((p.x.shape[0], 37), float("nan"), device=p.x.device)
    S, dev = p.W.shape[0], p.W.device
    entropy_step_triton(p.x, _unlabel(p), p.slots, p.W.clone(), p.b.clone(), p.n_classes, per_slot(0.5, S, dev),
                        per_slot(0.0, S, dev), grad_logits=scratch)
    assert not scratch.isnan().any()
    # Entropy and cross-entropy gradients both sum to zero over classes; skipped rows are zero.
    torch.testing.assert_close(scratch.sum(1), torch.zeros_like(scratch[:, 0]), atol=1e-6, rtol=0)
    assert torch.equal(scratch[p.slots < 0], torch.zeros_like(scratch[p.slots < 0]))

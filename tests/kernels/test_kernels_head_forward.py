import pytest
import torch

from kernels import head_forward, reference
from tests.kernels.cases import CASES, IMPLS, assert_matches, tolerance, make_problem


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    normalize = torch.rand(p.W.shape[0]) < 0.5
    for norm in (None, normalize):
        logits = head_forward(p.x, p.W, p.b, p.slots, p.n_classes, normalize=norm, impl=impl)
        expected = reference.head_forward_ref(p.x, p.W, p.b, p.slots, p.n_classes, normalize=norm)
        assert logits.dtype == torch.float32
        assert_matches(logits, expected, tolerance(case), f"logits normalize={norm is not None}", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_classes_are_minus_inf_and_skipped_rows_zero(impl):
    p = make_problem(C=10, d=100, layout="mixed")
    logits = head_forward(p.x, p.W, p.b, p.slots, p.n_classes, impl=impl)
    skipped = p.slots < 0
    assert skipped.any()
    assert torch.equal(logits[skipped], torch.zeros_like(logits[skipped]))
    n = p.n_classes[p.slots[~skipped]]
    masked = torch.arange(10) >= n.unsqueeze(1)
    assert torch.isneginf(logits[~skipped][masked]).all()
    assert torch.isfinite(logits[~skipped][~masked]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    p = make_problem(C=37, d=100, layout="empty")
    logits = head_forward(p.x, p.W, p.b, p.slots, p.n_classes, impl=impl)
    assert logits.shape == (0, 37) and logits.dtype == torch.float32


def test_triton_writes_every_output_element():
    from kernels.triton.forward import head_forward_triton

    p = make_problem(C=37, d=100, layout="mixed")
    out = torch.full((p.x.shape[0], 37), float("nan"))
    head_forward_triton(p.x, p.W, p.b, p.slots, p.n_classes, out=out)
    assert not out.isnan().any()
    assert_matches(out, reference.head_forward_ref(p.x, p.W, p.b, p.slots, p.n_classes), 2e-5, "logits", p.seed)


@pytest.mark.parametrize("layout", ["all_distinct", "skewed"])
def test_torch_grouping_strategies(layout):
    """The torch path batches rows per slot when padding is cheap and falls back to per-row
    heads when one slot has far more rows than the others: both must agree with the reference."""
    S, C, d = 48, 10, 100
    if layout == "all_distinct":
        slots = torch.randperm(S)[:40]
    else:
        slots = torch.cat([torch.zeros(30, dtype=torch.int64), torch.arange(1, 41)])
    x = torch.randn(slots.numel(), d)
    W, b = torch.randn(S, C, d), torch.randn(S, C)
    n = torch.randint(1, C + 1, (S,))
    logits = head_forward(x, W, b, slots, n, impl="torch")
    assert_matches(logits, reference.head_forward_ref(x, W, b, slots, n), 2e-5, layout, seed=-1)


def test_cosine_head_is_scale_invariant():
    p = make_problem(C=10, d=100, layout="one_session", poison=False)
    normalize = torch.ones(p.W.shape[0], dtype=torch.bool)
    a = head_forward(p.x, p.W, p.b, p.slots, p.n_classes, normalize=normalize, impl="torch")
    c = head_forward(7.5 * p.x, p.W, p.b, p.slots, p.n_classes, normalize=normalize, impl="torch")
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)

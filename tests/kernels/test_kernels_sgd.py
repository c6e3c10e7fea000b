import pytest
import torch

from kernels import SlotBatch, reference, sgd_step
from tests.kernels.cases import (CASES, IMPLS, SEQUENCE_RMSE, TOLERANCE, assert_matches, tolerance, make_problem,
                                 relative_rmse)


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


# ---- per-feature rates (Meta-SGD): feature_rates r [d], bias_rate rho ----------------------------

# Row counts per slot (0: the slot gets no row) picking each torch code path (kernels/slot_batch.py);
# the Triton path sees the same layouts (a slot with 40 rows spans three 16-row tiles of stage 2).
PROFILES = {
    "one_slot": (0, 5, 0),
    "padded": (3, 1, 2, 0, 4, 0),
    "per_row": (40, 1, 1, 1, 0, 1),
}
# d and C are not multiples of any block size; C=67 spans two class blocks, d=100 and 150 two and
# three feature blocks of stage 2, so a work item's rates are not the first BLOCK_D entries of r.
RATE_CASES = [
    pytest.param(dict(C=37, d=100, dtype=torch.float32), id="C37-d100-fp32"),
    pytest.param(dict(C=67, d=150, dtype=torch.bfloat16), id="C67-d150-bf16"),
    pytest.param(dict(C=37, d=100, dtype=torch.float32, head_dtype=torch.bfloat16), id="C37-d100-fp32-bf16heads"),
]


def _profile_problem(C, d, counts, dtype=torch.float32, head_dtype=torch.float32, skipped=2, poison=True):
    """A problem whose slot k gets counts[k] rows, plus `skipped` rows with slot -1, shuffled.
    Masked classes are NaN; with `poison` so are the heads of slots without rows."""
    S, B = len(counts), sum(counts) + skipped
    p = make_problem(C=C, d=d, dtype=dtype, S=S, B=B, poison=False, head_dtype=head_dtype)
    device = p.W.device
    g = torch.Generator().manual_seed(p.seed ^ 0x5EED)
    with torch.device("cpu"):
        slots = torch.cat([torch.full((n,), s) for s, n in enumerate(counts)] + [torch.full((skipped,), -1)])
        slots = slots[torch.randperm(B, generator=g)]
        n = p.n_classes.cpu()[slots.clamp_min(0)]
        y = torch.minimum((torch.rand(B, generator=g) * n).long(), n - 1)
        p.x = torch.randn(B, d, generator=g).to(dtype).to(device)
        rates = 0.25 + 1.5 * torch.rand(d, generator=g)
    p.slots, p.y = slots.to(device), y.to(device)
    if poison:
        untouched = torch.tensor([c == 0 for c in counts], device=device)
        p.W[untouched] = float("nan")
        p.b[untouched] = float("nan")
    return p, rates.to(device)


def _as_bias_rate(value, form):
    return value if form == "float" else torch.tensor([value], dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("case", RATE_CASES)
def test_rates_match_reference(case, profile, impl):
    p, r = _profile_problem(counts=PROFILES[profile], **case)
    assert SlotBatch(p.slots).torch_path == profile, "the layout does not pick the intended torch path"
    lr, wd = p.per_slot, 0.05 * p.per_slot  # per-slot lr and weight decay together with the rates
    rho = _as_bias_rate(0.6, "float" if case["dtype"] == torch.float32 else "tensor")
    W, b = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, lr, weight_decay=wd, impl=impl, feature_rates=r, bias_rate=rho)
    W_ref, b_ref = reference.sgd_step_ref(p.x, p.y, p.slots, p.W, p.b, p.n_classes, lr, wd, feature_rates=r,
                                          bias_rate=rho)
    tol = tolerance(dict(dtype=case["dtype"], head_dtype=case.get("head_dtype", torch.float32)))
    assert_matches(W, W_ref, tol, "W", p.seed)
    assert_matches(b, b_ref, tol, "b", p.seed)
    # The rates matter: the plain step is further from the reference than 10x the tolerance.
    W_plain, _ = reference.sgd_step_ref(p.x, p.y, p.slots, p.W, p.b, p.n_classes, lr, wd)
    finite = W_ref.isfinite()
    assert (W_plain - W_ref)[finite].abs().max() > 10 * tol * W_ref[finite].abs().max(), f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["feature_rates", "bias_rate"])
def test_one_rate_alone_leaves_the_other_at_one(which, impl):
    p, r = _profile_problem(C=37, d=100, counts=PROFILES["padded"])
    rates = dict(feature_rates=r) if which == "feature_rates" else dict(bias_rate=torch.tensor([2.5]))
    W, b = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.4, weight_decay=0.02, impl=impl, **rates)
    W_ref, b_ref = reference.sgd_step_ref(p.x, p.y, p.slots, p.W, p.b, p.n_classes, 0.4, 0.02, **rates)
    assert_matches(W, W_ref, TOLERANCE[torch.float32], "W", p.seed)
    assert_matches(b, b_ref, TOLERANCE[torch.float32], "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_rates_of_one_are_the_plain_step(impl):
    """r = ones, rho = 1 give today's step: bit for bit on the torch path (every code path), to
    rounding on the Triton path."""
    for profile in PROFILES if impl == "torch" else ["per_row"]:
        p, _ = _profile_problem(C=37, d=100, counts=PROFILES[profile])
        lr, wd = p.per_slot, 0.05 * p.per_slot
        W1, b1, W2, b2 = p.W.clone(), p.b.clone(), p.W.clone(), p.b.clone()
        sgd_step(p.x, p.y, p.slots, W1, b1, p.n_classes, lr, wd, impl=impl)
        for bias_rate in (1.0, torch.ones(1)):
            W2.copy_(p.W)
            b2.copy_(p.b)
            sgd_step(p.x, p.y, p.slots, W2, b2, p.n_classes, lr, wd, impl=impl, feature_rates=torch.ones(100),
                     bias_rate=bias_rate)
            assert not torch.equal(W1.nan_to_num(), p.W.nan_to_num()), "the step changed nothing"
            if impl == "torch":
                assert torch.equal(W1.nan_to_num(7.0), W2.nan_to_num(7.0)), f"{profile}, seed={p.seed}"
                assert torch.equal(b1.nan_to_num(7.0), b2.nan_to_num(7.0)), f"{profile}, seed={p.seed}"
            else:
                torch.testing.assert_close(W2, W1, equal_nan=True, rtol=1e-6, atol=1e-7, msg=f"seed={p.seed}")
                torch.testing.assert_close(b2, b1, equal_nan=True, rtol=1e-6, atol=1e-7, msg=f"seed={p.seed}")


@pytest.mark.parametrize("impl", IMPLS)
def test_rates_leave_untouched_slots_and_masked_classes_as_they_were(impl):
    """Finite heads everywhere (no NaN poison): slots without rows and masked classes keep their
    exact bits; rows with slot -1 contribute nothing."""
    p, r = _profile_problem(C=37, d=100, counts=PROFILES["padded"], poison=False)
    masked = torch.arange(37) >= p.n_classes.unsqueeze(1)  # [S, C]
    W0, b0 = p.W.clone(), p.b.clone()
    W0[masked], b0[masked] = 3.0, -2.0
    W, b = W0.clone(), b0.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, 0.1, impl=impl, feature_rates=r * 4.0, bias_rate=3.0)
    untouched = torch.tensor([c == 0 for c in PROFILES["padded"]])
    assert torch.equal(W[untouched], W0[untouched]) and torch.equal(b[untouched], b0[untouched])
    assert torch.equal(W[masked], W0[masked]) and torch.equal(b[masked], b0[masked])
    touched_live = ~untouched.unsqueeze(1) & ~masked
    assert bool((W[touched_live] != W0[touched_live]).any(1).all()), "a live class of a touched slot did not move"
    # Skipped rows: dropping them changes nothing.
    keep = p.slots >= 0
    W2, b2 = W0.clone(), b0.clone()
    sgd_step(p.x[keep], p.y[keep], p.slots[keep], W2, b2, p.n_classes, 0.5, 0.1, impl=impl, feature_rates=r * 4.0,
             bias_rate=3.0)
    torch.testing.assert_close(W2, W, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b2, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_decay_is_not_scaled_by_the_rates(impl):
    """A feature with rate 0 gets no gradient step but the full decay; rho scales the bias step only."""
    p, r = _profile_problem(C=10, d=100, counts=PROFILES["padded"])
    r[::3] = 0.0
    lr, wd = 0.5, 0.2
    W, b = p.W.clone(), p.b.clone()
    sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, lr, wd, impl=impl, feature_rates=r, bias_rate=0.0)
    touched = torch.tensor([c > 0 for c in PROFILES["padded"]])
    live = (torch.arange(10) < p.n_classes.unsqueeze(1)) & touched.unsqueeze(1)  # [S, C]
    zero = r == 0
    decayed = (p.W * (1.0 - lr * wd))[live][:, zero]
    torch.testing.assert_close(W[live][:, zero], decayed, rtol=1e-6, atol=1e-7, msg=f"seed={p.seed}")
    assert torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0)), "rho = 0 must leave the bias as it was"
    moved = (W[live][:, ~zero] - (p.W * (1.0 - lr * wd))[live][:, ~zero]).abs()
    assert float(moved.max()) > 1e-3, f"features with a rate got no gradient step, seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [
    pytest.param(dict(feature_rates=torch.ones(101)), id="rates-too-long"),
    pytest.param(dict(feature_rates=torch.ones(99)), id="rates-too-short"),
    pytest.param(dict(feature_rates=torch.ones(100, dtype=torch.float64)), id="rates-float64"),
    pytest.param(dict(feature_rates=torch.ones(100, dtype=torch.bfloat16)), id="rates-bf16"),
    pytest.param(dict(feature_rates=torch.ones(1, 100)), id="rates-2d"),
    pytest.param(dict(feature_rates=torch.tensor(1.0)), id="rates-0d"),
    pytest.param(dict(feature_rates=[1.0] * 100), id="rates-list"),
    pytest.param(dict(feature_rates=torch.ones(100, device="meta")), id="rates-other-device"),
    pytest.param(dict(bias_rate=torch.ones(2)), id="bias-two-elements"),
    pytest.param(dict(bias_rate=torch.ones(1, 1)), id="bias-2d"),
    pytest.param(dict(bias_rate=torch.ones(1, dtype=torch.float64)), id="bias-float64"),
    pytest.param(dict(bias_rate=torch.ones(1, device="meta")), id="bias-other-device"),
    pytest.param(dict(bias_rate="1.0"), id="bias-str"),
])
def test_bad_rates_raise_value_error_and_change_nothing(bad, impl):
    p, _ = _profile_problem(C=10, d=100, counts=PROFILES["padded"])
    W, b = p.W.clone(), p.b.clone()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, 0.1, impl=impl, **bad)
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))


def test_reference_rates_are_the_autograd_step_with_per_feature_rates():
    """The reference with rates equals a manual Meta-SGD step on nn.Linear's autograd gradient:
    weight -= lr * (grad * r + wd * weight), bias -= lr * rho * grad."""
    C, d, n = 10, 24, 7
    x, y = torch.randn(9, d, dtype=torch.float64), torch.randint(0, n, (9,))
    W0, b0 = torch.randn(1, C, d, dtype=torch.float64), torch.randn(1, C, dtype=torch.float64)
    r, rho, lr, wd = torch.rand(d, dtype=torch.float64) * 2, 0.3, 0.4, 0.03
    weight, bias = W0[0, :n].clone().requires_grad_(), b0[0, :n].clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight, bias), y).backward()
    W, b = reference.sgd_step_ref(x, y, torch.zeros(9, dtype=torch.int64), W0, b0, torch.tensor([n]), lr, wd,
                                  feature_rates=r, bias_rate=torch.tensor([rho]))
    torch.testing.assert_close(W[0, :n], (weight - lr * (weight.grad * r + wd * weight)).detach())
    torch.testing.assert_close(b[0, :n], (bias - lr * rho * bias.grad).detach())
    assert torch.equal(W[0, n:], W0[0, n:]) and torch.equal(b[0, n:], b0[0, n:])

"""class_mean_head_step (the hyper rule's op): running class sums and counts mapped through a
learned metric M to a linear head, W[s, c] = scale_s M m, b[s, c] = -scale_s / 2 m^T M m.

Against the float64 reference (kernels.class_mean_head.class_mean_head_step_ref) on fresh seeded
problems with NaN-poisoned memory the op must neither read nor write (tests/kernels/cases.py),
against hand-computed class means, as a nearest-class-mean classifier under M, and for its
argument and debug index checks. The op has a Triton kernel (CUDA; here under the interpreter)
and a batched torch path (CPU): the reference test runs both, and "auto".
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import SlotBatch, dispatch, head_forward
from kernels.class_mean_head import class_mean_head_step_ref
from tests.kernels.cases import (CASES, HEAD_BF16_TOLERANCE, IMPLS, TOLERANCE, assert_matches, fresh_seed,
                                 make_problem, tolerance)

OP_IMPLS = ["auto", *IMPLS]

# CASES cover C in {10, 37}, d in {100, 192}; these add widths that are not powers of two (and
# a d that is not a multiple of 8), bf16 rows into bf16 heads and int32 indices.
ODD_CASES = [
    pytest.param(dict(C=7, d=37, dtype=torch.float32, layout="mixed"), id="C7-d37-fp32-mixed"),
    pytest.param(dict(C=13, d=100, dtype=torch.float32, layout="one_session"), id="C13-d100-fp32-one_session"),
    pytest.param(dict(C=13, d=37, dtype=torch.bfloat16, layout="mixed", head_dtype=torch.bfloat16,
                      index_dtype=torch.int32), id="C13-d37-bf16-mixed-bf16heads-int32"),
]

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _device() -> torch.device:
    return torch.get_default_device()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (NaN payloads included), as integers on the CPU."""
    t = t.detach().contiguous()
    return (t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t).cpu()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _metric(kind: str, d: int, g: torch.Generator) -> torch.Tensor:
    """float32 [d, d] on the test device: the identity, or a random symmetric positive-definite
    matrix (exactly symmetric in float32, condition number about 20)."""
    if kind == "identity":
        return torch.eye(d, device=_device())
    with torch.device("cpu"):  # the generator lives on the CPU
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        M = A @ A.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
        M = ((M + M.T) / 2).float()
        assert torch.equal(M, M.T) and bool((torch.linalg.eigvalsh(M.double()) > 0.1).all())
    return M.to(_device())


def _randn(g, *shape):
    """Standard normal float32 draws from the CPU generator g, on the test device."""
    return torch.randn(*shape, generator=g, device="cpu").to(_device())


def _run(p, metric, scale, impl="auto", W=None, b=None, batch=None):
    state = p.clone_state()
    W = state["W"] if W is None else W
    b = state["b"] if b is None else b
    kernels.class_mean_head_step(p.x, p.y, p.slots, p.state_rows, state["sums"], state["counts"], W, b,
                                 p.n_classes, metric, scale, impl=impl, batch=batch)
    return state["sums"], state["counts"], W, b


def _poison_touched_heads(p):
    """W, b with the heads of every slot that gets rows poisoned whole: a (slot, class) cell the
    op should write and does not keeps NaN, one it writes by mistake loses it."""
    W, b = p.W.clone(), p.b.clone()
    touched = p.slots[p.slots >= 0].long()
    W[touched] = float("nan")
    b[touched] = float("nan")
    return W, b


def _sessions(g, rows_per_slot, n_classes, state_of_slot, C, d, R, skipped=3, x_dtype=torch.float32,
              head_dtype=torch.float32):
    """A hand-built call on the test device: slot s gets rows_per_slot[s] rows, all slots'
    rows shuffled together with `skipped` rows of no session (their labels and state rows are
    garbage the op must ignore). Random finite heads and state, masked classes of every head
    NaN, state rows no slot uses NaN."""
    with torch.device("cpu"):  # drawn on the CPU (seeded generator), then moved
        t = _sessions_on_cpu(g, rows_per_slot, n_classes, state_of_slot, C, d, R, skipped, x_dtype)
    dev = _device()
    for k in ("x", "y", "slots", "state_rows", "sums", "counts", "n_classes"):
        t[k] = t[k].to(dev)
    t["W"], t["b"] = t["W"].to(head_dtype).to(dev), t["b"].to(head_dtype).to(dev)
    return t


def _sessions_on_cpu(g, rows_per_slot, n_classes, state_of_slot, C, d, R, skipped, x_dtype):
    S = len(rows_per_slot)
    n_classes = torch.tensor(n_classes)
    state_of_slot = torch.tensor(state_of_slot)
    slots = torch.cat([torch.full((k,), s, dtype=torch.int64) for s, k in enumerate(rows_per_slot)]
                      + [torch.full((skipped,), -1, dtype=torch.int64)])
    slots = slots[torch.randperm(slots.numel(), generator=g)]
    live = slots.clamp_min(0)
    y = (torch.rand(slots.numel(), generator=g) * n_classes[live]).long().minimum(n_classes[live] - 1)
    y = torch.where(slots >= 0, y, C + 5)
    state_rows = torch.where(slots >= 0, state_of_slot[live], R + 7)
    x = torch.randn(slots.numel(), d, generator=g).to(x_dtype)
    W = 0.1 * torch.randn(S, C, d, generator=g)
    b = 0.1 * torch.randn(S, C, generator=g)
    masked = torch.arange(C) >= n_classes[:, None]
    W[masked] = float("nan")
    b[masked] = float("nan")
    counts = torch.randint(0, 3, (R, C), generator=g).float()
    sums = torch.randn(R, C, d, generator=g) * counts[:, :, None]
    unused = torch.ones(R, dtype=torch.bool)
    unused[state_of_slot] = False
    sums[unused] = float("nan")
    counts[unused] = float("nan")
    return dict(x=x, y=y, slots=slots, state_rows=state_rows, sums=sums, counts=counts, W=W, b=b,
                n_classes=n_classes, state_of_slot=state_of_slot)


def _call(t, metric, scale, **kw):
    kernels.class_mean_head_step(t["x"], t["y"], t["slots"], t["state_rows"], t["sums"], t["counts"], t["W"], t["b"],
                                 t["n_classes"], metric, scale, **kw)


# ---- against the float64 reference ----------------------------------------------------------


@pytest.mark.parametrize("impl", OP_IMPLS)
@pytest.mark.parametrize("metric_kind", ["identity", "spd"])
@pytest.mark.parametrize("case", CASES + ODD_CASES)
def test_matches_reference(case, metric_kind, impl):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    p = make_problem(**case, seed=seed)
    d = p.x.shape[1]
    metric = _metric(metric_kind, d, g)
    scale = 4.0 * p.per_slot if case["layout"] == "mixed" else 2.5  # per-slot tensor / one float
    W, b = _poison_touched_heads(p)
    sums, counts, W_out, b_out = _run(p, metric, scale, impl, W.clone(), b.clone())
    sums_ref, counts_ref, W_ref, b_ref = class_mean_head_step_ref(
        p.x, p.y, p.slots, p.state_rows, p.sums, p.counts, W, b, p.n_classes, metric, scale)
    tol = tolerance(case)
    assert_matches(sums, sums_ref, TOLERANCE[case["dtype"]], "sums", seed)
    assert_matches(counts, counts_ref, 0.0, "counts", seed)
    assert_matches(W_out, W_ref, tol, "W", seed)
    assert_matches(b_out, b_ref, tol, "b", seed)
    assert W_out.dtype == p.W.dtype and b_out.dtype == p.b.dtype
    # The call wrote something: every row's own (slot, class) cell is finite now.
    rows = p.slots >= 0
    assert W_out[p.slots[rows].long(), p.y[rows].long()].isfinite().all(), f"seed={seed}"
    assert b_out[p.slots[rows].long(), p.y[rows].long()].isfinite().all(), f"seed={seed}"


def test_several_slots_spread_rows_and_permuted_state_rows_match_reference():
    """Four slots with 5, 1, 3 and 0 rows interleaved with skipped rows, state rows that are not
    the slot indices (two of six unused, NaN), per-slot scales, a random SPD metric."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d, R = 7, 37, 6
    t = _sessions(g, [5, 1, 3, 0], [7, 4, 7, 5], [4, 0, 5, 2], C, d, R)
    t["W"][3] = float("nan")  # the slot without rows: its whole head must stay as it is
    t["b"][3] = float("nan")
    metric = _metric("spd", d, g)
    scale = torch.tensor([0.5, 3.0, 1.25, 7.0], device=_device())
    before = {k: t[k].clone() for k in ("sums", "counts", "W", "b")}
    _call(t, metric, scale)
    ref = class_mean_head_step_ref(t["x"], t["y"], t["slots"], t["state_rows"], before["sums"], before["counts"],
                                   before["W"], before["b"], t["n_classes"], metric, scale)
    for name, expected in zip(("sums", "counts", "W", "b"), ref):
        assert_matches(t[name], expected, 0.0 if name == "counts" else TOLERANCE[torch.float32], name, seed)
    assert t["W"][3].isnan().all() and t["b"][3].isnan().all()
    for r in (1, 3):  # state rows no slot uses
        assert t["sums"][r].isnan().all() and t["counts"][r].isnan().all()


def test_heads_are_scaled_metric_times_running_class_means():
    """Independent of the reference: W[s, c] = scale_s M m and b[s, c] = -scale_s / 2 m^T M m
    with m = (old sums + the new rows) / (old counts + their number), per state row."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d, R = 13, 100, 5
    t = _sessions(g, [6, 2, 4], [13, 9, 13], [3, 1, 4], C, d, R, skipped=2)
    metric = _metric("spd", d, g)
    scale = torch.tensor([1.0, 0.25, 4.0], device=_device())
    sums0, counts0, W0, b0 = (t[k].clone() for k in ("sums", "counts", "W", "b"))
    _call(t, metric, scale)

    M = metric.double().cpu()
    x, y, slots = t["x"].double().cpu(), t["y"].cpu(), t["slots"].cpu()
    for s in range(3):
        r = int(t["state_of_slot"][s])
        for c in range(C):
            mine = (slots == s) & (y == c)
            n = int(mine.sum())
            old_sum, old_count = sums0[r, c].double().cpu(), float(counts0[r, c])
            assert float(t["counts"][r, c]) == old_count + n, f"seed={seed}"
            torch.testing.assert_close(t["sums"][r, c].double().cpu(), old_sum + x[mine].sum(0), atol=1e-5, rtol=1e-5)
            if n == 0:
                assert _same_bits(t["W"][s, c], W0[s, c]) and _same_bits(t["b"][s, c], b0[s, c])
                continue
            m = (old_sum + x[mine].sum(0)) / (old_count + n)
            k = float(scale[s])
            w_expected = k * (M @ m)
            b_expected = -0.5 * k * (m @ M @ m)
            torch.testing.assert_close(t["W"][s, c].double().cpu(), w_expected,
                                       atol=1e-5 * float(w_expected.abs().max()), rtol=1e-5)
            torch.testing.assert_close(t["b"][s, c].double().cpu(), b_expected,
                                       atol=1e-5 * abs(float(b_expected)), rtol=1e-5)


# ---- accumulation over calls ----------------------------------------------------------------


@pytest.mark.parametrize("metric_kind", ["identity", "spd"])
def test_successive_calls_equal_the_reference_applied_each_time(metric_kind):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    p = make_problem(C=13, d=37, B=10, poison=False, seed=seed)
    metric = _metric(metric_kind, 37, g)
    scale = 2.0 * p.per_slot
    state = p.clone_state()
    sums_ref, counts_ref, W_ref, b_ref = p.sums, p.counts, p.W, p.b
    for step in range(3):
        batch = p.next_batch()
        kernels.class_mean_head_step(batch.x, batch.y, batch.slots, batch.state_rows, state["sums"], state["counts"],
                                     state["W"], state["b"], p.n_classes, metric, scale)
        sums_ref, counts_ref, W_ref, b_ref = class_mean_head_step_ref(
            batch.x, batch.y, batch.slots, batch.state_rows, sums_ref, counts_ref, W_ref, b_ref, p.n_classes,
            metric, scale)
        tol = 2 * TOLERANCE[torch.float32]
        assert_matches(state["sums"], sums_ref, tol, f"sums after call {step + 1}", seed)
        assert_matches(state["counts"], counts_ref, 0.0, f"counts after call {step + 1}", seed)
        assert_matches(state["W"], W_ref, tol, f"W after call {step + 1}", seed)
        assert_matches(state["b"], b_ref, tol, f"b after call {step + 1}", seed)
    assert not torch.equal(state["counts"], p.counts), f"seed={seed}"


def test_sums_and_counts_carry_over_between_calls():
    """From empty state, two calls on one class: the head is the mean of all rows of both calls,
    and a batch split in two calls gives the head of the one call over all its rows."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d = 7, 37
    dev = _device()
    metric = _metric("spd", d, g)
    x = _randn(g, 9, d)
    y = torch.tensor([2, 5, 2, 2, 0, 5, 2, 0, 2], device=dev)
    slots = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1], device=dev)
    state_rows = torch.where(slots == 1, 0, 2)

    def fresh():
        return (torch.zeros(3, C, d, device=dev), torch.zeros(3, C, device=dev),
                torch.zeros(2, C, d, device=dev), torch.zeros(2, C, device=dev))

    split = fresh()
    for part in (slice(0, 4), slice(4, 9)):
        kernels.class_mean_head_step(x[part], y[part], slots[part], state_rows[part], *split,
                                     torch.tensor([7, 6], device=dev), metric, 1.5)
    whole = fresh()
    kernels.class_mean_head_step(x, y, slots, state_rows, *whole, torch.tensor([7, 6], device=dev), metric, 1.5)

    sums, counts, W, b = split
    assert counts[0].tolist() == [2, 0, 4, 0, 0, 2, 0], f"seed={seed}"  # rows of both calls
    assert counts[2].tolist() == [0, 0, 1, 0, 0, 0, 0] and counts[1].eq(0).all()
    M = metric.double().cpu()
    for c in (0, 2, 5):
        m = x[(slots == 1) & (y == c)].double().cpu().mean(0)
        torch.testing.assert_close(W[1, c].double().cpu(), 1.5 * (M @ m), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b[1, c].double().cpu(), -0.75 * (m @ M @ m), atol=1e-5, rtol=1e-5)
    for mine, other, what in zip(split, whole, ("sums", "counts", "W", "b")):
        torch.testing.assert_close(mine, other, atol=1e-5, rtol=1e-5, msg=f"{what}: split != whole, seed={seed}")
    assert torch.equal(W[1, [1, 3, 4, 6]], torch.zeros(4, d, device=dev))  # no rows: untouched zeros
    assert torch.equal(W[0, [0, 1, 3, 4, 5, 6]], torch.zeros(6, d, device=dev))


# ---- memory the op must leave alone ----------------------------------------------------------


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_untouched_classes_slots_and_state_rows_keep_their_bits(head_dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d, R = 13, 37, 7
    t = _sessions(g, [4, 0, 3, 2, 0], [13, 6, 8, 13, 4], [6, 1, 0, 3, 2], C, d, R, head_dtype=head_dtype)
    # Slots 1 and 4 get no rows; state rows 4 and 5 belong to nobody: all poisoned.
    for s in (1, 4):
        t["W"][s] = float("nan")
        t["b"][s] = float("nan")
    metric = _metric("spd", d, g)
    before = {k: t[k].clone() for k in ("sums", "counts", "W", "b")}
    _call(t, metric, 0.75)

    slots, y = t["slots"].cpu(), t["y"].cpu()
    touched = torch.zeros(5, C, dtype=torch.bool, device="cpu")
    touched[slots[slots >= 0], y[slots >= 0]] = True
    assert int(touched.sum()) >= 3, f"seed={seed}"
    untouched = ~touched.to(_device())
    assert _same_bits(t["W"][untouched], before["W"][untouched]), f"untouched head cells changed, seed={seed}"
    assert _same_bits(t["b"][untouched], before["b"][untouched]), f"untouched bias cells changed, seed={seed}"
    masked = (torch.arange(C, device=_device()) >= t["n_classes"][:, None])
    assert t["W"][masked].isnan().all() and t["b"][masked].isnan().all()
    assert t["W"][[1, 4]].isnan().all() and t["b"][[1, 4]].isnan().all()
    for r in (4, 5):
        assert t["sums"][r].isnan().all() and t["counts"][r].isnan().all()
    written = touched.to(_device())
    assert t["W"][written].isfinite().all() and t["b"][written].isfinite().all(), f"seed={seed}"
    assert not (t["W"][written] == before["W"][written]).all(dim=1).any(), f"a touched class kept its head, seed={seed}"
    used = torch.tensor([6, 1, 0, 3, 2])
    assert t["sums"][used].isfinite().all() and t["counts"][used].isfinite().all()
    for r in (1, 2):  # the state rows of the slots without rows
        assert _same_bits(t["sums"][r], before["sums"][r]) and _same_bits(t["counts"][r], before["counts"][r])


def test_labels_of_masked_classes_accumulate_but_write_no_head():
    """Without the debug checks a label in [n_classes[s], C) is pooled like any other (the
    reference does) but its class is masked: its head and bias stay NaN."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d, dev = 7, 37, _device()
    x = _randn(g, 6, d)
    y = torch.tensor([0, 5, 1, 6, 5, 2], device=dev)
    slots = torch.tensor([0, 0, 1, 0, -1, 1], device=dev)
    state_rows = torch.tensor([1, 1, 0, 1, 0, 0], device=dev)
    n_classes = torch.tensor([4, 7], device=dev)
    sums, counts = torch.zeros(2, C, d, device=dev), torch.zeros(2, C, device=dev)
    W, b = torch.zeros(2, C, d, device=dev), torch.zeros(2, C, device=dev)
    W[0, 4:] = float("nan")
    b[0, 4:] = float("nan")
    metric = _metric("spd", d, g)
    ref = class_mean_head_step_ref(x, y, slots, state_rows, sums, counts, W, b, n_classes, metric, 2.0)
    kernels.class_mean_head_step(x, y, slots, state_rows, sums, counts, W, b, n_classes, metric, 2.0)
    for name, actual, expected in zip(("sums", "counts", "W", "b"), (sums, counts, W, b), ref):
        assert_matches(actual, expected, 0.0 if name == "counts" else TOLERANCE[torch.float32], name, seed)
    assert counts[1].tolist() == [1, 0, 0, 0, 0, 1, 1]
    assert W[0, 4:].isnan().all() and b[0, 4:].isnan().all()
    assert W[0, 0].isfinite().all() and not W[0, 0].eq(0).all()


# ---- bf16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_heads_round_the_fp32_heads_once(x_dtype):
    """bf16 W and b: within bf16 rounding of the reference, and (the op computes in fp32 and
    rounds once per stored value) the fp32 op's heads rounded to bf16; untouched cells keep
    their bf16 bits."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, d, R = 13, 100, 5
    t32 = _sessions(g, [5, 3, 0, 4], [13, 7, 13, 10], [2, 4, 1, 0], C, d, R, x_dtype=x_dtype)
    t16 = dict(t32, W=t32["W"].to(torch.bfloat16), b=t32["b"].to(torch.bfloat16),
               sums=t32["sums"].clone(), counts=t32["counts"].clone())
    W16_0, b16_0 = t16["W"].clone(), t16["b"].clone()
    metric = _metric("spd", d, g)
    scale = torch.tensor([1.0, 3.0, 0.5, 0.2], device=_device())
    ref = class_mean_head_step_ref(t16["x"], t16["y"], t16["slots"], t16["state_rows"], t16["sums"], t16["counts"],
                                   W16_0, b16_0, t16["n_classes"], metric, scale)
    _call(t32, metric, scale)
    _call(t16, metric, scale)
    assert t16["W"].dtype == torch.bfloat16 and t16["b"].dtype == torch.bfloat16
    assert_matches(t16["sums"], ref[0], TOLERANCE[x_dtype], "sums", seed)
    assert_matches(t16["counts"], ref[1], 0.0, "counts", seed)
    assert_matches(t16["W"], ref[2], HEAD_BF16_TOLERANCE, "W", seed)
    assert_matches(t16["b"], ref[3], HEAD_BF16_TOLERANCE, "b", seed)
    # Elementwise too, not only against the largest value: half a bf16 ulp plus fp32 noise.
    finite = ref[2].isfinite()
    W16 = t16["W"].double().cpu()
    assert ((W16[finite] - ref[2][finite]).abs() <= 2 ** -8 * ref[2][finite].abs() + 1e-6).all(), f"seed={seed}"

    touched = torch.zeros(4, C, dtype=torch.bool, device=_device())
    valid = t32["slots"] >= 0
    touched[t32["slots"][valid], t32["y"][valid]] = True
    assert _same_bits(t16["W"][~touched], W16_0[~touched]) and _same_bits(t16["b"][~touched], b16_0[~touched])
    if t32["x"].is_cuda:  # scatter-adds with atomics on CUDA: the fp32 runs may differ in the last bit
        torch.testing.assert_close(t16["W"][touched], t32["W"][touched].to(torch.bfloat16), atol=0, rtol=2 ** -7)
    else:
        assert _same_bits(t16["W"][touched], t32["W"][touched].to(torch.bfloat16)), f"seed={seed}"
        assert _same_bits(t16["b"][touched], t32["b"][touched].to(torch.bfloat16)), f"seed={seed}"


# ---- the head it writes -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, "per-slot"])
@pytest.mark.parametrize("metric_kind", ["identity", "spd"])
def test_head_is_a_nearest_class_mean_classifier_under_the_metric(metric_kind, scale):
    """W x + b = -scale/2 (x - m_c)^T M (x - m_c) + scale/2 x^T M x: its argmax over the live
    classes is the class mean nearest x under M."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    S, C, d, R = 3, 7, 37, 4
    n_classes = [7, 5, 7]
    dev = _device()
    metric = _metric(metric_kind, d, g)
    with torch.device("cpu"):  # drawn on the CPU (seeded generator), then moved
        scale_t = torch.tensor([0.5, 2.0, 1.0]) if scale == "per-slot" else torch.full((S,), scale)
        n = torch.tensor(n_classes)
        centers = torch.randn(S, C, d, generator=g)
        slots, y = [], []
        for s in range(S):
            for c in range(n_classes[s]):  # every live class gets 1 to 4 rows
                k = int(torch.randint(1, 5, (1,), generator=g))
                slots += [s] * k
                y += [c] * k
        slots, y = torch.tensor(slots), torch.tensor(y)
        perm = torch.randperm(slots.numel(), generator=g)
        slots, y = slots[perm], y[perm]
        x = centers[slots, y] + 0.7 * torch.randn(slots.numel(), d, generator=g)
        state_rows = torch.tensor([2, 0, 3])[slots]
        q_slots = torch.arange(S).repeat_interleave(120)
        near = centers[q_slots, torch.randint(0, C, (q_slots.numel(),), generator=g) % n[q_slots]]
        queries = near + 1.0 * torch.randn(q_slots.numel(), d, generator=g)
        queries[::4] = 1.5 * torch.randn(queries[::4].shape, generator=g)  # and points far from every mean
    sums, counts = torch.zeros(R, C, d, device=dev), torch.zeros(R, C, device=dev)
    W = torch.full((S, C, d), float("nan"), device=dev)
    b = torch.full((S, C), float("nan"), device=dev)
    kernels.class_mean_head_step(x.to(dev), y.to(dev), slots.to(dev), state_rows.to(dev), sums, counts, W, b,
                                 n.to(dev), metric, scale_t.to(dev) if scale == "per-slot" else scale)
    assert W.isfinite().sum() == sum(n_classes) * d, f"seed={seed}"  # exactly the live classes written
    logits = head_forward(queries.to(dev), W, b, q_slots.to(dev), n.to(dev)).double().cpu()

    M = metric.double().cpu()
    q = queries.double()
    for s in range(S):
        mine = q_slots == s
        ns, k = n_classes[s], float(scale_t[s])
        means = torch.stack([x[(slots == s) & (y == c)].double().mean(0) for c in range(ns)])  # [ns, d]
        diff = q[mine][:, None, :] - means[None]  # [Q, ns, d]
        dist = torch.einsum("qcd,de,qce->qc", diff, M, diff)
        qMq = torch.einsum("qd,de,qe->q", q[mine], M, q[mine])
        expected = -0.5 * k * dist + 0.5 * k * qMq[:, None]
        got = logits[mine]
        assert torch.isneginf(got[:, ns:]).all()
        err = (got[:, :ns] - expected).abs().max() / (0.5 * k * (dist.abs().max() + qMq.abs().max()))
        assert err < 1e-5, f"slot {s}: W x + b off the metric distance by {err:.3g}, seed={seed}"

        nearest = dist.argmin(1)
        top2 = dist.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * (qMq + top2[:, 0])
        assert clear.float().mean() > 0.9, f"seed={seed}"
        assert torch.equal(got.argmax(1)[clear], nearest[clear]), f"slot {s}: argmax != nearest mean, seed={seed}"
        assert nearest.unique().numel() >= 3, f"slot {s}: queries too one-sided to test anything, seed={seed}"


# ---- argument checks ---------------------------------------------------------------------------


def _small_call(g):
    C, d, R = 5, 37, 4
    t = _sessions(g, [2, 1, 2], [5, 3, 5], [3, 0, 1], C, d, R, skipped=1)
    t["W"] = t["W"].nan_to_num(0.5)
    t["b"] = t["b"].nan_to_num(0.5)
    t["sums"] = t["sums"].nan_to_num(1.0)
    t["counts"] = t["counts"].nan_to_num(1.0)
    return t, _metric("spd", d, g)


def _snapshot(t, *extra):
    return [v.clone() for v in (t["x"], t["y"], t["slots"], t["state_rows"], t["sums"], t["counts"], t["W"], t["b"],
                                *extra)]


def _assert_unchanged(t, snapshot, *extra, what=""):
    now = [t["x"], t["y"], t["slots"], t["state_rows"], t["sums"], t["counts"], t["W"], t["b"], *extra]
    for new, old in zip(now, snapshot):
        assert _same_bits(new, old), f"{what}: a tensor changed"


def test_bad_arguments_raise_value_error_and_change_nothing():
    g = torch.Generator().manual_seed(fresh_seed())
    t, metric = _small_call(g)
    S, C, d = t["W"].shape
    R = t["sums"].shape[0]
    dev = _device()
    good = dict(x=t["x"], y=t["y"], slots=t["slots"], state_rows=t["state_rows"], sums=t["sums"],
                counts=t["counts"], W=t["W"], b=t["b"], n_classes=t["n_classes"], metric=metric, scale=2.0)
    bad = {
        "metric [d, d+1]": ("metric", dict(metric=torch.eye(d, d + 1, device=dev))),
        "metric [d+1, d+1]": ("metric", dict(metric=torch.eye(d + 1, device=dev))),
        "metric [d]": ("metric", dict(metric=torch.ones(d, device=dev))),
        "float64 metric": ("metric", dict(metric=metric.double())),
        "bfloat16 metric": ("metric", dict(metric=metric.to(torch.bfloat16))),
        "sums [R, C+1, d]": ("sums", dict(sums=torch.zeros(R, C + 1, d, device=dev))),
        "sums [R, C, d+1]": ("sums", dict(sums=torch.zeros(R, C, d + 1, device=dev))),
        "float64 sums": ("sums", dict(sums=t["sums"].double())),
        "non-contiguous sums": ("sums", dict(sums=t["sums"].transpose(0, 1).contiguous().transpose(0, 1))),
        "counts [R+1, C]": ("counts", dict(counts=torch.zeros(R + 1, C, device=dev))),
        "counts [R, C-1]": ("counts", dict(counts=torch.zeros(R, C - 1, device=dev))),
        "int64 counts": ("counts", dict(counts=t["counts"].long())),
        "b [S, C+1]": ("b must", dict(b=torch.zeros(S, C + 1, device=dev))),
        "float64 W": ("W must", dict(W=t["W"].double())),
        "x of another width": ("d=", dict(x=torch.zeros(t["x"].shape[0], d + 1, device=dev))),
        "scale of S+1 entries": ("per-slot", dict(scale=torch.ones(S + 1, device=dev))),
        "float labels": ("y must", dict(y=t["y"].float())),
    }
    snapshot = _snapshot(t, metric)
    for what, (match, change) in bad.items():
        args = dict(good, **change)
        bad_before = {k: v.clone() for k, v in change.items()}
        with pytest.raises(ValueError, match=match):
            kernels.class_mean_head_step(*args.values())
        _assert_unchanged(t, snapshot, metric, what=what)
        for k, v in change.items():
            assert _same_bits(v, bad_before[k]), f"{what}: the bad {k} changed"
    with pytest.raises(ValueError, match="impl"):
        kernels.class_mean_head_step(*good.values(), impl="cuda")
    _assert_unchanged(t, snapshot, metric, what="bad impl")
    # The same call with good arguments does write (so the checks above stopped real writes).
    kernels.class_mean_head_step(*good.values())
    assert not _same_bits(t["W"], snapshot[6])


def test_a_batch_built_for_other_rows_is_rejected():
    g = torch.Generator().manual_seed(fresh_seed())
    t, metric = _small_call(g)
    snapshot = _snapshot(t)
    # Like every other op: a batch of another row count is a ValueError (a shorter one would
    # otherwise pool only its first rows, silently), anything else than a SlotBatch a TypeError.
    for other in (SlotBatch(torch.cat([t["slots"], t["slots"]])), SlotBatch(t["slots"][:3])):
        with pytest.raises(ValueError, match="batch"):
            _call(t, metric, 1.0, batch=other)
        _assert_unchanged(t, snapshot, what=f"batch of {other.size} rows")
    with pytest.raises(TypeError, match="SlotBatch"):
        _call(t, metric, 1.0, batch=t["slots"])
    _assert_unchanged(t, snapshot, what="batch that is no SlotBatch")


@pytest.fixture
def checks_on():
    dispatch.set_checks(True)
    try:
        yield
    finally:
        dispatch.set_checks(None)


def test_index_checks_raise_index_error_before_any_write(checks_on):
    g = torch.Generator().manual_seed(fresh_seed())
    C, d, R, dev = 5, 37, 4, _device()
    x = _randn(g, 6, d)
    slots = torch.tensor([0, 1, 2, 0, -1, 2], device=dev)
    y = torch.tensor([4, 2, 0, 1, 99, 3], device=dev)  # the skipped row's label and state row are garbage
    rows = torch.tensor([3, 0, 1, 3, 77, 1], device=dev)
    n_classes = torch.tensor([5, 3, 5], device=dev)
    sums, counts = _randn(g, R, C, d), torch.ones(R, C, device=dev)
    W, b = _randn(g, 3, C, d), _randn(g, 3, C)
    metric = _metric("spd", d, g)

    def replaced(t, i, v):
        t = t.clone()
        t[i] = v
        return t

    cases = {
        "slot past S": dict(slots=replaced(slots, 2, 3)),
        "slot below -1": dict(slots=replaced(slots, 2, -2)),
        "label of a narrower head": dict(y=replaced(y, 1, 3)),
        "label past C": dict(y=replaced(y, 0, 5)),
        "negative label": dict(y=replaced(y, 2, -1)),
        "state row past R": dict(rows=replaced(rows, 1, R)),
        "negative state row": dict(rows=replaced(rows, 2, -1)),
        "two state rows in one slot": dict(rows=replaced(rows, 3, 2)),
        "two slots share a state row": dict(rows=replaced(rows, 1, 3)),
    }
    before = [t.clone() for t in (sums, counts, W, b)]
    for what, c in cases.items():
        with pytest.raises(IndexError):
            kernels.class_mean_head_step(x, c.get("y", y), c.get("slots", slots), c.get("rows", rows), sums, counts,
                                         W, b, n_classes, metric, 1.0)
        for new, old in zip((sums, counts, W, b), before):
            assert _same_bits(new, old), f"bad {what}: state changed"
    # The valid call passes the checks (skipped rows' garbage is not checked) and writes.
    kernels.class_mean_head_step(x, y, slots, rows, sums, counts, W, b, n_classes, metric, 1.0)
    assert not _same_bits(W, before[2]) and not _same_bits(counts, before[1])
    assert counts.sum() == before[1].sum() + 5


# ---- calls without rows -------------------------------------------------------------------------


@pytest.mark.parametrize("impl", OP_IMPLS)
@pytest.mark.parametrize("rows", [0, 5])
def test_empty_call_changes_nothing(rows, impl):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t, metric = _small_call(g)
    dev = _device()
    t["x"] = _randn(g, rows, t["x"].shape[1])
    t["y"] = torch.zeros(rows, dtype=torch.int64, device=dev)
    t["slots"] = torch.full((rows,), -1, dtype=torch.int64, device=dev)
    t["state_rows"] = torch.zeros(rows, dtype=torch.int64, device=dev)
    snapshot = _snapshot(t, metric)
    _call(t, metric, 2.0, impl=impl)
    _assert_unchanged(t, snapshot, metric, what="empty call")
    _call(t, metric, torch.ones(3, device=dev), impl=impl, batch=SlotBatch(t["slots"]))
    _assert_unchanged(t, snapshot, metric, what="empty call with a batch")


def test_a_shared_slot_batch_gives_what_the_op_computes_alone():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    p = make_problem(C=13, d=37, seed=seed)
    metric = _metric("spd", 37, g)
    alone = _run(p, metric, p.per_slot)
    batch = SlotBatch(p.slots)
    head_forward(p.x, p.W.nan_to_num(), p.b.nan_to_num(), p.slots, p.n_classes, batch=batch)  # the round's forward
    shared = _run(p, metric, p.per_slot, batch=batch)
    for a, s, what in zip(alone, shared, ("sums", "counts", "W", "b")):
        if p.x.is_cuda:  # scatter-adds with atomics: the last bit may differ between runs
            assert_matches(s, a, TOLERANCE[torch.float32], what, seed)
        else:
            assert _same_bits(a, s), f"{what}: differs with a shared batch, seed={seed}"

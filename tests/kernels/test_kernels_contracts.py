"""Contracts of the GPU path that the per-op reference tests do not cover: the forward's logits
reused by the update ops, the online softmax over class blocks, debug index checks, no host
synchronisation inside a Triton op, and no silent implementation choice."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

import kernels
from kernels import SlotBatch, dispatch, reference
from tests.kernels.cases import IMPLS, TOLERANCE, assert_matches, make_problem

KERNELS_DIR = Path(kernels.__file__).resolve().parent


# ---- logits reuse ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["sgd", "entropy"])
def test_triton_updates_from_the_forwards_logits_equal_their_own_bit_for_bit(op):
    """The round's forward covers more rows than the update (predictions, other rules'
    sessions): a row's logits must not depend on them, so the update from those logits is the
    update the op makes on its own (which is also what a replay computes)."""
    p = make_problem(C=37, d=100, layout="mixed", B=14)
    y = p.y.long() if op == "sgd" else torch.where(torch.arange(p.y.numel(), device=p.y.device) % 2 == 0, -1, p.y.long())
    # The forward of a larger call: every row twice, plus rows of a slot the update never sees.
    extra_slot = torch.full((3,), p.W.shape[0] - 1, dtype=p.slots.dtype, device=p.slots.device)
    big_slots = torch.cat([p.slots, extra_slot, p.slots])
    big_x = torch.cat([p.x, p.x[:3], p.x])
    W_fwd = p.W.nan_to_num(0.5)  # the extra slot's head is read by the big forward
    logits_big = kernels.head_forward(big_x, W_fwd, p.b.nan_to_num(0.5), big_slots, p.n_classes, impl="triton")
    reused = logits_big[-p.x.shape[0]:].contiguous()
    alone = kernels.head_forward(p.x, W_fwd, p.b.nan_to_num(0.5), p.slots, p.n_classes, impl="triton")
    assert torch.equal(reused.nan_to_num(), alone.nan_to_num())

    W1, b1, W2, b2 = W_fwd.clone(), p.b.nan_to_num(0.5), W_fwd.clone(), p.b.nan_to_num(0.5)
    if op == "sgd":
        kernels.sgd_step(p.x, y, p.slots, W1, b1, p.n_classes, 0.4, 0.01, impl="triton", logits=reused)
        kernels.sgd_step(p.x, y, p.slots, W2, b2, p.n_classes, 0.4, 0.01, impl="triton")
    else:
        kernels.entropy_step(p.x, y, p.slots, W1, b1, p.n_classes, 0.4, 0.05, impl="triton", logits=reused)
        kernels.entropy_step(p.x, y, p.slots, W2, b2, p.n_classes, 0.4, 0.05, impl="triton")
    assert torch.equal(W1.nan_to_num(7.0), W2.nan_to_num(7.0)), f"seed={p.seed}"
    assert torch.equal(b1.nan_to_num(7.0), b2.nan_to_num(7.0)), f"seed={p.seed}"
    assert not torch.equal(W1, W_fwd), "the step changed nothing"


def test_torch_path_ignores_supplied_logits():
    """The torch path's values are a function of the update call's profile (the replay
    contract): logits handed in are not used, so not even garbage changes the result."""
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    W1, b1, W2, b2 = p.W.clone(), p.b.clone(), p.W.clone(), p.b.clone()
    garbage = torch.full((p.x.shape[0], 10), 123.0)
    kernels.sgd_step(p.x, p.y, p.slots, W1, b1, p.n_classes, 0.3, impl="torch", logits=garbage)
    kernels.sgd_step(p.x, p.y, p.slots, W2, b2, p.n_classes, 0.3, impl="torch")
    assert torch.equal(W1.nan_to_num(7.0), W2.nan_to_num(7.0)) and torch.equal(b1.nan_to_num(7.0), b2.nan_to_num(7.0))
    assert not dispatch.logits_reusable(torch.zeros(1, device="cpu"))  # CPU tensors: the executor passes none


def test_logits_must_have_the_calls_shape():
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    with pytest.raises(ValueError, match="logits"):
        kernels.sgd_step(p.x, p.y, p.slots, p.W, p.b, p.n_classes, 0.3, logits=torch.zeros(p.x.shape[0], 9))


# ---- online softmax over class blocks -------------------------------------------------------


@pytest.mark.parametrize("op", ["sgd", "entropy"])
def test_online_softmax_over_several_class_blocks_matches_the_reference(op, monkeypatch):
    """With blocks of 16 classes, 37 classes take three blocks (the C = 1000 situation on a GPU)."""
    from kernels.triton import sgd as triton_sgd

    monkeypatch.setattr(triton_sgd, "SOFTMAX_BLOCK_CAP", 16)
    assert triton_sgd.softmax_config(37)["BLOCK_C"] == 16
    p = make_problem(C=37, d=100, layout="mixed")
    W, b = 3.0 * p.W, p.b.clone()
    W_new, b_new = W.clone(), b.clone()
    if op == "sgd":
        kernels.sgd_step(p.x, p.y, p.slots, W_new, b_new, p.n_classes, p.per_slot, 0.01, impl="triton")
        W_ref, b_ref = reference.sgd_step_ref(p.x, p.y, p.slots, W, b, p.n_classes, p.per_slot, 0.01)
    else:
        y = p.y.clone()
        y[::2] = -1
        kernels.entropy_step(p.x, y, p.slots, W_new, b_new, p.n_classes, p.per_slot, 0.3, impl="triton")
        W_ref, b_ref = reference.entropy_step_ref(p.x, y, p.slots, W, b, p.n_classes, p.per_slot, 0.3)
    assert_matches(W_new, W_ref, TOLERANCE[torch.float32], "W", p.seed)
    assert_matches(b_new, b_ref, TOLERANCE[torch.float32], "b", p.seed)


# ---- index checks ---------------------------------------------------------------------------


def _two_prototype_sessions():
    """Two sessions, state rows 0 and 1, C = 4: a label of C + 1 in session 0 would address
    state row 1's class 1 if it were used as an offset."""
    C, d = 4, 16
    x = torch.randn(3, d)
    slots = torch.tensor([0, 0, 1])
    rows = torch.tensor([0, 0, 1])
    sums, counts, W = torch.randn(2, C, d), torch.ones(2, C), torch.zeros(2, C, d)
    return x, slots, rows, sums, counts, W, torch.tensor([C, C])


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_label_in_prototype_never_writes_into_another_sessions_sums(impl):
    x, slots, rows, sums, counts, W, n = _two_prototype_sessions()
    y = torch.tensor([1, 5, 2])  # 5 = C + 1: past session 0's width
    before = sums.clone(), counts.clone()
    kernels.prototype_step(x, y, slots, rows, sums, counts, W, n, 10.0, impl=impl)
    expected = before[0][1].clone()
    expected[2] += x[2]
    assert torch.equal(sums[1], expected), "session 1's sums were written by session 0's row"
    assert torch.equal(counts[1], before[1][1] + torch.tensor([0, 0, 1, 0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_index_checks_reject_bad_indices_before_any_write(impl):
    x, slots, rows, sums, counts, W, n = _two_prototype_sessions()
    before = [t.clone() for t in (sums, counts, W)]
    cases = {
        "label": dict(y=torch.tensor([1, 5, 2]), slots=slots, rows=rows),
        "label of a narrower head": dict(y=torch.tensor([1, 3, 2]), slots=slots, rows=rows, n=torch.tensor([3, 4])),
        "slot": dict(y=torch.tensor([1, 1, 2]), slots=torch.tensor([0, 2, 1]), rows=rows),
        "state row": dict(y=torch.tensor([1, 1, 2]), slots=slots, rows=torch.tensor([0, 0, 7])),
        "two state rows in one slot": dict(y=torch.tensor([1, 1, 2]), slots=slots, rows=torch.tensor([0, 1, 1])),
    }
    dispatch.set_checks(True)
    try:
        for what, c in cases.items():
            with pytest.raises(IndexError):
                kernels.prototype_step(x, c["y"], c["slots"], c["rows"], sums, counts, W, c.get("n", n), 10.0,
                                       impl=impl)
            for new, old in zip((sums, counts, W), before):
                assert torch.equal(new, old), f"bad {what}: state changed"
        with pytest.raises(IndexError):
            kernels.sgd_step(x, torch.tensor([0, 9, 0]), slots, W, torch.zeros(2, 4), n, 0.1, impl=impl)
        with pytest.raises(IndexError):
            kernels.head_forward(x, W, torch.zeros(2, 4), torch.tensor([0, 3, -1]), n, impl=impl)
        kernels.prototype_step(x, torch.tensor([1, 1, 2]), slots, rows, sums, counts, W, n, 10.0, impl=impl)
    finally:
        dispatch.set_checks(None)
    assert not dispatch.checks_enabled()


@pytest.mark.parametrize("launcher", ["prototype", "support", "forward", "sgd"])
def test_in_kernel_checks_skip_and_report_out_of_range_rows(launcher):
    """The Triton kernels' own bounds checks (the launchers called directly, past the ops'
    checks): a row with an out-of-range index writes nothing and the call raises."""
    from kernels.dispatch import per_slot
    from kernels.triton.forward import head_forward_triton
    from kernels.triton.prototype import prototype_step_triton
    from kernels.triton.sgd import sgd_step_triton
    from kernels.triton.support import support_step_triton

    x, slots, rows, sums, counts, W, n = _two_prototype_sessions()
    T = per_slot(10.0, 2, x.device)
    if launcher == "prototype":
        bad_rows = torch.tensor([0, 0, 9])  # session 1's row names state row 9 of 2
        with pytest.raises(IndexError, match="1 row"):
            prototype_step_triton(x, torch.tensor([1, 1, 2]), slots, bad_rows, sums, counts, W, n, T, checks=True)
        assert torch.equal(W[1], torch.zeros_like(W[1])) and not torch.equal(W[0], torch.zeros_like(W[0]))
    elif launcher == "support":
        K = 2
        sup, prio = torch.zeros(2, 4, K, 16), torch.full((2, 4, K), float("inf"))
        with pytest.raises(IndexError):
            support_step_triton(x, torch.tensor([1, 7, 2]), torch.zeros(3), slots, rows, sup, prio, W, n,
                                per_slot(2.0, 2, x.device), T, checks=True)
        assert torch.isinf(prio[0, 3]).all() and int(torch.isfinite(prio).sum()) == 2  # rows 0 and 2 only
    elif launcher == "forward":
        out = torch.full((3, 4), float("nan"))
        with pytest.raises(IndexError):
            head_forward_triton(x, W, torch.zeros(2, 4), torch.tensor([0, 5, 1]), n, out=out, checks=True)
        assert torch.equal(out[1], torch.zeros(4)) and not out.isnan().any()
    else:
        W0 = torch.randn(2, 4, 16)
        W1, b1 = W0.clone(), torch.zeros(2, 4)
        # With logits given, the apply stage meets the bad slot (else the forward reports it first).
        with pytest.raises(IndexError):
            sgd_step_triton(x, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 4]), W1, b1, n,
                            per_slot(0.5, 2, x.device), per_slot(0.0, 2, x.device), checks=True,
                            logits=torch.zeros(3, 4))
        assert torch.equal(W1[1], W0[1]) and not torch.equal(W1[0], W0[0])
        W2 = W0.clone()
        with pytest.raises(IndexError):
            sgd_step_triton(x, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 4]), W2, torch.zeros(2, 4), n,
                            per_slot(0.5, 2, x.device), per_slot(0.0, 2, x.device), checks=True)
        assert torch.equal(W2, W0)  # the forward's check stops the call before any write


def test_check_indices_accepts_valid_calls():
    slots = torch.tensor([2, -1, 0, 2])
    dispatch.check_indices("op", slots, 3, y=torch.tensor([1, 7, 0, -1]), n_classes=torch.tensor([2, 2, 2]),
                           unlabelled_ok=True, state_rows=torch.tensor([4, 9, 0, 4]), num_state_rows=5)
    with pytest.raises(IndexError, match="two slots"):
        dispatch.check_indices("op", slots, 3, state_rows=torch.tensor([4, 9, 4, 4]), num_state_rows=5)


# ---- no host synchronisation in a Triton op -------------------------------------------------

SYNCING = {
    torch.Tensor: ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique"),
    torch: ("nonzero", "unique", "unique_consecutive", "bincount", "masked_select"),
}


@pytest.fixture
def no_host_reads_from_kernels(monkeypatch):
    """Make every call that reads a tensor back to the host (or sizes an output by its values)
    fail when it is made from a kernels/ source file other than the torch path."""
    allowed = {KERNELS_DIR / "torch_ops.py", KERNELS_DIR / "reference.py"}

    def guard(owner, name, original):
        def wrapper(*args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if caller.is_relative_to(KERNELS_DIR) and caller not in allowed:
                raise AssertionError(f"{name} called from {caller.relative_to(KERNELS_DIR)}: a host synchronisation")
            return original(*args, **kwargs)
        return wrapper

    for owner, names in SYNCING.items():
        for name in names:
            monkeypatch.setattr(owner, name, guard(owner, name, getattr(owner, name)))


@pytest.mark.parametrize("op", ["head_forward", "sgd", "entropy", "delta", "prototype", "support", "rls"])
def test_triton_ops_never_read_back_to_the_host(op, no_host_reads_from_kernels):
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    batch = SlotBatch(p.slots)
    W, b, P = p.W.clone(), p.b.clone(), p.P.clone()
    if op == "head_forward":
        kernels.head_forward(p.x, W, b, p.slots, p.n_classes, impl="triton", batch=batch)
    elif op == "sgd":
        kernels.sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.3, 0.01, impl="triton", batch=batch)
    elif op == "entropy":
        kernels.entropy_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.3, 0.1, impl="triton", batch=batch)
    elif op == "delta":
        kernels.delta_step(p.x, p.y, p.slots, W, p.n_classes, 0.5, impl="triton", batch=batch)
    elif op == "prototype":
        kernels.prototype_step(p.x, p.y, p.slots, p.state_rows, p.sums.clone(), p.counts.clone(), W, p.n_classes,
                               5.0, impl="triton", batch=batch)
    elif op == "support":
        R, C, d = p.sums.shape
        kernels.support_step(p.x, p.y, torch.rand(p.x.shape[0]), p.slots, p.state_rows, torch.zeros(R, C, 3, d),
                             torch.full((R, C, 3), float("inf")), W, p.n_classes, 3.0, 5.0, impl="triton")
    else:
        with torch.device("cpu"):
            host = SlotBatch.from_list(p.slots.tolist(), device=p.slots.device)
        kernels.rls_step(p.x, p.y, p.slots, p.state_rows, W, P, p.n_classes, impl="triton", batch=host)
    assert not torch.equal(W, p.W) or op == "head_forward"


def test_the_guard_catches_a_synchronisation(no_host_reads_from_kernels):
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    with pytest.raises(AssertionError, match="host synchronisation"):
        SlotBatch(p.slots).counts_list  # noqa: B018 - the torch view's host list: a read-back


# ---- no silent paths ------------------------------------------------------------------------


def test_implementations_say_what_runs_where(monkeypatch):
    assert set(dispatch.implementations("cpu").values()) == {"torch"}
    assert dispatch.describe_implementations("cpu") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert set(dispatch.implementations("cuda").values()) == {"triton"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert set(dispatch.implementations("cuda").values()) == {"triton-interpreter"}
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.describe_implementations("cuda:0") == "torch-fallback"
    assert set(dispatch.implementations("cuda")) == set(dispatch.OPS)


def test_cuda_tensors_on_a_fallback_path_log_a_warning_once(monkeypatch, caplog):
    cuda_like = types.SimpleNamespace(is_cuda=True)  # only .is_cuda is read: no GPU needed
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="fwserve.kernels"):
        assert dispatch.resolve_impl("auto", cuda_like, "sgd_step") == "torch"
        assert dispatch.resolve_impl("auto", cuda_like, "sgd_step") == "torch"
    assert [r.getMessage() for r in caplog.records].count(
        "sgd_step: CUDA tensors on the batched torch path: triton is not importable") == 1
    caplog.clear()
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with caplog.at_level(logging.WARNING, logger="fwserve.kernels"):
        assert dispatch.resolve_impl("auto", cuda_like, "head_forward") == "triton"
    assert any("interpreter" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fwserve.kernels"):
        dispatch.resolve_impl("auto", torch.zeros(1, device="cpu"), "head_forward")  # CPU: the torch path is the plan
    assert not caplog.records

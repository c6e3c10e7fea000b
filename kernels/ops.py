"""The public head ops: argument checks, implementation choice, then the torch or Triton path.

Layout (see docs/ARCHITECTURE.md, "kernels"): heads are stacked by slot, W [S, C, d] and
b [S, C] float32; n_classes [S] masks classes c >= n_classes[s]. A batch is x [B, d] (float32 or
bfloat16; computed in float32), slots [B] (-1: the row is skipped) and y [B] labels with
0 <= y < n_classes[slot]. Rule state that not every slot has (P, prototype sums) lives in its own
pool addressed per row by state_rows [B]; all rows of one slot must carry the same state row and
different slots different state rows. Hyper-parameters are floats or float32 tensors [S].
Sessions never interfere: a call changes only the slots (and state rows) its rows name, and only
their live classes.

impl: "auto" (Triton for CUDA tensors, torch for CPU tensors), "torch" or "triton". The torch
path lives in kernels/torch_ops.py, the Triton launchers in kernels/triton/ (imported on first
use, so Triton may be absent).

batch: an optional kernels.SlotBatch built from this call's slots. Ops called on the same rows
(e.g. head_forward then entropy_step) can share one, so the rows are grouped by slot once;
without it each op builds its own. Only its length and device are checked against slots.
On the torch path the values an op writes for one slot also depend on the call's profile
(its per-slot row counts); see kernels/slot_batch.py for that contract and replay_slots.

Heads W (and b) may be float32 or bfloat16 (bf16 storage): every op computes in float32 and
rounds once per stored value. State pools (P, sums, supports) are float32.

logits (sgd_step, entropy_step): optional float32 [B, C], head_forward's output for exactly
these rows and heads before the update (the round's forward that answered the predictions).
The Triton path uses them instead of reading the heads a second time; the torch path always
computes its own (its logits depend on the call's profile, which a replay reproduces for the
update call, not for the forward), so passing them never changes torch-path values.
kernels.dispatch.logits_reusable(x) says whether they would be used.

Index checks: with kernels.dispatch.checks_enabled() (FWSERVE_KERNEL_CHECKS=1) every op
validates slots, labels and state rows first and raises IndexError, changing nothing.
"""

from __future__ import annotations

import importlib

import torch

from . import torch_ops
from .dispatch import (check_batch, check_bias, check_indices, check_logits, check_state, checks_enabled, per_slot,
                       resolve_impl)
from .slot_batch import SlotBatch

__all__ = ["head_forward", "sgd_step", "delta_step", "prototype_step", "rls_step", "support_step", "entropy_step"]


def _triton(module: str):
    """The Triton launcher module kernels/triton/<module>.py, imported on first use."""
    return importlib.import_module(f"{__package__}.triton.{module}")


def _batch_for(slots: torch.Tensor, batch: SlotBatch | None) -> SlotBatch:
    if batch is None:
        return SlotBatch(slots)
    if not isinstance(batch, SlotBatch):
        raise TypeError(f"batch must be a kernels.SlotBatch, got {type(batch).__name__}")
    return batch.check_for(slots)


def head_forward(x, W, b, slots, n_classes, normalize=None, impl="auto", *,
                 batch: SlotBatch | None = None) -> torch.Tensor:
    """Grouped head forward (BGMV): every row is scored by its own slot's head.

        logits[i, c] = W[s_i, c] . u_i + b[s_i, c]     c <  n_classes[s_i]
                     = -inf                            c >= n_classes[s_i]
        logits[i, :] = 0                               s_i = -1
        u_i = x_i / max(||x_i||, 1e-12) if normalize[s_i] else x_i

    normalize: optional bool [S]; True for cosine heads (prototype sessions).
    Any number of rows may share a slot. Returns float32 [B, C]. The Triton forward reads each
    head once per tile of up to 16 rows of that slot (SGMV); a row's logits never depend on
    the other rows of the call (see kernels/triton/forward.py).
    """
    check_batch(x, slots, W)
    S, C, _ = W.shape
    check_bias(b, (S, C))
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("head_forward", slots, S)
    if resolve_impl(impl, x, "head_forward") == "triton":
        return _triton("forward").head_forward_triton(x, W, b, slots, n_classes, normalize, batch=batch, checks=checks)
    return torch_ops.head_forward_torch(x, W, b, slots, n_classes, normalize, batch=batch)


def sgd_step(x, y, slots, W, b, n_classes, lr, weight_decay=0.0, impl="auto", *,
             batch: SlotBatch | None = None, logits: torch.Tensor | None = None,
             feature_rates: torch.Tensor | None = None, bias_rate: float | torch.Tensor | None = None) -> None:
    """One SGD step on softmax cross-entropy, in place; the mean over each slot's rows.

    For every slot s with rows R_s (n_s = |R_s| > 0), all rows seeing the heads as they were
    before the call (mini-batch semantics):
        p_i  = softmax over live classes of (W_s x_i + b_s)
        G_W  = sum_{i in R_s} (p_i - onehot(y_i)) x_i^T / n_s
        G_b  = sum_{i in R_s} (p_i - onehot(y_i))       / n_s
        W_s <- W_s - lr_s * (G_W * r[None, :] + weight_decay_s * W_s)   (the decay is not scaled by r)
        b_s <- b_s - lr_s * rho * G_b                                   (the bias is not decayed)
    r = feature_rates: optional float32 [d] on W's device, default all ones; rho = bias_rate:
    optional float or float32 tensor [1] on W's device, default 1. A Meta-SGD step: a learned
    rate per feature, shared by all sessions of a rule, times the per-slot lr. r = ones and
    rho = 1 give the plain step (bit for bit on the torch path); None for both runs the plain
    step's code with no extra work.
    Masked classes get no gradient and no decay; slots without rows are untouched.
    logits: see the module docstring (used by the Triton path only).
    """
    check_batch(x, slots, W, y)
    S, C, d = W.shape
    check_bias(b, (S, C))
    check_logits(logits, x.shape[0], C)
    if feature_rates is not None:
        if (not isinstance(feature_rates, torch.Tensor) or feature_rates.dtype != torch.float32
                or feature_rates.dim() != 1 or feature_rates.shape[0] != d or feature_rates.device != W.device):
            got = (f"{tuple(feature_rates.shape)} {feature_rates.dtype} on {feature_rates.device}"
                   if isinstance(feature_rates, torch.Tensor) else type(feature_rates).__name__)
            raise ValueError(f"feature_rates must be a float32 [d]={d} tensor on {W.device}, got {got}")
    if bias_rate is not None:
        if isinstance(bias_rate, torch.Tensor):
            if (bias_rate.dtype != torch.float32 or bias_rate.numel() != 1 or bias_rate.dim() > 1
                    or bias_rate.device != W.device):
                raise ValueError(f"bias_rate must be a float or a float32 tensor [1] on {W.device}, got "
                                 f"{tuple(bias_rate.shape)} {bias_rate.dtype} on {bias_rate.device}")
        elif isinstance(bias_rate, (int, float)) and not isinstance(bias_rate, bool):
            bias_rate = float(bias_rate)
        else:
            raise ValueError(f"bias_rate must be a float or a float32 tensor [1], got {type(bias_rate).__name__}")
    lr, weight_decay = per_slot(lr, S, W.device), per_slot(weight_decay, S, W.device)
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("sgd_step", slots, S, y=y, n_classes=n_classes)
    if resolve_impl(impl, x, "sgd_step") == "triton":
        if bias_rate is not None:  # the kernel reads rho through a pointer: a float becomes a tensor once, here
            bias_rate = (bias_rate.reshape(1) if isinstance(bias_rate, torch.Tensor)
                         else torch.full((1,), bias_rate, dtype=torch.float32, device=W.device))
        _triton("sgd").sgd_step_triton(x, y, slots, W, b, n_classes, lr, weight_decay, batch=batch, logits=logits,
                                       checks=checks, feature_rates=feature_rates, bias_rate=bias_rate)
    else:
        torch_ops.sgd_step_torch(x, y, slots, W, b, n_classes, lr, weight_decay, batch=batch,
                                 feature_rates=feature_rates, bias_rate=bias_rate)


def delta_step(x, y, slots, W, n_classes, beta, impl="auto", *, batch: SlotBatch | None = None) -> None:
    """Delta rule (LMS) on unit-norm keys, in place; a slot's rows applied in arrival order.

    For every row i of slot s, in order (each row sees the previous rows' updates):
        k = x_i / max(||x_i||, 1e-12)
        W_s[:n] <- W_s[:n] + beta_s * (onehot(y_i) - W_s[:n] k) k^T        n = n_classes[s]
    No bias. The torch path loops over the position within a slot (at most the largest number
    of rows one slot has in the batch), vectorised across slots.
    """
    check_batch(x, slots, W, y)
    beta = per_slot(beta, W.shape[0], W.device)
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("delta_step", slots, W.shape[0], y=y, n_classes=n_classes)
    if resolve_impl(impl, x, "delta_step") == "triton":
        _triton("delta").delta_step_triton(x, y, slots, W, n_classes, beta, batch=batch, checks=checks)
    else:
        torch_ops.delta_step_torch(x, y, slots, W, n_classes, beta, batch=batch)


def prototype_step(x, y, slots, state_rows, sums, counts, W, n_classes, temperature, impl="auto", *,
                   batch: SlotBatch | None = None) -> None:
    """Class prototypes (cosine nearest class mean), in place.

    For every row i (slot s_i, state row r_i = state_rows[i]):
        sums[r_i, y_i] += x_i;  counts[r_i, y_i] += 1
    then, for every (slot s, class c) that received rows in the call (state row r), c live:
        W[s, c] = temperature_s * m_c / max(||m_c||, 1e-12),  m_c = sums[r, c] / counts[r, c]
    Classes without rows keep their weights (a head built by this op alone is 0 for classes
    never seen), so a call costs O(rows x d) whatever the class count.
    sums [R, C, d], counts [R, C] float32. The bias is not touched (the server keeps it 0).
    head_forward(..., normalize=True for these slots) then gives temperature * cosine.
    """
    check_batch(x, slots, W, y)
    C, d = W.shape[1:]
    check_state("sums", sums, (sums.shape[0], C, d))
    check_state("counts", counts, (sums.shape[0], C))
    temperature = per_slot(temperature, W.shape[0], W.device)
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("prototype_step", slots, W.shape[0], y=y, n_classes=n_classes, state_rows=state_rows,
                      num_state_rows=sums.shape[0])
    if resolve_impl(impl, x, "prototype_step") == "triton":
        _triton("prototype").prototype_step_triton(
            x, y, slots, state_rows, sums, counts, W, n_classes, temperature, batch=batch, checks=checks)
    else:
        torch_ops.prototype_step_torch(x, y, slots, state_rows, sums, counts, W, n_classes, temperature,
                                       batch=batch)


def rls_step(x, y, slots, state_rows, W, P, n_classes, impl="auto", *, batch: SlotBatch | None = None) -> None:
    """Recursive least squares (ridge onto one-hot targets), in place; rows in arrival order.

    For every row i of slot s (state row r), in order, with P = P[r] [d, d]:
        k = P x_i
        g = k / (1 + x_i^T k)                                  (Sherman-Morrison gain)
        W_s[:n] <- W_s[:n] + (onehot(y_i) - W_s[:n] x_i) g^T      n = n_classes[s]
        P <- P - k k^T / (1 + x_i^T k)                         (symmetric form of P - g k^T)
    The caller initialises P[r] = I / lambda; after rows X [N, d] with one-hot targets Y this is
    P = (X^T X + lambda I)^-1 and W_s = Y^T X P, the closed-form ridge solution. No bias.
    The torch path loops over the position within a slot, vectorised across slots.
    """
    check_batch(x, slots, W, y)
    d = W.shape[2]
    check_state("P", P, (P.shape[0], d, d))
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("rls_step", slots, W.shape[0], y=y, n_classes=n_classes, state_rows=state_rows,
                      num_state_rows=P.shape[0])
    if resolve_impl(impl, x, "rls_step") == "triton":
        _triton("rls").rls_step_triton(x, y, slots, state_rows, W, P, n_classes, batch=batch, checks=checks)
    else:
        torch_ops.rls_step_torch(x, y, slots, state_rows, W, P, n_classes, batch=batch)


def support_step(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                 temperature, impl="auto", *, batch: SlotBatch | None = None) -> None:
    """Capped per-class supports (T3A-style) and their cosine head, in place.

    supports [R, C, K, d] (unit rows) and support_priority [R, C, K] (lower is better; +inf =
    empty) are a state pool. y [B] is each row's class (a pseudo-label or a label), priority [B]
    float32 its priority (an entropy; labelled rows get a lower one). k_s = min(int(capacity_s), K).
    For every row i of slot s (state row r, class c = y_i), in arrival order:
        j = first index of max(support_priority[r, c, :k_s])
        if priority_i < support_priority[r, c, j]:
            supports[r, c, j] = x_i / max(||x_i||, 1e-12);  support_priority[r, c, j] = priority_i
    then, for every (slot s, class c) that received rows in the call, c live:
        W[s, c] = temperature_s * m / max(||m||, 1e-12),  m = sum of its kept supports (0 if none)
    Other classes, masked classes and the bias are not touched. Rows the caller filtered out
    carry slot -1.
    head_forward(..., normalize=True) then gives temperature * cosine to the support means.
    """
    check_batch(x, slots, W, y)
    S, C, d = W.shape
    R, K = supports.shape[0], supports.shape[2]
    check_state("supports", supports, (R, C, K, d))
    check_state("support_priority", support_priority, (R, C, K))
    if priority.shape != (x.shape[0],):
        raise ValueError(f"priority must be [B]={x.shape[0]}, got {tuple(priority.shape)}")
    capacity, temperature = per_slot(capacity, S, W.device), per_slot(temperature, S, W.device)
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("support_step", slots, S, y=y, n_classes=n_classes, state_rows=state_rows, num_state_rows=R)
    if resolve_impl(impl, x, "support_step") == "triton":
        _triton("support").support_step_triton(x, y, priority, slots, state_rows, supports, support_priority, W,
                                               n_classes, capacity, temperature, batch=batch, checks=checks)
    else:
        torch_ops.support_step_torch(x, y, priority, slots, state_rows, supports, support_priority, W,
                                     n_classes, capacity, temperature, batch=batch)


def entropy_step(x, y, slots, W, b, n_classes, lr, min_confidence, impl="auto", *,
                 batch: SlotBatch | None = None, logits: torch.Tensor | None = None) -> None:
    """One entropy-minimisation step on the head (TENT, head only), in place; mean per slot.

    y [B]: a label, or -1 for an unlabelled row. For every slot s, all rows seeing the heads as
    they were before the call, p_i = softmax over live classes of (W_s x_i + b_s):
        labelled row:                          g_i = p_i - onehot(y_i)          (cross-entropy)
        unlabelled, max p_i >= min_confidence_s: g_i = -p_i * (log p_i + H(p_i)) (entropy H)
        otherwise the row does not count
        W_s <- W_s - lr_s * sum_i g_i x_i^T / m_s,  b_s <- b_s - lr_s * sum_i g_i / m_s
    with m_s the slot's rows that count (a slot with none is untouched). Masked classes are
    never updated. logits: see the module docstring (used by the Triton path only).
    """
    check_batch(x, slots, W, y)
    S, C, _ = W.shape
    check_bias(b, (S, C))
    check_logits(logits, x.shape[0], C)
    lr, min_confidence = per_slot(lr, S, W.device), per_slot(min_confidence, S, W.device)
    batch = _batch_for(slots, batch)
    checks = checks_enabled()
    if checks:
        check_indices("entropy_step", slots, S, y=y, n_classes=n_classes, unlabelled_ok=True)
    if resolve_impl(impl, x, "entropy_step") == "triton":
        _triton("entropy").entropy_step_triton(x, y, slots, W, b, n_classes, lr, min_confidence, batch=batch,
                                               logits=logits, checks=checks)
    else:
        torch_ops.entropy_step_torch(x, y, slots, W, b, n_classes, lr, min_confidence, batch=batch)

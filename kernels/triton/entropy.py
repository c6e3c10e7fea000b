"""Triton entropy-minimisation step on the head (TENT on a session's head only): entropy gradient
for confident unlabelled rows, cross-entropy gradient for labelled rows, mini-batch mean per slot
over the rows that count.

Like kernels/triton/sgd.py, from the call's logits (the caller's, or the forward's):
  1. one program per row, online over class blocks: max and sum of exp (pass 1), the entropy H
     (pass 2), then the row's logit gradient and whether it counts (pass 3); only logits are
     read, so any class count works;
  2. sgd's apply stage with the counting flags: each work item divides by its slot's number
     of counting rows (summed from the flags in the same pass), so no per-slot count is built
     on the side and no host synchronisation happens.
Math: kernels.ops.entropy_step, kernels.reference.entropy_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import checks_on, contiguous_rows, index_vector, slot_batch
from .forward import head_forward_triton
from .sgd import launch_grad_apply, softmax_config


@triton.jit
def _entropy_grad_kernel(
    logits_ptr, y_ptr, slots_ptr, n_classes_ptr, conf_ptr, grad_ptr, flags_ptr,
    num_slots, num_classes,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * num_classes
    grad_row = grad_ptr + row * num_classes
    slot = tl.load(slots_ptr + row)
    if (slot < 0) | (slot >= num_slots):  # no session (out-of-range slots are reported by stage 2)
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            tl.store(grad_row + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=offs_c < num_classes)
        tl.store(flags_ptr + row, 0.0)
    else:
        n = tl.load(n_classes_ptr + slot)
        m = -float("inf")
        total = 0.0
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(base + offs_c, mask=offs_c < n, other=-float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            total = total * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), axis=0)
            m = m_new
        log_total = tl.log(total)
        # H = -sum p log p over the live classes.
        H = 0.0
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            live = offs_c < n
            z = tl.load(base + offs_c, mask=live, other=0.0)
            logp = z - m - log_total
            H -= tl.sum(tl.where(live, tl.exp(logp) * logp, 0.0), axis=0)
        label = tl.load(y_ptr + row)
        labelled = label >= 0
        confident = 1.0 / total >= tl.load(conf_ptr + slot)  # max p = exp(m - m) / total
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            live = offs_c < n
            z = tl.load(base + offs_c, mask=live, other=0.0)
            logp = z - m - log_total
            p = tl.exp(logp)
            g_ce = p - tl.where(offs_c == label, 1.0, 0.0)
            g_entropy = -p * (logp + H)
            grad = tl.where(live, tl.where(labelled, g_ce, tl.where(confident, g_entropy, 0.0)), 0.0)
            tl.store(grad_row + offs_c, grad, mask=offs_c < num_classes)
        tl.store(flags_ptr + row, tl.where(labelled | confident, 1.0, 0.0))


def entropy_step_triton(x, y, slots, W, b, n_classes, lr, min_confidence, grad_logits=None, batch=None, logits=None,
                        checks=None) -> None:
    """Launcher; lr and min_confidence are float32 [S]. `logits`: the call's head_forward logits
    (computed here when absent). `grad_logits` (float32 [B, C]) lets tests hand in a poisoned
    scratch buffer: stage 1 writes every element of it."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    checks = checks_on(checks)
    x, slots, y, n_classes = contiguous_rows(x), index_vector(slots), index_vector(y), index_vector(n_classes)
    batch = slot_batch(slots, batch)
    if logits is None:
        logits = head_forward_triton(x, W, b, slots, n_classes, batch=batch, checks=checks)
    if grad_logits is None:
        grad_logits = torch.empty((B, C), dtype=torch.float32, device=x.device)
    flags = torch.empty(B, dtype=torch.float32, device=x.device)
    _entropy_grad_kernel[(B,)](logits.contiguous(), y, slots, n_classes, min_confidence, grad_logits, flags, S, C,
                               **softmax_config(C))
    launch_grad_apply(x, grad_logits, flags, W, b, n_classes, lr, None, batch, checks, "entropy_step")

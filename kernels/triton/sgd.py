"""Triton SGD cross-entropy step for many sessions' heads, mini-batch mean per slot.

Three stages, none of which reads a head more than its stage needs:
  0. the logits: the caller's (kernels.ops.sgd_step's `logits=`, the round's forward that also
     answered the predictions) or kernels/triton/forward.py's; the one read of the heads
     before the update;
  1. one program per row: an online softmax over blocks of BLOCK_C classes (running max and
     sum, then a second pass over the row's logits) and `p - onehot(y)` -> grad_logits [B, C].
     Only logits are read, so any class count works without holding a class range in
     registers;
  2. a persistent grid over (slot, class block, feature block) work items: sums
     grad_logits^T x over the slot's rows with tl.dot, divides by the slot's row count and
     applies W -= lr * (G + wd * W), b -= lr * sum(grad_logits) / n: the one read and the
     one write of each touched head block.
     Per-feature rates (Meta-SGD, HAS_RATES): W -= lr * (G * r[None, :] + wd * W) and
     b -= lr * rho * G_b. r [d] and rho [1] are float32 device tensors shared by every slot;
     a work item loads its BLOCK_D entries of r once, after the row loop, so the rows'
     tl.dot is the same as without rates. Without them the kernel is compiled without the
     loads (a constexpr flag), so the plain step costs nothing extra.
Every row's logits are the heads as they were before the call: mini-batch semantics.
Heads may be bf16: the update is computed in fp32 and rounded once on store.
Math: kernels.ops.sgd_step, kernels.reference.sgd_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (block_size, checks_on, contiguous_rows, error_counter, index_vector, num_programs,
                     out_of_range, raise_if_flagged, slot_batch)
from .forward import head_forward_triton

ROWS_PER_DOT = 16  # rows summed per tl.dot in stage 2 (tl.dot needs every dimension >= 16)
SOFTMAX_BLOCK_CAP = 512  # classes per block of the online softmax
NUM_WARPS = 4
# 4096 gradients per program on 8 warps: no stack or spills on sm_80 or sm_90 for any dtype (smaller
# tiles spill a few bytes on sm_80; loadtests/aot_check.py). ~175 registers: one such program per SM.
APPLY_WARPS = 8
APPLY_TILE = 4096


def softmax_config(num_classes: int) -> dict:
    return dict(BLOCK_C=block_size(num_classes, cap=SOFTMAX_BLOCK_CAP), num_warps=NUM_WARPS)


def apply_config(num_classes: int, d: int) -> dict:
    """A [BLOCK_C, BLOCK_D] tile of APPLY_TILE fp32 gradients plus the weights per program."""
    block_c = block_size(num_classes, cap=64)
    block_d = block_size(d, cap=max(16, APPLY_TILE // block_c))
    return dict(BLOCK_R=ROWS_PER_DOT, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=APPLY_WARPS)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, y_ptr, slots_ptr, grad_ptr,
    num_classes,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * num_classes
    grad_row = grad_ptr + row * num_classes
    if tl.load(slots_ptr + row) < 0:
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            tl.store(grad_row + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=offs_c < num_classes)
    else:
        # Online softmax: running max and sum of exp over class blocks (masked classes are -inf).
        m = -float("inf")
        total = 0.0
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(base + offs_c, mask=offs_c < num_classes, other=-float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - -inf before any live class
            total = total * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), axis=0)
            m = m_new
        inv_total = tl.where(total > 0, 1.0 / total, 0.0)
        label = tl.load(y_ptr + row)
        for c0 in range(0, num_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < num_classes
            z = tl.load(base + offs_c, mask=in_c, other=-float("inf"))
            p = tl.exp(z - m) * inv_total
            grad = tl.where(z > -float("inf"), p - tl.where(offs_c == label, 1.0, 0.0), 0.0)
            tl.store(grad_row + offs_c, grad, mask=in_c)


@triton.jit
def _grad_apply_kernel(
    x_ptr, grad_ptr, flags_ptr, W_ptr, b_ptr, order_ptr, sorted_slots_ptr, seg_end_ptr, segs_ptr, num_segs_ptr,
    n_classes_ptr, lr_ptr, wd_ptr, rates_ptr, bias_rate_ptr, err_ptr,
    num_slots, num_classes, d, num_programs,
    HAS_FLAGS: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_RATES: tl.constexpr, CHECKS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """W_s -= lr_s (sum_i g_i x_i^T / m_s + wd_s W_s), b_s -= lr_s sum_i g_i / m_s, per work
    item (slot, class block, feature block); m_s = the slot's rows, or (HAS_FLAGS) the rows
    whose flag is 1 (entropy_step: the rows that count; a slot with none is left as it is).
    HAS_RATES: the gradient's column j is scaled by r[j] (rates_ptr, [d]) and the bias step by
    rho (bias_rate_ptr, [1]); the decay is not scaled."""
    class_blocks = tl.cdiv(num_classes, BLOCK_C)
    feature_blocks = tl.cdiv(d, BLOCK_D)
    tiles = class_blocks * feature_blocks
    total = tl.load(num_segs_ptr) * tiles
    for item in range(tl.program_id(0), total, num_programs):
        start = tl.load(segs_ptr + item // tiles)
        tile = item % tiles
        slot = tl.load(sorted_slots_ptr + start)
        skip = (slot < 0) | out_of_range(err_ptr, slot, -1, num_slots, CHECKS)
        if not skip:
            end = tl.load(seg_end_ptr + start)
            offs_c = (tile // feature_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
            offs_d = (tile % feature_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
            in_c = offs_c < num_classes
            in_d = offs_d < d
            live = offs_c < tl.load(n_classes_ptr + slot)

            grad_W = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
            grad_b = tl.zeros([BLOCK_C], dtype=tl.float32)
            counted = 0.0
            for r0 in range(start, end, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                in_r = offs_r < end
                rows = tl.load(order_ptr + offs_r, mask=in_r, other=0)
                g = tl.load(grad_ptr + rows[:, None] * num_classes + offs_c[None, :],
                            mask=in_r[:, None] & in_c[None, :], other=0.0)  # [BLOCK_R, BLOCK_C]
                xv = tl.load(x_ptr + rows[:, None] * d + offs_d[None, :],
                             mask=in_r[:, None] & in_d[None, :], other=0.0).to(tl.float32)
                # ieee: TF32 would cost ~3 decimal digits in the update for no gain (memory-bound op).
                grad_W = tl.dot(tl.trans(g), xv, grad_W, input_precision="ieee")
                grad_b += tl.sum(g, axis=0)
                if HAS_FLAGS:
                    counted += tl.sum(tl.load(flags_ptr + rows, mask=in_r, other=0.0), axis=0)
            if not HAS_FLAGS:
                counted = (end - start).to(tl.float32)
            if counted > 0:
                step = tl.load(lr_ptr + slot) / counted
                if HAS_RATES:
                    # Scaling the summed tile (not every row) is one multiply per weight. Lanes past
                    # d are never stored; other=0 keeps them 0 like the masked x they summed.
                    grad_W = grad_W * tl.load(rates_ptr + offs_d, mask=in_d, other=0.0)[None, :]
                tile_mask = live[:, None] & in_d[None, :]
                w_ptrs = W_ptr + slot * num_classes * d + offs_c[:, None] * d + offs_d[None, :]
                w = tl.load(w_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
                if HAS_DECAY:
                    new_w = w - (step * grad_W + tl.load(lr_ptr + slot) * tl.load(wd_ptr + slot) * w)
                else:
                    new_w = w - step * grad_W
                tl.store(w_ptrs, new_w.to(W_ptr.dtype.element_ty), mask=tile_mask)
                if tile % feature_blocks == 0:
                    b_ptrs = b_ptr + slot * num_classes + offs_c
                    bias = tl.load(b_ptrs, mask=live, other=0.0).to(tl.float32)
                    if HAS_RATES:
                        bias_step = step * tl.load(bias_rate_ptr) * grad_b
                    else:
                        bias_step = step * grad_b
                    tl.store(b_ptrs, (bias - bias_step).to(b_ptr.dtype.element_ty), mask=live)


def launch_grad_apply(x, grad_logits, flags, W, b, n_classes, lr, weight_decay, batch, checks, op, *,
                      feature_rates=None, bias_rate=None) -> None:
    """Stage 2 for sgd_step and entropy_step (flags: the rows that count, or None for all).
    feature_rates: contiguous float32 [d], bias_rate: float32 [1], both on W's device, or None;
    when only one is given the other is 1 (the kernel has one flag for both)."""
    S, C, d = W.shape
    segs, num_segs = batch.segments()
    cfg = apply_config(C, d)
    tiles = triton.cdiv(C, cfg["BLOCK_C"]) * triton.cdiv(d, cfg["BLOCK_D"])
    programs = num_programs(x.device, x.shape[0] * tiles)
    errors = error_counter(x.device)
    has_decay = weight_decay is not None
    has_rates = feature_rates is not None or bias_rate is not None
    if has_rates:
        if feature_rates is None:
            feature_rates = torch.ones(d, dtype=torch.float32, device=W.device)
        if bias_rate is None:
            bias_rate = torch.ones(1, dtype=torch.float32, device=W.device)
    _grad_apply_kernel[(programs,)](
        x, grad_logits, flags if flags is not None else grad_logits, W, b, batch.order, batch.sorted_slots,
        batch.seg_end, segs, num_segs, n_classes, lr, weight_decay if has_decay else lr,
        # Unused pointer arguments get a float32 tensor of the call (lr), as for the decay.
        feature_rates if has_rates else lr, bias_rate if has_rates else lr, errors,
        S, C, d, programs,
        HAS_FLAGS=flags is not None, HAS_DECAY=has_decay, HAS_RATES=has_rates, CHECKS=checks, **cfg,
    )
    raise_if_flagged(errors, op, checks)


def sgd_step_triton(x, y, slots, W, b, n_classes, lr, weight_decay, grad_logits=None, batch=None, logits=None,
                    checks=None, feature_rates=None, bias_rate=None) -> None:
    """Launcher; lr and weight_decay are float32 [S]. `logits`: the call's head_forward logits
    (computed here when absent). `grad_logits` (float32 [B, C]) lets tests hand in a poisoned
    scratch buffer: stage 1 writes every element of it. feature_rates (float32 [d]) and
    bias_rate (float32 [1]), on W's device: the Meta-SGD rates (kernels.ops.sgd_step checks
    them), or None for the plain step."""
    B, C = x.shape[0], W.shape[1]
    if B == 0:
        return
    checks = checks_on(checks)
    x, slots, y, n_classes = contiguous_rows(x), index_vector(slots), index_vector(y), index_vector(n_classes)
    batch = slot_batch(slots, batch)
    if logits is None:
        logits = head_forward_triton(x, W, b, slots, n_classes, batch=batch, checks=checks)
    if grad_logits is None:
        grad_logits = torch.empty((B, C), dtype=torch.float32, device=x.device)
    _softmax_grad_kernel[(B,)](logits.contiguous(), y, slots, grad_logits, C, **softmax_config(C))
    if feature_rates is not None:
        feature_rates = feature_rates.contiguous()
    launch_grad_apply(x, grad_logits, None, W, b, n_classes, lr, weight_decay, batch, checks, "sgd_step",
                      feature_rates=feature_rates, bias_rate=bias_rate)

"""Triton delta rule (LMS): W_s += beta_s * (onehot(y) - W_s k) k^T, k = x / ||x||, rows of a
slot applied one after another in arrival order.

The rule is separable over classes — row c of W_s only ever needs its own prediction W_s[c] . k
— so a work item is (slot, class block): its program walks the slot's rows in order, with no
communication between programs. A persistent grid walks the compacted segment list. Per row:
one pass over the features for the prediction (and ||x||), one pass to apply the update.
bf16 heads are updated in fp32 and rounded on every row's store (the next row reads them back).
Math: kernels.ops.delta_step, kernels.reference.delta_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (NORM_EPS, block_size, checks_on, contiguous_rows, error_counter, head_matvec, index_vector,
                     num_programs, out_of_range, raise_if_flagged, slot_batch)

NUM_WARPS = 4


def delta_config(num_classes: int, d: int) -> dict:
    block_c = block_size(num_classes, cap=64)
    return dict(BLOCK_C=block_c, BLOCK_D=block_size(d, cap=max(16, 4096 // block_c)), num_warps=NUM_WARPS)


@triton.jit
def _delta_kernel(
    x_ptr, y_ptr, W_ptr, order_ptr, sorted_slots_ptr, seg_end_ptr, segs_ptr, num_segs_ptr,
    n_classes_ptr, beta_ptr, err_ptr,
    num_slots, num_classes, d, num_programs,
    NORM_EPS: tl.constexpr, CHECKS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    class_blocks = tl.cdiv(num_classes, BLOCK_C)
    total = tl.load(num_segs_ptr) * class_blocks
    for item in range(tl.program_id(0), total, num_programs):
        start = tl.load(segs_ptr + item // class_blocks)
        slot = tl.load(sorted_slots_ptr + start)
        skip = (slot < 0) | out_of_range(err_ptr, slot, -1, num_slots, CHECKS)
        if not skip:
            end = tl.load(seg_end_ptr + start)
            offs_c = (item % class_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
            live = offs_c < tl.load(n_classes_ptr + slot)
            beta = tl.load(beta_ptr + slot)
            head = W_ptr + slot * num_classes * d
            for j in range(start, end):
                row = tl.load(order_ptr + j)
                pred, sum_sq = head_matvec(head, x_ptr + row * d, offs_c, live, d, BLOCK_D)
                inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), NORM_EPS)
                target = tl.where(offs_c == tl.load(y_ptr + row), 1.0, 0.0)
                # Scale the error by beta / ||x|| once, so the update multiplies by the raw features.
                scaled_error = tl.where(live, (target - pred * inv_norm) * (beta * inv_norm), 0.0)
                for d0 in range(0, d, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    in_d = offs_d < d
                    tile = live[:, None] & in_d[None, :]
                    xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
                    w_ptrs = head + offs_c[:, None] * d + offs_d[None, :]
                    w = tl.load(w_ptrs, mask=tile, other=0.0).to(tl.float32)
                    tl.store(w_ptrs, (w + scaled_error[:, None] * xv[None, :]).to(W_ptr.dtype.element_ty), mask=tile)
                # The next row's prediction must see this row's stores from every thread.
                tl.debug_barrier()


def delta_step_triton(x, y, slots, W, n_classes, beta, batch=None, checks=None) -> None:
    """Launcher; beta is float32 [S]."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    checks = checks_on(checks)
    x, y, slots = contiguous_rows(x), index_vector(y), index_vector(slots)
    batch = slot_batch(slots, batch)
    segs, num_segs = batch.segments()
    cfg = delta_config(C, d)
    programs = num_programs(x.device, B * triton.cdiv(C, cfg["BLOCK_C"]))
    errors = error_counter(x.device)
    _delta_kernel[(programs,)](
        x, y, W, batch.order, batch.sorted_slots, batch.seg_end, segs, num_segs, index_vector(n_classes), beta, errors,
        S, C, d, programs, NORM_EPS=NORM_EPS, CHECKS=checks, **cfg,
    )
    raise_if_flagged(errors, "delta_step", checks)

"""Triton delta rule (LMS): W_s += beta_s * (onehot(y) - W_s k) k^T, k = x / ||x||, rows of a
slot applied one after another in arrival order.

The rule is separable over classes — row c of W_s only ever needs its own prediction W_s[c] . k
— so one program owns (slot, class block) and walks the slot's rows in order, with no
communication between programs. Per row: one pass over the features for the prediction (and
||x||), one pass to apply the update. Math: kernels.ops.delta_step,
kernels.reference.delta_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NORM_EPS, contiguous_rows, head_matvec, slot_batch, tile_sizes


@triton.jit
def _delta_kernel(
    x_ptr, y_ptr, W_ptr, order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    n_classes_ptr, beta_ptr,
    num_classes, d,
    NORM_EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    if start != pos:  # one program per slot: the one at its first sorted position
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    end = tl.load(seg_end_ptr + pos)

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
            w = tl.load(w_ptrs, mask=tile, other=0.0)
            tl.store(w_ptrs, w + scaled_error[:, None] * xv[None, :], mask=tile)
        # The next row's prediction must see this row's stores from every thread.
        tl.debug_barrier()


def delta_step_triton(x, y, slots, W, n_classes, beta, batch=None) -> None:
    """Launcher; beta is float32 [S]."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, y = contiguous_rows(x), y.long().contiguous()
    batch = slot_batch(slots, batch)
    block_c, block_d = tile_sizes(C, d, tile_elements=4096, class_cap=64)
    grid = (B, triton.cdiv(C, block_c))
    _delta_kernel[grid](
        x, y, W, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end, n_classes, beta,
        C, d, NORM_EPS=NORM_EPS, BLOCK_C=block_c, BLOCK_D=block_d,
    )

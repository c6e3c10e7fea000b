"""Triton SGD cross-entropy step for many sessions' heads, mini-batch mean per slot.

Two launches:
  1. one program per row: logits of its slot's head, masked softmax and `p - onehot(y)` in the
     same pass, scaled by 1 / (rows of that slot) -> grad_logits [B, C];
  2. one program per (slot, class block, feature block): sums grad_logits^T x over the slot's
     rows with tl.dot, then applies W -= lr * (G + wd * W) and b -= lr * sum(grad_logits).
Every row of launch 1 reads the heads as they were before the call, which is exactly the
mini-batch semantics. Math: kernels.ops.sgd_step, kernels.reference.sgd_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_size, contiguous_rows, head_matvec, rows_per_slot, slot_batch, tile_sizes

ROWS_PER_DOT = 16  # rows summed per tl.dot in launch 2 (tl.dot needs every dimension >= 16)


@triton.jit
def _sgd_grad_logits_kernel(
    x_ptr, y_ptr, W_ptr, b_ptr, slots_ptr, n_classes_ptr, rows_per_slot_ptr, grad_ptr,
    num_classes, d,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)  # the whole class range: softmax needs every logit
    in_c = offs_c < num_classes
    grad_row = grad_ptr + row * num_classes + offs_c

    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(grad_row, tl.zeros([BLOCK_C], dtype=tl.float32), mask=in_c)
        return

    live = offs_c < tl.load(n_classes_ptr + slot)
    head = W_ptr + slot * num_classes * d
    logits, _ = head_matvec(head, x_ptr + row * d, offs_c, live, d, BLOCK_D)
    logits += tl.load(b_ptr + slot * num_classes + offs_c, mask=live, other=0.0)

    logits = tl.where(live, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    label = tl.load(y_ptr + row)
    grad = p - tl.where(offs_c == label, 1.0, 0.0)
    grad = tl.where(live, grad, 0.0) / tl.load(rows_per_slot_ptr + slot)
    tl.store(grad_row, grad, mask=in_c)


@triton.jit
def _sgd_apply_kernel(
    x_ptr, grad_ptr, W_ptr, b_ptr, order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    n_classes_ptr, lr_ptr, wd_ptr,
    num_classes, d,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    # One program per slot: the one at the slot's first sorted position.
    if start != pos:
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    end = tl.load(seg_end_ptr + pos)

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_c = offs_c < num_classes
    in_d = offs_d < d
    live = offs_c < tl.load(n_classes_ptr + slot)

    grad_W = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    grad_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < end
        rows = tl.load(order_ptr + offs_r, mask=in_r, other=0)
        g = tl.load(grad_ptr + rows[:, None] * num_classes + offs_c[None, :],
                    mask=in_r[:, None] & in_c[None, :], other=0.0)  # [BLOCK_R, BLOCK_C]
        xv = tl.load(x_ptr + rows[:, None] * d + offs_d[None, :],
                     mask=in_r[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        # ieee: TF32 would cost ~3 decimal digits in the update for no gain (memory-bound op).
        grad_W += tl.dot(tl.trans(g), xv, input_precision="ieee")
        grad_b += tl.sum(g, axis=0)

    lr = tl.load(lr_ptr + slot)
    wd = tl.load(wd_ptr + slot)
    tile = live[:, None] & in_d[None, :]
    w_ptrs = W_ptr + slot * num_classes * d + offs_c[:, None] * d + offs_d[None, :]
    w = tl.load(w_ptrs, mask=tile, other=0.0)
    tl.store(w_ptrs, w - lr * (grad_W + wd * w), mask=tile)
    if tl.program_id(2) == 0:
        b_ptrs = b_ptr + slot * num_classes + offs_c
        bias = tl.load(b_ptrs, mask=live, other=0.0)
        tl.store(b_ptrs, bias - lr * grad_b, mask=live)


def sgd_step_triton(x, y, slots, W, b, n_classes, lr, weight_decay, grad_logits=None, batch=None) -> None:
    """Launcher; lr and weight_decay are float32 [S]. `grad_logits` (float32 [B, C]) lets tests
    hand in a poisoned scratch buffer: launch 1 writes every element of it."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, slots, y = contiguous_rows(x), slots.long().contiguous(), y.long().contiguous()
    if grad_logits is None:
        grad_logits = torch.empty((B, C), dtype=torch.float32, device=x.device)

    block_c_all = block_size(C, cap=1 << 16)
    _sgd_grad_logits_kernel[(B,)](
        x, y, W, b, slots, n_classes, rows_per_slot(slots, S), grad_logits,
        C, d, BLOCK_C=block_c_all, BLOCK_D=block_size(d, cap=max(16, 8192 // block_c_all)),
    )

    batch = slot_batch(slots, batch)
    block_c, block_d = tile_sizes(C, d, tile_elements=4096)
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(d, block_d))
    _sgd_apply_kernel[grid](
        x, grad_logits, W, b, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        n_classes, lr, weight_decay,
        C, d, BLOCK_R=ROWS_PER_DOT, BLOCK_C=block_c, BLOCK_D=block_d,
    )

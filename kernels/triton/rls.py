"""Triton recursive least squares: Sherman-Morrison rank-1 updates of P_s = (X^T X + lambda I)^-1
and of the head W_s, a slot's rows applied one after another in arrival order.

A row's update needs k = P x in full before any entry of P may change, and P is large (d x d
per session), so one row is two launches, both spread over (slot, block):
  1. gain:   (slot, block of P rows)              k[block] = P[block, :] x        -> k buffer
  2. update: (slot, block of P rows | of classes)  P[block, :] -= s[block] s^T, s = k / sqrt(1 + x.k)
                                                  W[block, :] += (onehot(y) - W x)[block] (k / (1 + x.k))^T
The launcher steps through the position within a slot (at most the largest number of rows one
slot has in the batch); every slot with a row at that position is updated in the same launch.
Writing the P update as s s^T keeps P exactly symmetric. Math: kernels.ops.rls_step,
kernels.reference.rls_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_size, contiguous_rows, slot_batch


@triton.jit
def _rls_gain_kernel(
    x_ptr, state_rows_ptr, P_ptr, gain_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    position, d,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    seg = tl.program_id(0)
    if position >= tl.load(seg_len_ptr + seg):
        return
    row = tl.load(order_ptr + tl.load(seg_start_ptr + seg) + position)
    inverse = P_ptr + tl.load(state_rows_ptr + row) * d * d
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < d

    k = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, d, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < d
        xv = tl.load(x_ptr + row * d + offs_j, mask=in_j, other=0.0).to(tl.float32)
        p = tl.load(inverse + offs_i[:, None] * d + offs_j[None, :], mask=in_i[:, None] & in_j[None, :], other=0.0)
        k += tl.sum(p * xv[None, :], axis=1)
    tl.store(gain_ptr + seg * d + offs_i, k, mask=in_i)


@triton.jit
def _rls_update_kernel(
    x_ptr, y_ptr, state_rows_ptr, W_ptr, P_ptr, gain_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    seg_slot_ptr, n_classes_ptr,
    position, num_classes, d, num_row_blocks,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    seg = tl.program_id(0)
    if position >= tl.load(seg_len_ptr + seg):
        return
    row = tl.load(order_ptr + tl.load(seg_start_ptr + seg) + position)
    x_row = x_ptr + row * d
    k_row = gain_ptr + seg * d

    # 1 + x^T P x, summed in the same order by every program of this slot so they all agree.
    x_dot_k = tl.zeros([BLOCK_J], dtype=tl.float32)
    for j0 in range(0, d, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < d
        x_dot_k += (tl.load(x_row + offs_j, mask=in_j, other=0.0).to(tl.float32)
                    * tl.load(k_row + offs_j, mask=in_j, other=0.0))
    denom = 1.0 + tl.sum(x_dot_k, axis=0)

    block = tl.program_id(1)
    if block < num_row_blocks:
        # P[block, :] -= s[block] s^T with s = k / sqrt(denom): the product s_i s_j is the same
        # number as s_j s_i, so symmetric P stays bitwise symmetric.
        inverse = P_ptr + tl.load(state_rows_ptr + row) * d * d
        scale = 1.0 / tl.sqrt(denom)
        offs_i = block * BLOCK_I + tl.arange(0, BLOCK_I)
        in_i = offs_i < d
        s_i = tl.load(k_row + offs_i, mask=in_i, other=0.0) * scale
        for j0 in range(0, d, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            in_j = offs_j < d
            s_j = tl.load(k_row + offs_j, mask=in_j, other=0.0) * scale
            tile = in_i[:, None] & in_j[None, :]
            p_ptrs = inverse + offs_i[:, None] * d + offs_j[None, :]
            tl.store(p_ptrs, tl.load(p_ptrs, mask=tile, other=0.0) - s_i[:, None] * s_j[None, :], mask=tile)
    else:
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        offs_c = (block - num_row_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        live = offs_c < tl.load(n_classes_ptr + slot)
        head = W_ptr + slot * num_classes * d + offs_c[:, None] * d
        pred = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j0 in range(0, d, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            in_j = offs_j < d
            xv = tl.load(x_row + offs_j, mask=in_j, other=0.0).to(tl.float32)
            w = tl.load(head + offs_j[None, :], mask=live[:, None] & in_j[None, :], other=0.0)
            pred += tl.sum(w * xv[None, :], axis=1)
        target = tl.where(offs_c == tl.load(y_ptr + row), 1.0, 0.0)
        error = tl.where(live, (target - pred) / denom, 0.0)
        for j0 in range(0, d, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            tile = live[:, None] & (offs_j < d)[None, :]
            k_j = tl.load(k_row + offs_j, mask=offs_j < d, other=0.0)
            w = tl.load(head + offs_j[None, :], mask=tile, other=0.0)
            tl.store(head + offs_j[None, :], w + error[:, None] * k_j[None, :], mask=tile)


def rls_step_triton(x, y, slots, state_rows, W, P, n_classes, batch=None) -> None:
    """Launcher. Counts the slots on the host (one synchronisation) to size the position loop."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, y, state_rows = contiguous_rows(x), y.long().contiguous(), state_rows.long().contiguous()
    batch = slot_batch(slots, batch)
    order, sorted_slots = batch.order, batch.sorted_slots
    seg_slot, seg_len = torch.unique_consecutive(sorted_slots, return_counts=True)
    seg_start = seg_len.cumsum(0) - seg_len
    valid = seg_slot >= 0
    seg_slot, seg_len, seg_start = seg_slot[valid], seg_len[valid], seg_start[valid]
    num_segments = seg_slot.numel()
    if num_segments == 0:
        return
    longest = int(seg_len.max())

    gain = torch.empty((num_segments, d), dtype=torch.float32, device=x.device)
    block_i = block_j = block_size(d, cap=64)
    block_c = block_size(C, cap=64)
    num_row_blocks = triton.cdiv(d, block_i)
    update_blocks = num_row_blocks + triton.cdiv(C, block_c)
    for position in range(longest):
        _rls_gain_kernel[(num_segments, num_row_blocks)](
            x, state_rows, P, gain, order, seg_start, seg_len, position, d,
            BLOCK_I=block_i, BLOCK_J=block_j,
        )
        _rls_update_kernel[(num_segments, update_blocks)](
            x, y, state_rows, W, P, gain, order, seg_start, seg_len, seg_slot, n_classes,
            position, C, d, num_row_blocks,
            BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=block_c,
        )

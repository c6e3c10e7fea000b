"""Triton recursive least squares: Sherman-Morrison rank-1 updates of P_s = (X^T X + lambda I)^-1
and of the head W_s, a slot's rows applied one after another in arrival order.

A row's update needs k = P x in full before any entry of P may change, and P is large (d x d
per session), so rows are applied one position at a time, each position one launch over work
items (slot, block of P rows | block of classes):
    P rows:   P[i, :] -= s_i s^T with s = k / sqrt(1 + x.k); and, while the block is in hand,
              the next row's gain k'[i] = P_new[i, :] . x'  (x' = the slot's next row)
    classes:  W[c, :] += (onehot(y) - W x)[c] (k / (1 + x.k))^T
so each position reads and writes P once (a first launch computes the first row's gain).
The gains ping-pong between two buffers: programs of one launch read k while writing k'.
Writing the P update as s s^T keeps P exactly symmetric. The number of positions (the most
rows any slot has) sizes the launch loop: from SlotBatch.max_count, free of synchronisation
when the batch was built from_list, otherwise one read of the counts.
Math: kernels.ops.rls_step, kernels.reference.rls_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (block_size, checks_on, contiguous_rows, error_counter, index_vector, num_programs, out_of_range,
                     raise_if_flagged, slot_batch)

NUM_WARPS = 4


def rls_config(num_classes: int, d: int) -> dict:
    block = block_size(d, cap=64)
    return dict(BLOCK_I=block, BLOCK_J=block, BLOCK_C=block_size(num_classes, cap=64), num_warps=NUM_WARPS)


@triton.jit
def _gain_block(inverse, x_row, offs_i, in_i, d, BLOCK_J: tl.constexpr):
    """P[offs_i, :] . x, accumulated over column blocks in a fixed order."""
    k = tl.zeros([offs_i.shape[0]], dtype=tl.float32)
    for j0 in range(0, d, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < d
        xv = tl.load(x_row + offs_j, mask=in_j, other=0.0).to(tl.float32)
        p = tl.load(inverse + offs_i[:, None] * d + offs_j[None, :], mask=in_i[:, None] & in_j[None, :], other=0.0)
        k += tl.sum(p * xv[None, :], axis=1)
    return k


@triton.jit
def _rls_gain_kernel(
    x_ptr, state_rows_ptr, P_ptr, gain_ptr, order_ptr, sorted_slots_ptr, segs_ptr, num_segs_ptr, err_ptr,
    num_slots, num_state_rows, d, num_programs,
    CHECKS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The first row's gain k = P x of every slot."""
    row_blocks = tl.cdiv(d, BLOCK_I)
    total = tl.load(num_segs_ptr) * row_blocks
    for item in range(tl.program_id(0), total, num_programs):
        seg = item // row_blocks
        start = tl.load(segs_ptr + seg)
        slot = tl.load(sorted_slots_ptr + start)
        row = tl.load(order_ptr + start)
        state = tl.load(state_rows_ptr + row)
        skip = (slot < 0) | out_of_range(err_ptr, slot, -1, num_slots, CHECKS)
        skip = skip | out_of_range(err_ptr, state, 0, num_state_rows, CHECKS)
        if not skip:
            offs_i = (item % row_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
            in_i = offs_i < d
            k = _gain_block(P_ptr + state * d * d, x_ptr + row * d, offs_i, in_i, d, BLOCK_J)
            tl.store(gain_ptr + seg * d + offs_i, k, mask=in_i)


@triton.jit
def _rls_step_kernel(
    x_ptr, y_ptr, state_rows_ptr, W_ptr, P_ptr, gain_ptr, next_gain_ptr,
    order_ptr, sorted_slots_ptr, seg_end_ptr, segs_ptr, num_segs_ptr, n_classes_ptr,
    position, num_slots, num_state_rows, num_classes, d, num_programs,
    CHECKS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row_blocks = tl.cdiv(d, BLOCK_I)
    blocks = row_blocks + tl.cdiv(num_classes, BLOCK_C)
    total = tl.load(num_segs_ptr) * blocks
    for item in range(tl.program_id(0), total, num_programs):
        seg = item // blocks
        block = item % blocks
        start = tl.load(segs_ptr + seg)
        end = tl.load(seg_end_ptr + start)
        slot = tl.load(sorted_slots_ptr + start)
        if (slot >= 0) & (start + position < end):
            row = tl.load(order_ptr + start + position)
            state = tl.load(state_rows_ptr + row)
            # Out-of-range slots and state rows were counted by the gain launch.
            skip = (slot >= num_slots) | (state < 0) | (state >= num_state_rows)
            if not skip:
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
                if block < row_blocks:
                    # P[block, :] -= s[block] s^T with s = k / sqrt(denom): the product s_i s_j is the
                    # same number as s_j s_i, so symmetric P stays bitwise symmetric.
                    inverse = P_ptr + state * d * d
                    scale = 1.0 / tl.sqrt(denom)
                    offs_i = block * BLOCK_I + tl.arange(0, BLOCK_I)
                    in_i = offs_i < d
                    s_i = tl.load(k_row + offs_i, mask=in_i, other=0.0) * scale
                    has_next = start + position + 1 < end
                    # The last row has no successor: its (clamped) next gain is computed and dropped.
                    next_row = x_ptr + tl.load(order_ptr + tl.minimum(start + position + 1, end - 1)) * d
                    k_next = tl.zeros([BLOCK_I], dtype=tl.float32)
                    for j0 in range(0, d, BLOCK_J):
                        offs_j = j0 + tl.arange(0, BLOCK_J)
                        in_j = offs_j < d
                        s_j = tl.load(k_row + offs_j, mask=in_j, other=0.0) * scale
                        tile = in_i[:, None] & in_j[None, :]
                        p_ptrs = inverse + offs_i[:, None] * d + offs_j[None, :]
                        p = tl.load(p_ptrs, mask=tile, other=0.0) - s_i[:, None] * s_j[None, :]
                        tl.store(p_ptrs, p, mask=tile)
                        xn = tl.load(next_row + offs_j, mask=in_j, other=0.0).to(tl.float32)
                        k_next += tl.sum(p * xn[None, :], axis=1)
                    if has_next:
                        tl.store(next_gain_ptr + seg * d + offs_i, k_next, mask=in_i)
                else:
                    offs_c = (block - row_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
                    live = offs_c < tl.load(n_classes_ptr + slot)
                    head = W_ptr + slot * num_classes * d + offs_c[:, None] * d
                    pred = tl.zeros([BLOCK_C], dtype=tl.float32)
                    for j0 in range(0, d, BLOCK_J):
                        offs_j = j0 + tl.arange(0, BLOCK_J)
                        in_j = offs_j < d
                        xv = tl.load(x_row + offs_j, mask=in_j, other=0.0).to(tl.float32)
                        w = tl.load(head + offs_j[None, :], mask=live[:, None] & in_j[None, :], other=0.0).to(tl.float32)
                        pred += tl.sum(w * xv[None, :], axis=1)
                    target = tl.where(offs_c == tl.load(y_ptr + row), 1.0, 0.0)
                    error = tl.where(live, (target - pred) / denom, 0.0)
                    for j0 in range(0, d, BLOCK_J):
                        offs_j = j0 + tl.arange(0, BLOCK_J)
                        tile = live[:, None] & (offs_j < d)[None, :]
                        k_j = tl.load(k_row + offs_j, mask=offs_j < d, other=0.0)
                        w = tl.load(head + offs_j[None, :], mask=tile, other=0.0).to(tl.float32)
                        tl.store(head + offs_j[None, :], (w + error[:, None] * k_j[None, :]).to(W_ptr.dtype.element_ty),
                                 mask=tile)


def rls_step_triton(x, y, slots, state_rows, W, P, n_classes, batch=None, checks=None) -> None:
    """Launcher."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    checks = checks_on(checks)
    x, y, slots, state_rows = contiguous_rows(x), index_vector(y), index_vector(slots), index_vector(state_rows)
    batch = slot_batch(slots, batch)
    longest = batch.max_count
    if longest == 0:
        return
    segs, num_segs = batch.segments()
    cfg = rls_config(C, d)
    gains = torch.empty((2, B, d), dtype=torch.float32, device=x.device)
    errors = error_counter(x.device)
    n_classes = index_vector(n_classes)
    row_blocks = triton.cdiv(d, cfg["BLOCK_I"])
    programs = num_programs(x.device, B * row_blocks)
    _rls_gain_kernel[(programs,)](
        x, state_rows, P, gains[0], batch.order, batch.sorted_slots, segs, num_segs, errors,
        S, P.shape[0], d, programs, CHECKS=checks, BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"],
        num_warps=cfg["num_warps"],
    )
    raise_if_flagged(errors, "rls_step", checks)
    programs = num_programs(x.device, B * (row_blocks + triton.cdiv(C, cfg["BLOCK_C"])))
    for position in range(longest):
        _rls_step_kernel[(programs,)](
            x, y, state_rows, W, P, gains[position % 2], gains[(position + 1) % 2],
            batch.order, batch.sorted_slots, batch.seg_end, segs, num_segs, n_classes,
            position, S, P.shape[0], C, d, programs, CHECKS=checks, **cfg,
        )

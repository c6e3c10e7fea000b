"""Triton class prototypes: running class sums and counts, head = scaled unit class means.

Two launches, both one program per touched slot (found at its first sorted position):
  1. (slot, feature block): walk the slot's rows in order, sums[r, y] += x, counts[r, y] += 1.
     A slot owns its state row, so there are no atomics and the sums are deterministic.
  2. (slot, class block): rewrite W[s, c] = temperature * m_c / ||m_c|| for classes seen at
     least once, 0 for every other class (masked ones included), reading the new sums.
Math: kernels.ops.prototype_step, kernels.reference.prototype_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NORM_EPS, block_size, contiguous_rows, slot_batch, tile_sizes


@triton.jit
def _prototype_accumulate_kernel(
    x_ptr, y_ptr, state_rows_ptr, sums_ptr, counts_ptr,
    order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    num_classes, d,
    BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    if start != pos:
        return
    if tl.load(sorted_slots_ptr + pos) < 0:
        return
    end = tl.load(seg_end_ptr + pos)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d

    for j in range(start, end):
        row = tl.load(order_ptr + j)
        cell = tl.load(state_rows_ptr + row) * num_classes + tl.load(y_ptr + row)
        xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
        sum_ptrs = sums_ptr + cell * d + offs_d
        tl.store(sum_ptrs, tl.load(sum_ptrs, mask=in_d, other=0.0) + xv, mask=in_d)
        if tl.program_id(1) == 0:
            tl.store(counts_ptr + cell, tl.load(counts_ptr + cell) + 1.0)
        # Two rows of one class hit the same cell: the next load must see this store.
        tl.debug_barrier()


@triton.jit
def _prototype_rewrite_kernel(
    W_ptr, state_rows_ptr, sums_ptr, counts_ptr, n_classes_ptr, temperature_ptr,
    order_ptr, sorted_slots_ptr, seg_start_ptr,
    num_classes, d,
    NORM_EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    if tl.load(seg_start_ptr + pos) != pos:
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    state = tl.load(state_rows_ptr + tl.load(order_ptr + pos))

    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < num_classes
    counts = tl.load(counts_ptr + state * num_classes + offs_c, mask=in_c, other=0.0)
    keep = (offs_c < tl.load(n_classes_ptr + slot)) & (counts > 0)
    class_sums = sums_ptr + state * num_classes * d + offs_c[:, None] * d

    sum_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        s = tl.load(class_sums + offs_d[None, :], mask=keep[:, None] & (offs_d < d)[None, :], other=0.0)
        sum_sq += tl.sum(s * s, axis=1)
    # m / max(||m||, eps) with m = s / n  ==  s * 1 / (n * max(||s|| / n, eps)).
    safe_counts = tl.maximum(counts, 1.0)
    scale = tl.load(temperature_ptr + slot) / (safe_counts * tl.maximum(tl.sqrt(sum_sq) / safe_counts, NORM_EPS))
    scale = tl.where(keep, scale, 0.0)

    head = W_ptr + slot * num_classes * d + offs_c[:, None] * d
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        s = tl.load(class_sums + offs_d[None, :], mask=keep[:, None] & in_d[None, :], other=0.0)
        # Every class row is written (0 where not kept): the head is rebuilt, not patched.
        tl.store(head + offs_d[None, :], s * scale[:, None], mask=in_c[:, None] & in_d[None, :])


def prototype_step_triton(x, y, slots, state_rows, sums, counts, W, n_classes, temperature, batch=None) -> None:
    """Launcher; temperature is float32 [S]."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, y, state_rows = contiguous_rows(x), y.long().contiguous(), state_rows.long().contiguous()
    batch = slot_batch(slots, batch)
    block_d = block_size(d, cap=1024)
    _prototype_accumulate_kernel[(B, triton.cdiv(d, block_d))](
        x, y, state_rows, sums, counts, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        C, d, BLOCK_D=block_d,
    )
    block_c, block_d = tile_sizes(C, d, tile_elements=4096, class_cap=64)
    _prototype_rewrite_kernel[(B, triton.cdiv(C, block_c))](
        W, state_rows, sums, counts, n_classes, temperature, batch.order, batch.sorted_slots, batch.seg_start,
        C, d, NORM_EPS=NORM_EPS, BLOCK_C=block_c, BLOCK_D=block_d,
    )

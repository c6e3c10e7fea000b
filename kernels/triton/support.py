"""Triton capped per-class supports (T3A-style): keep, per (session, class), the rows of lowest
priority (entropy), then rewrite the head as scaled unit sums of the kept supports.

One launch, one program per (touched slot, class), found at the slot's first sorted position.
The program keeps its class's priorities [K] in registers and walks the slot's rows in arrival
order; a row of its class replaces the worst entry (the first index of the maximum priority;
empty entries are +inf) when its priority is strictly lower, writing the unit row into the
support memory. Classes are independent, so programs never communicate. Afterwards the program
sums its class's kept supports and writes W[s, c] = temperature * unit(sum).
Math: kernels.ops.support_step, kernels.reference.support_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NORM_EPS, block_size, contiguous_rows, slot_batch


@triton.jit
def _support_kernel(
    x_ptr, y_ptr, prio_ptr, state_rows_ptr, sup_ptr, sup_prio_ptr, W_ptr,
    n_classes_ptr, capacity_ptr, temperature_ptr,
    order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    num_classes, K, d,
    NORM_EPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    if start != pos:  # one program per (slot, class): the one at the slot's first sorted position
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    c = tl.program_id(1)
    if c >= tl.load(n_classes_ptr + slot):
        return
    end = tl.load(seg_end_ptr + pos)
    state = tl.load(state_rows_ptr + tl.load(order_ptr + pos)).to(tl.int64)
    cap = tl.minimum(tl.load(capacity_ptr + slot).to(tl.int32), K)

    offs_k = tl.arange(0, BLOCK_K)
    in_cap = offs_k < cap
    cell = state * num_classes + c
    prio_ptrs = sup_prio_ptr + cell * K + offs_k
    # Entries beyond the cap read as -inf: never the worst, never replaced.
    E = tl.load(prio_ptrs, mask=in_cap, other=float("-inf"))
    cell_sup = sup_ptr + cell * K * d

    for j in range(start, end):
        row = tl.load(order_ptr + j).to(tl.int64)
        h = tl.load(prio_ptr + row)
        worst = tl.max(E, axis=0)
        if (tl.load(y_ptr + row) == c) & (h < worst):
            target = tl.min(tl.where(E == worst, offs_k, BLOCK_K), axis=0)
            sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                xv = tl.load(x_ptr + row * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
                sum_sq += xv * xv
            inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(sum_sq, axis=0)), NORM_EPS)
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                in_d = offs_d < d
                xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
                tl.store(cell_sup + target * d + offs_d, xv * inv_norm, mask=in_d)
            E = tl.where(offs_k == target, h, E)
    tl.store(prio_ptrs, E, mask=in_cap)
    # The rewrite below reads supports this program just wrote.
    tl.debug_barrier()

    keep = in_cap & (E < float("inf"))
    total_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        s = tl.load(cell_sup + offs_k[:, None] * d + offs_d[None, :],
                    mask=keep[:, None] & (offs_d < d)[None, :], other=0.0)
        m = tl.sum(s, axis=0)
        total_sq += m * m
    scale = tl.load(temperature_ptr + slot) / tl.maximum(tl.sqrt(tl.sum(total_sq, axis=0)), NORM_EPS)
    head = W_ptr + (slot * num_classes + c) * d
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        s = tl.load(cell_sup + offs_k[:, None] * d + offs_d[None, :],
                    mask=keep[:, None] & in_d[None, :], other=0.0)
        tl.store(head + offs_d, tl.sum(s, axis=0) * scale, mask=in_d)


def support_step_triton(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                        temperature, batch=None) -> None:
    """Launcher; capacity and temperature are float32 [S]."""
    B, (S, C, d), K = x.shape[0], W.shape, supports.shape[2]
    if B == 0:
        return
    x, y = contiguous_rows(x), y.long().contiguous()
    priority, state_rows = priority.float().contiguous(), state_rows.long().contiguous()
    batch = slot_batch(slots, batch)
    block_k = block_size(K, cap=1 << 12, floor=2)
    block_d = block_size(d, cap=max(16, 8192 // block_k))
    _support_kernel[(B, C)](
        x, y, priority, state_rows, supports, support_priority, W, n_classes, capacity, temperature,
        batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        C, K, d, NORM_EPS=NORM_EPS, BLOCK_K=block_k, BLOCK_D=block_d,
    )

"""Triton capped per-class supports (T3A-style): keep, per (session, class), the rows of lowest
priority (entropy), then rewrite that class of the head as the scaled unit sum of its kept
supports.

One launch. Rows are grouped by (slot, class) (common.ClassGroups, arrival order kept) and a
persistent grid walks the groups; the program of a group owns that (state row, class) cell: it
keeps the cell's priorities [K] in registers and walks the group's rows in order; a row
replaces the worst entry (the first index of the maximum priority; empty entries are +inf)
when its priority is strictly lower, writing the unit row into the support memory. Afterwards it
sums the cell's kept supports (one read of K x d, accumulated in a full-width register row) and
writes W[s, c] = temperature * unit(sum). Only the classes that received rows are touched, so a
call costs O(rows x d + touched classes x K x d), independent of the session's class count.
Math: kernels.ops.support_step, kernels.reference.support_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (NORM_EPS, ClassGroups, block_size, cell_out_of_range, checks_on, class_group, contiguous_rows,
                     error_counter, index_vector, num_programs, raise_if_flagged)

NUM_WARPS = 4
MAX_D = 1 << 14  # a support row is held in registers: [next_pow2(d)] floats per program


def support_config(K: int, d: int) -> dict:
    if d > MAX_D:
        raise ValueError(f"support_step supports d <= {MAX_D}, got {d}")
    return dict(BLOCK_K=block_size(K, cap=1 << 12, floor=2), BLOCK_D=block_size(d, cap=MAX_D),
                num_warps=NUM_WARPS if d <= 2048 else 8)


@triton.jit
def _support_kernel(
    x_ptr, y_ptr, prio_ptr, slots_ptr, state_rows_ptr, sup_ptr, sup_prio_ptr, W_ptr,
    n_classes_ptr, capacity_ptr, temperature_ptr,
    order_ptr, end_ptr, first_ptr, num_groups_ptr, err_ptr,
    num_slots, num_state_rows, num_classes, K, d, num_programs,
    NORM_EPS: tl.constexpr, CHECKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    for g in range(tl.program_id(0), tl.load(num_groups_ptr), num_programs):
        start, end, slot, c, state = class_group(g, first_ptr, end_ptr, order_ptr, slots_ptr, y_ptr, state_rows_ptr)
        skip = cell_out_of_range(err_ptr, slot, c, state, n_classes_ptr, num_slots, num_classes, num_state_rows,
                                 end - start, CHECKS)
        if not skip:
            cap = tl.minimum(tl.load(capacity_ptr + slot).to(tl.int32), K)
            in_cap = offs_k < cap
            cell = state * num_classes + c
            prio_ptrs = sup_prio_ptr + cell * K + offs_k
            # Entries beyond the cap read as -inf: never the worst, never replaced.
            E = tl.load(prio_ptrs, mask=in_cap, other=-float("inf"))
            cell_sup = sup_ptr + cell * K * d
            for j in range(start, end):
                row = tl.load(order_ptr + j)
                h = tl.load(prio_ptr + row)
                worst = tl.max(E, axis=0)
                if h < worst:
                    target = tl.min(tl.where(E == worst, offs_k, BLOCK_K), axis=0)
                    xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
                    inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(xv * xv, axis=0)), NORM_EPS)
                    tl.store(cell_sup + target * d + offs_d, xv * inv_norm, mask=in_d)
                    E = tl.where(offs_k == target, h, E)
            tl.store(prio_ptrs, E, mask=in_cap)
            tl.debug_barrier()  # the rewrite below reads supports and priorities just written

            if c < tl.load(n_classes_ptr + slot):
                m = tl.zeros([BLOCK_D], dtype=tl.float32)
                for k in range(0, cap):
                    if tl.load(sup_prio_ptr + cell * K + k) < float("inf"):
                        m += tl.load(cell_sup + k * d + offs_d, mask=in_d, other=0.0)
                scale = tl.load(temperature_ptr + slot) / tl.maximum(tl.sqrt(tl.sum(m * m, axis=0)), NORM_EPS)
                head = W_ptr + (slot * num_classes + c) * d
                tl.store(head + offs_d, (m * scale).to(W_ptr.dtype.element_ty), mask=in_d)


def support_step_triton(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                        temperature, batch=None, checks=None) -> None:
    """Launcher; capacity and temperature are float32 [S]. `batch` is accepted for symmetry;
    the kernel groups rows by (slot, class) itself."""
    B, (S, C, d), K = x.shape[0], W.shape, supports.shape[2]
    if B == 0:
        return
    checks = checks_on(checks)
    x, y, slots = contiguous_rows(x), index_vector(y), index_vector(slots)
    priority, state_rows = priority.float().contiguous(), index_vector(state_rows)
    groups = ClassGroups(slots, y, C)
    programs = num_programs(x.device, B)
    errors = error_counter(x.device)
    _support_kernel[(programs,)](
        x, y, priority, slots, state_rows, supports, support_priority, W, index_vector(n_classes), capacity,
        temperature, groups.order, groups.end, groups.first, groups.count, errors,
        S, supports.shape[0], C, K, d, programs,
        NORM_EPS=NORM_EPS, CHECKS=checks, **support_config(K, d),
    )
    raise_if_flagged(errors, "support_step", checks)

"""Triton class prototypes: running class sums and counts, head = scaled unit class means.

One launch. The call's rows are grouped by (slot, class) (common.ClassGroups: a stable sort,
so a group keeps arrival order); a persistent grid walks the groups, and the program of a group
owns that (state row, class) cell of the sums:
    sums[r, c] += x_i for its rows in arrival order; counts[r, c] += rows
    W[s, c] = temperature_s * m / max(||m||, eps), m = sums[r, c] / counts[r, c]   (c live)
Only the classes that received rows are touched: O(rows x d) per call, whatever the session's
class count. No two programs share a cell, so there are no atomics and the sums are the rows
added one after another, every time.
Math: kernels.ops.prototype_step, kernels.reference.prototype_step_ref.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (NORM_EPS, ClassGroups, block_size, cell_out_of_range, checks_on, class_group, contiguous_rows,
                     error_counter, index_vector, num_programs, raise_if_flagged)

NUM_WARPS = 4


def prototype_config(d: int) -> dict:
    return dict(BLOCK_D=block_size(d, cap=512, floor=32), num_warps=NUM_WARPS)


@triton.jit
def _prototype_kernel(
    x_ptr, y_ptr, slots_ptr, state_rows_ptr, sums_ptr, counts_ptr, W_ptr, n_classes_ptr, temperature_ptr,
    order_ptr, end_ptr, first_ptr, num_groups_ptr, err_ptr,
    num_slots, num_state_rows, num_classes, d, num_programs,
    NORM_EPS: tl.constexpr, CHECKS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    for g in range(tl.program_id(0), tl.load(num_groups_ptr), num_programs):
        start, end, slot, c, state = class_group(g, first_ptr, end_ptr, order_ptr, slots_ptr, y_ptr, state_rows_ptr)
        skip = cell_out_of_range(err_ptr, slot, c, state, n_classes_ptr, num_slots, num_classes, num_state_rows,
                                 end - start, CHECKS)
        if not skip:
            cell = state * num_classes + c
            cell_sums = sums_ptr + cell * d
            sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                in_d = offs_d < d
                s = tl.load(cell_sums + offs_d, mask=in_d, other=0.0)
                for j in range(start, end):
                    s += tl.load(x_ptr + tl.load(order_ptr + j) * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
                tl.store(cell_sums + offs_d, s, mask=in_d)
                sum_sq += s * s
            count = tl.load(counts_ptr + cell) + (end - start).to(tl.float32)
            tl.store(counts_ptr + cell, count)
            if c < tl.load(n_classes_ptr + slot):
                # m / max(||m||, eps) with m = s / n  ==  s * 1 / (n * max(||s|| / n, eps)).
                norm = tl.sqrt(tl.sum(sum_sq, axis=0))
                scale = tl.load(temperature_ptr + slot) / (count * tl.maximum(norm / count, NORM_EPS))
                tl.debug_barrier()  # the sums stored above, read back below
                head = W_ptr + (slot * num_classes + c) * d
                for d0 in range(0, d, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    in_d = offs_d < d
                    s = tl.load(cell_sums + offs_d, mask=in_d, other=0.0)
                    tl.store(head + offs_d, (s * scale).to(W_ptr.dtype.element_ty), mask=in_d)


def prototype_step_triton(x, y, slots, state_rows, sums, counts, W, n_classes, temperature, batch=None,
                          checks=None) -> None:
    """Launcher; temperature is float32 [S]. `batch` is accepted for symmetry with the other
    ops; the kernel groups rows by (slot, class) itself."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    checks = checks_on(checks)
    x, y, slots, state_rows = contiguous_rows(x), index_vector(y), index_vector(slots), index_vector(state_rows)
    groups = ClassGroups(slots, y, C)
    programs = num_programs(x.device, B)
    errors = error_counter(x.device)
    _prototype_kernel[(programs,)](
        x, y, slots, state_rows, sums, counts, W, index_vector(n_classes), temperature,
        groups.order, groups.end, groups.first, groups.count, errors,
        S, sums.shape[0], C, d, programs,
        NORM_EPS=NORM_EPS, CHECKS=checks, **prototype_config(d),
    )
    raise_if_flagged(errors, "prototype_step", checks)

"""Triton class-mean heads through a metric (the `hyper` rule): running class sums and counts,
then each touched class's head row from its mean.

One launch, laid out like kernels/triton/prototype.py: the call's rows are grouped by (slot,
class) (common.ClassGroups, a stable sort), a persistent grid walks the groups, and the program
of a group owns that (state row, class) cell:
    sums[r, c] += x_i for its rows in arrival order; counts[r, c] += rows
    m = sums[r, c] / counts[r, c];  W[s, c] = scale_s M m;  b[s, c] = -scale_s / 2 m^T M m   (c live)
M m is computed in [BLOCK_D, BLOCK_K] tiles of the metric (read once per touched class, from L2
after the first). No two programs share a cell, so there are no atomics: the sums are the rows
added one after another, every time, and a replay gets the same bits.
Math: kernels.class_mean_head.class_mean_head_step and its reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (ClassGroups, block_size, cell_out_of_range, checks_on, class_group, contiguous_rows,
                     error_counter, index_vector, num_programs, raise_if_flagged)

# A [64, 64] fp32 tile of the metric per step over 8 warps: no stack or spills on sm_80 or sm_90
# (4 warps spill 8 bytes on sm_80; loadtests/aot_check.py).
NUM_WARPS = 8


def class_mean_head_config(d: int) -> dict:
    return dict(BLOCK_D=block_size(d, cap=64, floor=16), BLOCK_K=block_size(d, cap=64, floor=16),
                num_warps=NUM_WARPS)


@triton.jit
def _class_mean_head_kernel(
    x_ptr, y_ptr, slots_ptr, state_rows_ptr, sums_ptr, counts_ptr, W_ptr, b_ptr, n_classes_ptr, scale_ptr,
    metric_ptr, order_ptr, end_ptr, first_ptr, num_groups_ptr, err_ptr,
    num_slots, num_state_rows, num_classes, d, num_programs,
    CHECKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    for g in range(tl.program_id(0), tl.load(num_groups_ptr), num_programs):
        start, end, slot, c, state = class_group(g, first_ptr, end_ptr, order_ptr, slots_ptr, y_ptr, state_rows_ptr)
        skip = cell_out_of_range(err_ptr, slot, c, state, n_classes_ptr, num_slots, num_classes, num_state_rows,
                                 end - start, CHECKS)
        if not skip:
            cell = state * num_classes + c
            cell_sums = sums_ptr + cell * d
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                in_d = offs_d < d
                s = tl.load(cell_sums + offs_d, mask=in_d, other=0.0)
                for j in range(start, end):
                    s += tl.load(x_ptr + tl.load(order_ptr + j) * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
                tl.store(cell_sums + offs_d, s, mask=in_d)
            count = tl.load(counts_ptr + cell) + (end - start).to(tl.float32)
            tl.store(counts_ptr + cell, count)
            if c < tl.load(n_classes_ptr + slot):
                tl.debug_barrier()  # the sums stored above, read back below
                inv = 1.0 / count
                factor = tl.load(scale_ptr + slot)
                head = W_ptr + (slot * num_classes + c) * d
                quad = tl.zeros([BLOCK_D], dtype=tl.float32)  # m^T M m, summed once at the end
                for d0 in range(0, d, BLOCK_D):  # output features of M m
                    offs_o = d0 + tl.arange(0, BLOCK_D)
                    in_o = offs_o < d
                    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                    for k0 in range(0, d, BLOCK_K):
                        offs_k = k0 + tl.arange(0, BLOCK_K)
                        in_k = offs_k < d
                        m_k = tl.load(cell_sums + offs_k, mask=in_k, other=0.0) * inv
                        tile = tl.load(metric_ptr + offs_o[:, None] * d + offs_k[None, :],
                                       mask=in_o[:, None] & in_k[None, :], other=0.0)
                        acc += tl.sum(tile * m_k[None, :], axis=1)
                    m_o = tl.load(cell_sums + offs_o, mask=in_o, other=0.0) * inv
                    quad += acc * m_o
                    tl.store(head + offs_o, (acc * factor).to(W_ptr.dtype.element_ty), mask=in_o)
                bias = -0.5 * factor * tl.sum(quad, axis=0)
                tl.store(b_ptr + slot * num_classes + c, bias.to(b_ptr.dtype.element_ty))


def class_mean_head_step_triton(x, y, slots, state_rows, sums, counts, W, b, n_classes, metric, scale, batch=None,
                                checks=None) -> None:
    """Launcher; scale is float32 [S], metric float32 [d, d] contiguous. `batch` is accepted for
    symmetry with the other ops; the kernel groups rows by (slot, class) itself."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    checks = checks_on(checks)
    x, y, slots, state_rows = contiguous_rows(x), index_vector(y), index_vector(slots), index_vector(state_rows)
    groups = ClassGroups(slots, y, C)
    programs = num_programs(x.device, B)
    errors = error_counter(x.device)
    _class_mean_head_kernel[(programs,)](
        x, y, slots, state_rows, sums, counts, W, b, index_vector(n_classes), scale, metric.contiguous(),
        groups.order, groups.end, groups.first, groups.count, errors,
        S, sums.shape[0], C, d, programs,
        CHECKS=checks, **class_mean_head_config(d),
    )
    raise_if_flagged(errors, "class_mean_head_step", checks)

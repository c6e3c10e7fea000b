"""Triton grouped head forward, tiled (SGMV): logits[i] = W[slots[i]] @ x[i] + b[slots[i]].

Rows are sorted by slot (SlotBatch); a work item is a tile of up to ROWS_PER_TILE consecutive
rows of one slot times a block of classes. Its program reads that block of the slot's head once
for the whole tile and multiplies it with the tile's feature rows (tl.dot, fp32 accumulation),
so rows that share a head (base-head traffic, several instances of one request) do not re-read
it row by row. A persistent grid walks the compacted tile list (kernels/triton/common.py).

Every row's logits depend only on its own features, its slot's head and the widths C, d: block
sizes are a function of C and d alone, there is no autotuning, and the fp32 dot accumulates
each output element over the features in a fixed order whatever else the tile holds. So the
logits a round's forward computes for a row are bit for bit what the update ops recompute for
it (kernels.ops.sgd_step's `logits=`), and a replay reproduces them.
Math: kernels.ops.head_forward, kernels.reference.head_forward_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreter_enabled
from .common import (NORM_EPS, block_size, checks_on, contiguous_rows, error_counter, index_vector, out_of_range,
                     num_programs, raise_if_flagged, slot_batch)

ROWS_PER_TILE = 16  # tl.dot needs every dimension >= 16
NUM_WARPS = 4


def bf16_dot(W: torch.Tensor) -> bool:
    """bf16 heads take tensor-core products when compiled. The interpreter cannot multiply bf16
    tiles (it keeps bf16 as 16-bit integers), so under it they are upcast and use the fp32 dot:
    the interpreter tests check the math, the compiled kernel tests (gpu_check) this path."""
    return W.dtype == torch.bfloat16 and not interpreter_enabled()


def forward_config(num_classes: int, d: int) -> dict:
    """Block sizes of the forward: a function of (C, d) only (see the module docstring)."""
    block_c = block_size(num_classes, cap=64)
    block_d = block_size(d, cap=min(128, max(32, 4096 // block_c)), floor=32)
    return dict(BLOCK_M=ROWS_PER_TILE, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=NUM_WARPS)


@triton.jit
def _head_forward_kernel(
    x_ptr, W_ptr, b_ptr, order_ptr, sorted_slots_ptr, seg_end_ptr, tiles_ptr, num_tiles_ptr,
    n_classes_ptr, normalize_ptr, out_ptr, err_ptr,
    num_slots, num_classes, d, num_programs,
    NORM_EPS: tl.constexpr, HAS_NORMALIZE: tl.constexpr, CHECKS: tl.constexpr, BF16_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    class_blocks = tl.cdiv(num_classes, BLOCK_C)
    total = tl.load(num_tiles_ptr) * class_blocks
    for item in range(tl.program_id(0), total, num_programs):
        pos = tl.load(tiles_ptr + item // class_blocks)
        offs_c = (item % class_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = offs_c < num_classes
        end = tl.minimum(tl.load(seg_end_ptr + pos), pos + BLOCK_M)
        offs_m = pos + tl.arange(0, BLOCK_M)
        in_m = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=in_m, other=0)
        out_ptrs = out_ptr + rows[:, None] * num_classes + offs_c[None, :]
        out_mask = in_m[:, None] & in_c[None, :]

        slot = tl.load(sorted_slots_ptr + pos)
        skip = (slot < 0) | out_of_range(err_ptr, slot, -1, num_slots, CHECKS)
        if skip:  # rows without a session (or out of range): zeros
            tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), mask=out_mask)
        else:
            live = offs_c < tl.load(n_classes_ptr + slot)
            head = W_ptr + slot * num_classes * d
            acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                in_d = offs_d < d
                xv = tl.load(x_ptr + rows[:, None] * d + offs_d[None, :], mask=in_m[:, None] & in_d[None, :],
                             other=0.0).to(tl.float32)
                # Masked classes are never loaded, so whatever they hold cannot leak into live logits.
                w = tl.load(head + offs_c[:, None] * d + offs_d[None, :], mask=live[:, None] & in_d[None, :],
                            other=0.0)
                if BF16_DOT:
                    # bf16 heads: tensor-core products with fp32 accumulation; the features enter as
                    # two bf16 terms (x = hi + lo to ~16 bits), so only the heads' own rounding shows.
                    x_hi = xv.to(tl.bfloat16)
                    x_lo = (xv - x_hi.to(tl.float32)).to(tl.bfloat16)
                    acc = tl.dot(x_hi, tl.trans(w), acc)
                    acc = tl.dot(x_lo, tl.trans(w), acc)
                else:
                    # ieee: TF32 would cost ~3 decimal digits for no gain (the op is memory-bound).
                    acc = tl.dot(xv, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                if HAS_NORMALIZE:
                    sum_sq += tl.sum(xv * xv, axis=1)
            if HAS_NORMALIZE:
                # W . (x / ||x||) == (W . x) / ||x||: one division instead of rescaling every feature.
                unit = tl.load(normalize_ptr + slot) != 0
                inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), NORM_EPS)
                acc = acc * tl.where(unit, inv_norm, 1.0)[:, None]
            bias = tl.load(b_ptr + slot * num_classes + offs_c, mask=live, other=0.0).to(tl.float32)
            tl.store(out_ptrs, tl.where(live[None, :], acc + bias[None, :], float("-inf")), mask=out_mask)


def head_forward_triton(x, W, b, slots, n_classes, normalize=None, out=None, batch=None, checks=None) -> torch.Tensor:
    """Launcher. `out` (float32 [B, C]) lets tests hand in a poisoned buffer: every element of
    it is written."""
    B, (S, C, d) = x.shape[0], W.shape
    if out is None:
        out = torch.empty((B, C), dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    checks = checks_on(checks)
    batch = slot_batch(slots, batch)
    tiles, num_tiles = batch.row_tiles(ROWS_PER_TILE)
    cfg = forward_config(C, d)
    has_normalize = normalize is not None
    normalize_arg = normalize.to(torch.int8).contiguous() if has_normalize else tiles
    programs = num_programs(x.device, B * triton.cdiv(C, cfg["BLOCK_C"]))
    errors = error_counter(x.device)
    _head_forward_kernel[(programs,)](
        contiguous_rows(x), W, b, batch.order, batch.sorted_slots, batch.seg_end, tiles, num_tiles,
        index_vector(n_classes), normalize_arg, out, errors,
        S, C, d, programs,
        NORM_EPS=NORM_EPS, HAS_NORMALIZE=has_normalize, CHECKS=checks, BF16_DOT=bf16_dot(W), **cfg,
    )
    raise_if_flagged(errors, "head_forward", checks)
    return out

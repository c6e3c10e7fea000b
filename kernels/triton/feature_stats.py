"""Triton per-session feature statistics: running mean / variance, re-standardised rows, and a
head on re-standardised features folded into a head on raw features.

  feature_stats: one program per (slot, feature block), found at the slot's first sorted
      position; it walks the slot's rows twice (mean, then squared deviations), merges them into
      the state row and writes it. The counts every block reads are a copy taken before the
      launch, so no block sees another's write.
  standardize:   one program per (row, feature block): x' = a * x + t from its state row.
  standardized_head: one program per (slot, class block): W = V * a, b = c0 + V . t over
      feature blocks, live classes only.
Math: kernels.label_free_ops, kernels.label_free_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..label_free_reference import STATS_EPS
from .common import block_size, contiguous_rows, slot_batch, tile_sizes


@triton.jit
def _hyper(ptr, slot, PER_SLOT: tl.constexpr):
    if PER_SLOT:
        return tl.load(ptr + slot)
    return tl.load(ptr)


@triton.jit
def _affine(mean_ptr, var_ptr, src_mean_ptr, src_var_ptr, base, offs_d, in_d, power, EPS: tl.constexpr):
    m = tl.load(mean_ptr + base + offs_d, mask=in_d, other=0.0)
    v = tl.load(var_ptr + base + offs_d, mask=in_d, other=0.0)
    sm = tl.load(src_mean_ptr + base + offs_d, mask=in_d, other=0.0)
    sv = tl.load(src_var_ptr + base + offs_d, mask=in_d, other=0.0)
    a = tl.exp(0.5 * power * (tl.log(sv + EPS) - tl.log(v + EPS)))
    return a, sm - a * m


@triton.jit
def _feature_stats_kernel(
    x_ptr, state_rows_ptr, count_in_ptr, count_ptr, mean_ptr, var_ptr, window_ptr,
    order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    d,
    PER_SLOT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    if start != pos:
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    end = tl.load(seg_end_ptr + pos)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    state = tl.load(state_rows_ptr + tl.load(order_ptr + pos)).to(tl.int64)

    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        row = tl.load(order_ptr + j).to(tl.int64)
        total += tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
    k = (end - start).to(tl.float32)
    m_b = total / k
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        row = tl.load(order_ptr + j).to(tl.int64)
        dev = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32) - m_b
        sq += dev * dev
    v_b = sq / k

    n = tl.load(count_in_ptr + state)
    N = tl.minimum(n + k, _hyper(window_ptr, slot, PER_SLOT))
    w = tl.minimum(k / N, 1.0)
    old_mean = tl.load(mean_ptr + state * d + offs_d, mask=in_d, other=0.0)
    old_var = tl.load(var_ptr + state * d + offs_d, mask=in_d, other=0.0)
    delta = m_b - old_mean
    tl.store(mean_ptr + state * d + offs_d, old_mean + w * delta, mask=in_d)
    tl.store(var_ptr + state * d + offs_d, (1.0 - w) * old_var + w * v_b + w * (1.0 - w) * delta * delta, mask=in_d)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + state, N)


def feature_stats_step_triton(x, slots, state_rows, count, mean, var, window, batch=None) -> None:
    """Launcher; window is float32 [1] (every slot) or [S]."""
    B, d = x.shape
    if B == 0:
        return
    x, state_rows = contiguous_rows(x), state_rows.long().contiguous()
    batch = slot_batch(slots, batch)
    block_d = block_size(d, cap=1024)
    _feature_stats_kernel[(B, triton.cdiv(d, block_d))](
        x, state_rows, count.clone(), count, mean, var, window,
        batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        d, PER_SLOT=window.numel() > 1, BLOCK_D=block_d,
    )


@triton.jit
def _standardize_kernel(
    x_ptr, slots_ptr, state_rows_ptr, mean_ptr, var_ptr, src_mean_ptr, src_var_ptr, power_ptr, out_ptr,
    d,
    EPS: tl.constexpr, PER_SLOT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(out_ptr + row * d + offs_d, tl.zeros([BLOCK_D], dtype=tl.float32), mask=in_d)
        return
    state = tl.load(state_rows_ptr + row).to(tl.int64)
    a, t = _affine(mean_ptr, var_ptr, src_mean_ptr, src_var_ptr, state * d, offs_d, in_d,
                   _hyper(power_ptr, slot, PER_SLOT), EPS)
    xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + offs_d, a * xv + t, mask=in_d)


def standardize_features_triton(x, slots, state_rows, mean, var, src_mean, src_var, power, out=None) -> torch.Tensor:
    """Launcher; power is float32 [1] or [S]. `out` (float32 [B, d]) lets tests hand in a poisoned
    buffer: every element of it is written."""
    B, d = x.shape
    if out is None:
        out = torch.empty((B, d), dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    block_d = block_size(d, cap=1024)
    _standardize_kernel[(B, triton.cdiv(d, block_d))](
        contiguous_rows(x), slots.long().contiguous(), state_rows.long().contiguous(), mean, var, src_mean,
        src_var, power, out,
        d, EPS=STATS_EPS, PER_SLOT=power.numel() > 1, BLOCK_D=block_d,
    )
    return out


@triton.jit
def _standardized_head_kernel(
    state_rows_ptr, mean_ptr, var_ptr, src_mean_ptr, src_var_ptr, V_ptr, c0_ptr, W_ptr, b_ptr, n_classes_ptr,
    power_ptr, order_ptr, sorted_slots_ptr, seg_start_ptr,
    num_classes, d,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    if tl.load(seg_start_ptr + pos) != pos:
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    state = tl.load(state_rows_ptr + tl.load(order_ptr + pos)).to(tl.int64)
    power = tl.load(power_ptr + slot)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = offs_c < tl.load(n_classes_ptr + slot)

    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        a, t = _affine(mean_ptr, var_ptr, src_mean_ptr, src_var_ptr, state * d, offs_d, in_d, power, EPS)
        tile = live[:, None] & in_d[None, :]
        v = tl.load(V_ptr + state * num_classes * d + offs_c[:, None] * d + offs_d[None, :], mask=tile, other=0.0)
        tl.store(W_ptr + slot * num_classes * d + offs_c[:, None] * d + offs_d[None, :], v * a[None, :], mask=tile)
        acc += tl.sum(v * t[None, :], axis=1)
    c0 = tl.load(c0_ptr + state * num_classes + offs_c, mask=live, other=0.0)
    tl.store(b_ptr + slot * num_classes + offs_c, c0 + acc, mask=live)


def standardized_head_triton(slots, state_rows, mean, var, src_mean, src_var, V, c0, W, b, n_classes, power,
                             batch=None) -> None:
    """Launcher; power is float32 [S]."""
    B, (S, C, d) = slots.shape[0], W.shape
    if B == 0:
        return
    batch = slot_batch(slots, batch)
    block_c, block_d = tile_sizes(C, d, tile_elements=4096)
    _standardized_head_kernel[(B, triton.cdiv(C, block_c))](
        state_rows.long().contiguous(), mean, var, src_mean, src_var, V, c0, W, b, n_classes, power,
        batch.order, batch.sorted_slots, batch.seg_start,
        C, d, EPS=STATS_EPS, BLOCK_C=block_c, BLOCK_D=block_d,
    )

"""Triton LAME-style affinity step: assignments against a decayed memory, memory merge, head
rewrite.

Two launches:
  1. one program per row: sigma of its state row's running variance, then the head's logits
     W_s x + b_s plus lam * M_r u (u the centred, scaled row) over feature blocks, and the
     softmax over the live classes -> z [B, C] (0 elsewhere);
  2. one program per (slot, class block), at the slot's first sorted position: per feature
     block, G = sum over the slot's rows of z u^T (rows in arrival order), M <- rho M + (1 - rho)
     G / k, W += lam / sigma * M, and the bias correction lam / sigma * M . mean accumulated over
     the blocks. Launch 1 reads every head and memory before launch 2 writes any.
Math: kernels.label_free_ops.affinity_step, kernels.label_free_reference.affinity_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..label_free_reference import STATS_EPS
from .common import block_size, contiguous_rows, slot_batch, tile_sizes


@triton.jit
def _sigma(var_ptr, state, d, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    total = 0.0
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        total += tl.sum(tl.load(var_ptr + state * d + offs_d, mask=offs_d < d, other=0.0), axis=0)
    return tl.sqrt(tl.maximum(total, EPS))


@triton.jit
def _affinity_assign_kernel(
    x_ptr, slots_ptr, state_rows_ptr, M_ptr, mean_ptr, var_ptr, W_ptr, b_ptr, n_classes_ptr, lam_ptr, z_ptr,
    num_classes, d,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    in_c = offs_c < num_classes
    z_row = z_ptr + row * num_classes + offs_c
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(z_row, tl.zeros([BLOCK_C], dtype=tl.float32), mask=in_c)
        return
    state = tl.load(state_rows_ptr + row).to(tl.int64)
    live = offs_c < tl.load(n_classes_ptr + slot)
    inv_sigma = 1.0 / _sigma(var_ptr, state, d, EPS, BLOCK_D)
    lam = tl.load(lam_ptr + slot)

    logits = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        tile = live[:, None] & in_d[None, :]
        xv = tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32)
        u = (xv - tl.load(mean_ptr + state * d + offs_d, mask=in_d, other=0.0)) * inv_sigma
        w = tl.load(W_ptr + slot * num_classes * d + offs_c[:, None] * d + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        m = tl.load(M_ptr + state * num_classes * d + offs_c[:, None] * d + offs_d[None, :], mask=tile, other=0.0)
        logits += tl.sum(w * xv[None, :] + lam * m * u[None, :], axis=1)
    logits += tl.load(b_ptr + slot * num_classes + offs_c, mask=live, other=0.0)
    logits = tl.where(live, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    z = tl.where(live, e / tl.sum(e, axis=0), 0.0)
    tl.store(z_row, z, mask=in_c)


@triton.jit
def _affinity_merge_kernel(
    x_ptr, z_ptr, state_rows_ptr, M_ptr, mean_ptr, var_ptr, W_ptr, b_ptr, n_classes_ptr, lam_ptr, memory_ptr,
    order_ptr, sorted_slots_ptr, seg_start_ptr, seg_end_ptr,
    num_classes, d,
    EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0)
    start = tl.load(seg_start_ptr + pos)
    if start != pos:
        return
    slot = tl.load(sorted_slots_ptr + pos).to(tl.int64)
    if slot < 0:
        return
    end = tl.load(seg_end_ptr + pos)
    state = tl.load(state_rows_ptr + tl.load(order_ptr + pos)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = offs_c < tl.load(n_classes_ptr + slot)
    sigma = _sigma(var_ptr, state, d, EPS, BLOCK_D)
    k = (end - start).to(tl.float32)
    rho = tl.exp(k * tl.log(tl.maximum(1.0 - 1.0 / tl.load(memory_ptr + slot), 1e-30)))  # memory 1: rho 0
    scale = tl.load(lam_ptr + slot) / sigma

    bias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        tile = live[:, None] & in_d[None, :]
        mean = tl.load(mean_ptr + state * d + offs_d, mask=in_d, other=0.0)
        G = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for j in range(start, end):
            row = tl.load(order_ptr + j).to(tl.int64)
            zr = tl.load(z_ptr + row * num_classes + offs_c, mask=live, other=0.0)
            u = (tl.load(x_ptr + row * d + offs_d, mask=in_d, other=0.0).to(tl.float32) - mean) / sigma
            G += zr[:, None] * u[None, :]
        m_ptrs = M_ptr + state * num_classes * d + offs_c[:, None] * d + offs_d[None, :]
        m = rho * tl.load(m_ptrs, mask=tile, other=0.0) + (1.0 - rho) * G / k
        tl.store(m_ptrs, m, mask=tile)
        w_ptrs = W_ptr + slot * num_classes * d + offs_c[:, None] * d + offs_d[None, :]
        tl.store(w_ptrs, tl.load(w_ptrs, mask=tile, other=0.0).to(tl.float32) + scale * m, mask=tile)
        bias_acc += tl.sum(tl.where(tile, m * mean[None, :], 0.0), axis=1)
    b_ptrs = b_ptr + slot * num_classes + offs_c
    tl.store(b_ptrs, tl.load(b_ptrs, mask=live, other=0.0).to(tl.float32) - scale * bias_acc, mask=live)


def affinity_step_triton(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory, z=None,
                         batch=None) -> None:
    """Launcher; lam and memory are float32 [S]. `z` (float32 [B, C]) lets tests hand in a
    poisoned scratch buffer: launch 1 writes every element of it."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, slots, state_rows = contiguous_rows(x), slots.long().contiguous(), state_rows.long().contiguous()
    if z is None:
        z = torch.empty((B, C), dtype=torch.float32, device=x.device)
    block_c_all = block_size(C, cap=1 << 16)
    _affinity_assign_kernel[(B,)](
        x, slots, state_rows, M, mean, var, W, b, n_classes, lam, z,
        C, d, EPS=STATS_EPS, BLOCK_C=block_c_all, BLOCK_D=block_size(d, cap=max(16, 4096 // block_c_all)),
    )
    batch = slot_batch(slots, batch)
    block_c, block_d = tile_sizes(C, d, tile_elements=4096, class_cap=64)
    _affinity_merge_kernel[(B, triton.cdiv(C, block_c))](
        x, z, state_rows, M, mean, var, W, b, n_classes, lam, memory,
        batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        C, d, EPS=STATS_EPS, BLOCK_C=block_c, BLOCK_D=block_d,
    )

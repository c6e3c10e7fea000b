"""Triton grouped head forward (BGMV): logits[i] = W[slots[i]] @ x[i] + b[slots[i]].

One program per (row, class block). Each program gathers its own slot's head, so rows with
different slots run side by side and rows sharing a slot read the same head (L2-resident on
GPU). Math: kernels.ops.head_forward, kernels.reference.head_forward_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import NORM_EPS, contiguous_rows, head_matvec, tile_sizes

# Pure function of its inputs, so autotuning (which re-runs the kernel) is safe here. The
# interpreter and CPU-only builds get a single config: multi-config autotune needs a GPU.
_GPU_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (2, 3)]
_CPU_CONFIGS = [triton.Config({}, num_warps=4)]


def _configs():
    return _GPU_CONFIGS if torch.cuda.is_available() else _CPU_CONFIGS


@triton.autotune(configs=_configs(), key=["num_classes", "d", "HAS_NORMALIZE"])
@triton.jit
def _head_forward_kernel(
    x_ptr, W_ptr, b_ptr, slots_ptr, n_classes_ptr, normalize_ptr, out_ptr,
    num_classes, d,
    NORM_EPS: tl.constexpr, HAS_NORMALIZE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < num_classes
    out_row = out_ptr + row * num_classes + offs_c

    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(out_row, tl.zeros([BLOCK_C], dtype=tl.float32), mask=in_c)
        return

    live = offs_c < tl.load(n_classes_ptr + slot)
    head = W_ptr + slot * num_classes * d
    # Masked classes are never loaded, so whatever they hold cannot leak into live logits.
    acc, sum_sq = head_matvec(head, x_ptr + row * d, offs_c, live, d, BLOCK_D)

    if HAS_NORMALIZE:
        # W . (x / ||x||) == (W . x) / ||x||: one division instead of rescaling every feature.
        unit = tl.load(normalize_ptr + slot) != 0
        inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), NORM_EPS)
        acc = acc * tl.where(unit, inv_norm, 1.0)

    bias = tl.load(b_ptr + slot * num_classes + offs_c, mask=live, other=0.0)
    tl.store(out_row, tl.where(live, acc + bias, float("-inf")), mask=in_c)


def head_forward_triton(x, W, b, slots, n_classes, normalize=None, out=None) -> torch.Tensor:
    """Launcher. `out` (float32 [B, C]) lets tests hand in a poisoned buffer: every element of
    it is written."""
    B, (S, C, d) = x.shape[0], W.shape
    if out is None:
        out = torch.empty((B, C), dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    block_c, block_d = tile_sizes(C, d)
    has_normalize = normalize is not None
    normalize_arg = normalize.to(torch.int8).contiguous() if has_normalize else slots
    grid = (B, triton.cdiv(C, block_c))
    _head_forward_kernel[grid](
        contiguous_rows(x), W, b, slots.contiguous(), n_classes.contiguous(), normalize_arg, out,
        C, d,
        NORM_EPS=NORM_EPS, HAS_NORMALIZE=has_normalize, BLOCK_C=block_c, BLOCK_D=block_d,
    )
    return out

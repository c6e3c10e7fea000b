"""Triton entropy-minimisation step on the head (TENT on a session's head only): entropy gradient
for confident unlabelled rows, cross-entropy gradient for labelled rows, mini-batch mean per slot
over the rows that count.

Two launches, like kernels/triton/sgd.py (whose second launch is reused as is):
  1. one program per row: logits of its slot's head, masked softmax / log-softmax, entropy and
     confidence in one pass; writes the row's logit gradient and whether the row counts;
  2. (after dividing every row's gradient by its slot's count of counting rows, on the device)
     sgd's apply kernel: W -= lr * sum_i g_i x_i^T, b -= lr * sum_i g_i, per (slot, tile).
Math: kernels.ops.entropy_step, kernels.reference.entropy_step_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_size, contiguous_rows, head_matvec, slot_batch, tile_sizes
from .sgd import ROWS_PER_DOT, _sgd_apply_kernel


@triton.jit
def _entropy_grad_logits_kernel(
    x_ptr, y_ptr, W_ptr, b_ptr, slots_ptr, n_classes_ptr, conf_ptr, grad_ptr, counts_ptr,
    num_classes, d,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)  # the whole class range: softmax needs every logit
    in_c = offs_c < num_classes
    grad_row = grad_ptr + row * num_classes + offs_c

    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot < 0:
        tl.store(grad_row, tl.zeros([BLOCK_C], dtype=tl.float32), mask=in_c)
        tl.store(counts_ptr + row, 0.0)
        return

    live = offs_c < tl.load(n_classes_ptr + slot)
    head = W_ptr + slot * num_classes * d
    logits, _ = head_matvec(head, x_ptr + row * d, offs_c, live, d, BLOCK_D)
    logits += tl.load(b_ptr + slot * num_classes + offs_c, mask=live, other=0.0)

    logits = tl.where(live, logits, float("-inf"))
    shifted = logits - tl.max(logits, axis=0)
    e = tl.exp(shifted)
    total = tl.sum(e, axis=0)
    p = e / total
    logp = tl.where(live, shifted - tl.log(total), 0.0)
    H = -tl.sum(tl.where(live, p * logp, 0.0), axis=0)
    g_entropy = tl.where(live, -p * (logp + H), 0.0)
    label = tl.load(y_ptr + row)
    g_ce = tl.where(live, p - tl.where(offs_c == label, 1.0, 0.0), 0.0)
    labelled = label >= 0
    confident = tl.max(p, axis=0) >= tl.load(conf_ptr + slot)
    counts = labelled | confident
    grad = tl.where(labelled, g_ce, tl.where(confident, g_entropy, 0.0))
    tl.store(grad_row, grad, mask=in_c)
    tl.store(counts_ptr + row, tl.where(counts, 1.0, 0.0))


def entropy_step_triton(x, y, slots, W, b, n_classes, lr, min_confidence, grad_logits=None, batch=None) -> None:
    """Launcher; lr and min_confidence are float32 [S]. `grad_logits` (float32 [B, C]) lets tests
    hand in a poisoned scratch buffer: launch 1 writes every element of it."""
    B, (S, C, d) = x.shape[0], W.shape
    if B == 0:
        return
    x, slots, y = contiguous_rows(x), slots.long().contiguous(), y.long().contiguous()
    if grad_logits is None:
        grad_logits = torch.empty((B, C), dtype=torch.float32, device=x.device)
    counts = torch.empty(B, dtype=torch.float32, device=x.device)

    block_c_all = block_size(C, cap=1 << 16)
    _entropy_grad_logits_kernel[(B,)](
        x, y, W, b, slots, n_classes, min_confidence, grad_logits, counts,
        C, d, BLOCK_C=block_c_all, BLOCK_D=block_size(d, cap=max(16, 8192 // block_c_all)),
    )
    # Mean over the rows that count: divide by the slot's count (no host synchronisation).
    per_slot = torch.zeros(S, dtype=torch.float32, device=x.device).index_add_(0, slots.clamp_min(0), counts)
    grad_logits /= per_slot.clamp_min(1.0).index_select(0, slots.clamp_min(0)).unsqueeze(1)

    batch = slot_batch(slots, batch)
    block_c, block_d = tile_sizes(C, d, tile_elements=4096)
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(d, block_d))
    no_decay = torch.zeros(S, dtype=torch.float32, device=x.device)
    _sgd_apply_kernel[grid](
        x, grad_logits, W, b, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        n_classes, lr, no_decay,
        C, d, BLOCK_R=ROWS_PER_DOT, BLOCK_C=block_c, BLOCK_D=block_d,
    )

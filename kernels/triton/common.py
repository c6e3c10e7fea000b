"""Launcher helpers shared by the Triton ops (imported only when Triton is used).

Segment kernels: the call's SlotBatch (kernels.slot_batch, its Triton view) sorts the batch rows
by slot (stable, so each slot's rows keep arrival order) and gives every sorted position j the
range [seg_start[j], seg_end[j]) of its slot's rows. A grid over sorted positions then lets the
program at a segment's first position own that whole slot and every other program return at
once; this needs no host synchronisation to count the slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..slot_batch import SlotBatch

NORM_EPS = 1e-12


def slot_batch(slots: torch.Tensor, batch: SlotBatch | None) -> SlotBatch:
    """The call's SlotBatch (built here when the caller gave none)."""
    return SlotBatch(slots) if batch is None else batch


def rows_per_slot(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[S] float32: how many batch rows name each slot (slot -1 rows ignored)."""
    valid = slots >= 0
    return torch.bincount(slots.clamp_min(0).long(), weights=valid.float(), minlength=num_slots).float()


def block_size(n: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(triton.next_power_of_2(max(n, 1)), cap))


def tile_sizes(num_classes: int, d: int, tile_elements: int = 8192, class_cap: int = 128) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_D) for a [BLOCK_C, BLOCK_D] fp32 tile of about tile_elements: as many
    classes as fit so a feature row is read once, then the widest feature block that fits."""
    block_c = block_size(num_classes, class_cap)
    block_d = block_size(d, max(16, tile_elements // block_c))
    return block_c, block_d


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


@triton.jit
def head_matvec(head, x_row, offs_c, live, d, BLOCK_D: tl.constexpr):
    """(W_s[offs_c] @ x, ||x||^2), accumulated in fp32 over feature blocks.

    head: the slot's [C, d] head; x_row: the row's features (bf16 is upcast before any
    arithmetic). Classes that are not live are never loaded, so whatever they hold (NaN
    included) cannot leak into live logits; their entries are 0.
    """
    acc = tl.where(live, 0.0, 0.0)  # fp32, shaped like the class block
    sum_sq = 0.0
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        xv = tl.load(x_row + offs_d, mask=in_d, other=0.0).to(tl.float32)
        w = tl.load(head + offs_c[:, None] * d + offs_d[None, :], mask=live[:, None] & in_d[None, :], other=0.0)
        acc += tl.sum(w * xv[None, :], axis=1)
        sum_sq += tl.sum(xv * xv, axis=0)
    return acc, sum_sq

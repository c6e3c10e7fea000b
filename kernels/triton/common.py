"""Launcher helpers shared by the Triton ops (imported only when Triton is used).

Work lists instead of dead programs. The call's SlotBatch (kernels.slot_batch, its Triton
view) sorts the batch rows by slot (stable, so each slot's rows keep arrival order) and
compacts the sorted positions where a slot's rows begin (segments()) or where a tile of rows
of one slot begins (row_tiles(m)) to the front of a list, their number staying on the device.
Update kernels group rows by (slot, class) the same way (class_groups below). A kernel then
runs a persistent grid: a fixed number of programs, each taking work items
item = pid, pid + P, pid + 2P, ... < count x tiles. No program is launched for a position that
does no work and nothing is read back to the host to size a grid.

Bounds checks (CHECKS constexpr, from kernels.dispatch.checks_enabled()): a kernel skips a row
whose slot, label or state row is out of range and adds 1 to an error counter, which the
launcher reads back (a synchronisation: debug use) and turns into IndexError.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import checks_enabled
from ..slot_batch import SlotBatch, compact_positions

NORM_EPS = 1e-12
# Programs per multiprocessor of a persistent grid: enough to hide memory latency with the
# small (4-warp) programs these kernels use.
PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 4  # the interpreter runs programs one after another: keep the loops exercised


def slot_batch(slots: torch.Tensor, batch: SlotBatch | None) -> SlotBatch:
    """The call's SlotBatch (built here when the caller gave none)."""
    return SlotBatch(slots) if batch is None else batch


def block_size(n: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(triton.next_power_of_2(max(n, 1)), cap))


def tile_sizes(num_classes: int, d: int, tile_elements: int = 8192, class_cap: int = 128) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_D) for a [BLOCK_C, BLOCK_D] fp32 tile of about tile_elements: as many
    classes as fit so a feature row is read once, then the widest feature block that fits."""
    block_c = block_size(num_classes, class_cap)
    return block_c, block_size(d, max(16, tile_elements // block_c))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, items_upper_bound: int) -> int:
    """Size of a persistent grid for at most items_upper_bound work items."""
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(cap, items_upper_bound))


def contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def index_vector(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as contiguous int64 (no copy when it already is)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.long().contiguous()


# ---- (slot, class) groups -----------------------------------------------------------------


class ClassGroups:
    """The call's rows grouped by (slot, class), each group in arrival order, for ops that own a
    (session, class) cell per program (prototype, support). Device tensors only:
        order [B]      batch row at each position (rows without a slot first)
        key [B]        slot * (C + 1) + class at each position (-1 for rows without a slot)
        end [B]        one past the last position of that position's group
        first [B], count [1]: group start positions compacted to the front (work list)
    """

    def __init__(self, slots: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        slots, y = slots.long(), y.long()
        # Labels outside [0, C) get a group of their own per slot (class C): never aliased into
        # another slot's cell; the kernels skip (and, with checks on, report) them.
        cls = torch.where((y >= 0) & (y < num_classes), y, num_classes)
        key = torch.where(slots >= 0, slots * (num_classes + 1) + cls, -1)
        self.key, self.order = torch.sort(key, stable=True)
        self.order = self.order.contiguous()
        start = torch.searchsorted(self.key, self.key, right=False)
        self.end = torch.searchsorted(self.key, self.key, right=True)
        is_first = (start == torch.arange(key.numel(), device=key.device)) & (self.key >= 0)
        self.first, self.count = compact_positions(is_first)


# ---- index checks -----------------------------------------------------------------------------


def error_counter(device: torch.device) -> torch.Tensor:
    """The in-kernel checks' counter (a 1-element int32 tensor; unused when checks are off)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def checks_on(checks: bool | None) -> bool:
    return checks_enabled() if checks is None else bool(checks)


def raise_if_flagged(errors: torch.Tensor, op: str, checks: bool) -> None:
    if checks and int(errors.item()):
        raise IndexError(f"{op}: {int(errors.item())} row(s) had a slot, label or state row out of range; "
                         "they were skipped")


@triton.jit
def out_of_range(err_ptr, index, lower, upper, CHECKS: tl.constexpr):
    """index outside [lower, upper) while the checks are on (counted in *err_ptr); a false
    scalar otherwise, at no cost."""
    bad = index != index
    if CHECKS:
        bad = (index < lower) | (index >= upper)
        if bad:
            tl.atomic_add(err_ptr, 1)
    return bad


@triton.jit
def class_group(g, first_ptr, end_ptr, order_ptr, slots_ptr, y_ptr, state_rows_ptr):
    """Group g of a ClassGroups work list -> (start, end, slot, class, state row): its positions
    in `order` and the (slot, class, state row) cell its first row names (every row of a group
    names the same cell)."""
    start = tl.load(first_ptr + g)
    end = tl.load(end_ptr + start)
    lead = tl.load(order_ptr + start)
    return start, end, tl.load(slots_ptr + lead), tl.load(y_ptr + lead), tl.load(state_rows_ptr + lead)


@triton.jit
def cell_out_of_range(err_ptr, slot, c, state, n_classes_ptr, num_slots, num_classes, num_state_rows, rows,
                      CHECKS: tl.constexpr):
    """For a (slot, class) group of `rows` rows: skip it? A class outside [0, C) is always
    skipped (its cell would alias another one); with the checks on, a slot, state row or class
    (against the slot's n_classes) out of range is skipped and its rows are counted."""
    skip = (c < 0) | (c >= num_classes)
    if CHECKS:
        bad = (slot < 0) | (slot >= num_slots) | (state < 0) | (state >= num_state_rows)
        if not bad:
            bad = c >= tl.load(n_classes_ptr + slot)
        bad = bad | skip
        if bad:
            tl.atomic_add(err_ptr, rows.to(tl.int32))
        skip = bad
    return skip


@triton.jit
def head_matvec(head, x_row, offs_c, live, d, BLOCK_D: tl.constexpr):
    """(W_s[offs_c] @ x, ||x||^2), accumulated in fp32 over feature blocks.

    head: the slot's [C, d] head (fp32 or bf16); x_row: the row's features (bf16 is upcast
    before any arithmetic). Classes that are not live are never loaded, so whatever they hold
    (NaN included) cannot leak into live logits; their entries are 0.
    """
    acc = tl.where(live, 0.0, 0.0)  # fp32, shaped like the class block
    sum_sq = 0.0
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < d
        xv = tl.load(x_row + offs_d, mask=in_d, other=0.0).to(tl.float32)
        w = tl.load(head + offs_c[:, None] * d + offs_d[None, :], mask=live[:, None] & in_d[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
        sum_sq += tl.sum(xv * xv, axis=0)
    return acc, sum_sq

"""SlotBatch: the per-call row metadata every head op needs, built once per call and shared.

A call names its rows' sessions by slots [B] (-1: the row is skipped). `SlotBatch(slots)` holds
what the two implementations derive from that, each part computed on first use and then kept,
so ops called together on the same rows (pass `batch=` to each) group the rows once:

  torch view (kernels.torch_ops)   the valid rows grouped by slot, each group in arrival order:
      rows, slot, count, seg, pos, counts_list (on the host), rows_in_place, and the helpers
      gather_rows / first_rows / padded / unpad; longest_first() is the same grouping with the
      groups ordered by row count, longest first (the sequential rules loop over positions).
  Triton view (kernels.triton)     order, sorted_slots, seg_start, seg_end: all B rows sorted by
      slot (stable) and, per sorted position, the range of its slot's rows; work lists
      (segments(), row_tiles(m)): the sorted positions where a slot's rows (or a tile of m of
      them) begin, compacted to the front, with their number on the device. No host
      synchronisation: the Triton launchers never touch the torch view's host-side values
      (rls_step sizes its row loop with max_count: free when the batch was built from_list).

Shape -> code path contract (what exact log replay relies on)
-------------------------------------------------------------
The call's *profile* is the multiset of row counts of the slots it names (valid rows only),
`SlotBatch.profile`, longest first. On the torch path, the values an op writes for a slot s
are a function of
  (a) s's rows (features, labels, priorities) in their arrival order among themselves, s's head,
      bias, state row and hyper-parameters, and the tensor widths C, d (and K for supports);
  (b) the profile, and nothing else about the call.
The profile picks the code path (`SlotBatch.torch_path`): "one_slot" (plain GEMMs) when one
slot has all the rows; otherwise "padded" (a batched GEMM over [U, L, .] zero-padded groups)
while U * L <= 2 N + 64 for U slots, L the largest count and N rows, else "per_row" (one
matrix-vector product per row, index_add_ for the updates). The profile also sets the padded
length L, the batch sizes of the batched products and, for the sequential rules (delta, rls),
how many groups are active at each position. Other slots' row values, heads, state,
hyper-parameters and n_classes, the slot ids, where s's rows sit in the batch, skipped rows and
the pool sizes S and R do not enter s's values.

So a replay of s's logged rows reproduces, bit for bit, what the live call wrote for s if it
makes a call with the same profile: s's rows in their order, plus one stand-in slot per other
session of the live call with that session's row count, holding anything finite (zero rows,
zero heads do). `replay_slots(own_rows, others)` builds that layout (s at slot 0, stand-ins at
1, 2, ...) and `SlotBatch.other_counts(slot)` gives the `others` to log. This holds for the same
torch build, device type and intra-op thread count as the live call (the products underneath
may choose kernels by shape and threads). The tests in tests/kernels/test_kernels_replay.py
check it for every op with state. Replaying s alone instead (no stand-ins) is not exact: there
sgd_step and entropy_step (grouped products) and delta_step and rls_step (batched products
over the active groups) change in the last bits for padded and per-row profiles alike, and
head_forward's logits for padded ones. prototype_step and support_step run no grouped products
and were not seen to depend on the profile, but the contract does not promise that, so a
replay keeps the profile for every op.
A rule that makes several calls must reproduce each call's profile. t3a scores all its rows
with head_forward (the stand-ins reproduce that profile), then calls support_step only on the
rows its entropy filter keeps; stand-in rows need not pass that filter as the live sessions'
rows did, so that call's profile may differ in a replay: harmless while support_step stays
independent of the profile, as observed above.

The Triton path needs no stand-ins: every work item reads the rows of one slot only (a tile of
up to 16 of them for the forward, a (slot, class) group for prototype and support, the whole
slot for the others; found through order / seg_start / seg_end and walked in arrival order),
that slot's head and state row, and no reduction or atomic spans two slots (the per-slot row
counts sgd and entropy divide by are sums of 0s and 1s, exact in any order). Block sizes and
warps depend on C, d and K alone (no autotuning), and which program of the persistent grid
takes an item does not change what it computes. A row's logits depend on its features, its
slot's head and the widths only (the forward's dot accumulates every output element in a
fixed order), so the logits the round's forward hands sgd / tent / t3a (`logits=`) are bit for
bit those the ops compute themselves when a replay calls them without. A slot's values are
therefore the same whatever else the call holds, so a replay of s alone (or with the stand-ins
above) reproduces them, on the same GPU and Triton version.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

__all__ = ["SlotBatch", "replay_slots"]

PADDED_SLACK_ROWS = 64  # "padded" while U * L <= 2 N + PADDED_SLACK_ROWS


class SlotBatch:
    """Row metadata of one call over slots [B]; every field is computed on first use.

    Build it with `SlotBatch(slots)` (or `SlotBatch.build(slots)`) and pass it to every op of the
    call with `batch=`; it must be built from the very slots values the ops get (only the length
    and device are checked). Fields of the torch view (valid rows, slot >= 0, grouped by slot):

        rows [N]    batch row indices, grouped by slot, arrival order inside a group
        slot [U]    the slot of each group (ascending; longest_first(): by count, longest first)
        count [U]   rows per group
        seg [N]     group of each grouped row;  pos [N]: its position inside the group
        row_slot [N]  slot of each grouped row (slot[seg])
        counts_list count on the host (a synchronisation unless built from_list)
        rows_in_place  rows == arange(B): the batch is already grouped

    Triton view (all B rows): order [B] (batch row at each sorted position, skipped rows
    first), sorted_slots [B], seg_start [B] / seg_end [B] (the range of that slot's sorted
    positions). Both views are int64 and contiguous, on the device of slots.
    """

    def __init__(self, slots: torch.Tensor, *, _grouped_from: SlotBatch | None = None,
                 _host_counts: list[int] | None = None, _host_slots: list[int] | None = None) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
            raise ValueError(f"slots must be a 1-d tensor, got {getattr(slots, 'shape', type(slots))}")
        self.slots = slots
        self._base = _grouped_from  # set on the longest-first view: the batch it regroups
        self._host_counts = _host_counts  # rows per slot, ascending slot, from the caller's host list
        self._host_slots = _host_slots  # that list itself (from_list)

    @classmethod
    def build(cls, slots: torch.Tensor) -> SlotBatch:
        return cls(slots)

    @classmethod
    def from_list(cls, slots: Sequence[int], device: str | torch.device = "cpu") -> SlotBatch:
        """A batch for slots given as host integers: the tensor is copied to `device` and the
        per-slot row counts (counts_list, profile, max_count) come from the list, so reading
        them costs no device synchronisation."""
        counts: dict[int, int] = {}
        for s in slots:
            if s >= 0:
                counts[s] = counts.get(s, 0) + 1
        slots = list(slots)
        tensor = torch.tensor(slots, dtype=torch.int64, device=device)
        return cls(tensor, _host_counts=[counts[s] for s in sorted(counts)], _host_slots=slots)

    @property
    def size(self) -> int:
        """B: the number of batch rows, skipped ones included."""
        return self.slots.shape[0]

    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def is_longest_first(self) -> bool:
        return self._base is not None

    def check_for(self, slots: torch.Tensor) -> SlotBatch:
        """Cheap guard that this batch was built for a slots tensor like `slots`; returns self."""
        if slots.shape[0] != self.size or slots.device != self.device:
            raise ValueError(f"batch was built for {self.size} rows on {self.device}, the call has "
                             f"{slots.shape[0]} on {slots.device}")
        return self

    # ---- torch view ---------------------------------------------------------------------

    @cached_property
    def _groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, slot, count, seg, pos)."""
        if self._base is not None:
            return self._longest_first_groups()
        if self._host_lists is not None:
            return tuple(self._host_tensor(i) for i in range(5))
        slots = self.slots.long()
        valid_rows = (slots >= 0).nonzero().squeeze(1)
        sorted_slots, order = torch.sort(slots[valid_rows], stable=True)
        rows = valid_rows[order]
        slot, count = torch.unique_consecutive(sorted_slots, return_counts=True)
        seg, pos = _segment_and_position(count)
        return rows, slot, count, seg, pos

    @cached_property
    def _host_lists(self) -> tuple[list[int], ...] | None:
        """The torch view's fields as host lists (rows, slot, count, seg, pos, row_slot) for a CPU
        batch built from_list; None otherwise. The same grouping in a few list operations instead
        of a sort, a unique and the index arithmetic (a CPU call's rows are few, and each torch op
        costs more than its work there); each field becomes a tensor only when an op asks for it.
        Same values, so the profile and code path, and with them every op's result, are unchanged."""
        if self._base is not None or self._host_slots is None or self.device.type != "cpu":
            return None
        order = sorted((s, i) for i, s in enumerate(self._host_slots) if s >= 0)  # stable: ties by row
        count = self._host_counts
        slot = sorted({s for s, _ in order})
        seg = [u for u, c in enumerate(count) for _ in range(c)]
        pos = [p for c in count for p in range(c)]
        return [i for _, i in order], slot, count, seg, pos, [s for s, _ in order]

    def host_groups(self) -> list[tuple[int, list[int]]] | None:
        """[(slot, its batch rows in arrival order)], ascending slot, on the host; None unless the
        batch is a CPU one built from_list (the grouping the torch view already made)."""
        host = self._host_lists
        if host is None:
            return None
        rows, slot, count = host[0], host[1], host[2]
        out, at = [], 0
        for s, c in zip(slot, count):
            out.append((s, rows[at:at + c]))
            at += c
        return out

    def _host_tensor(self, field: int) -> torch.Tensor:
        made = self.__dict__.setdefault("_host_made", {})
        if field not in made:
            made[field] = torch.tensor(self._host_lists[field], dtype=torch.int64)
        return made[field]

    def _field(self, field: int) -> torch.Tensor:
        if self._host_lists is not None:
            return self._host_tensor(field)
        if field == 5:
            return self._row_slot
        return self._groups[field]

    @cached_property
    def _row_slot(self) -> torch.Tensor:
        return self.slot.index_select(0, self.seg)

    def _longest_first_groups(self):
        base = self._base
        if base.slot.numel() <= 1:
            return base._groups
        # Move whole groups, longest first; rows inside a group keep arrival order.
        rows, count = base.rows, base.count
        old_starts = count.cumsum(0) - count
        perm = torch.argsort(count, descending=True, stable=True)
        slot, count = base.slot[perm], count[perm]
        seg, pos = _segment_and_position(count)
        return rows[old_starts[perm][seg] + pos], slot, count, seg, pos

    @property
    def rows(self) -> torch.Tensor:
        return self._field(0)

    @property
    def slot(self) -> torch.Tensor:
        return self._field(1)

    @property
    def count(self) -> torch.Tensor:
        return self._field(2)

    @property
    def seg(self) -> torch.Tensor:
        return self._field(3)

    @property
    def pos(self) -> torch.Tensor:
        return self._field(4)

    @property
    def row_slot(self) -> torch.Tensor:
        """[N]: the slot of each grouped row (slot[seg]), for gathering per-slot values per row."""
        return self._field(5)

    @cached_property
    def counts_list(self) -> list[int]:
        """count on the host (sizes loops and padded buffers; one synchronisation unless the
        batch was built from_list)."""
        if self._host_counts is not None and self._base is None:
            return list(self._host_counts)
        if self._base is not None and self._base._host_counts is not None:
            return sorted(self._base._host_counts, reverse=True)  # the longest-first order of counts
        return self.count.tolist()

    @cached_property
    def rows_in_place(self) -> bool:
        host = self._host_slots if self._base is None else None
        if host is not None and self.device.type == "cpu":  # every row valid and already in slot order
            return all(s >= 0 for s in host) and all(a <= b for a, b in zip(host, host[1:]))
        rows = self.rows
        return bool(rows.numel() == self.size and torch.equal(rows, torch.arange(rows.numel(), device=rows.device)))

    def longest_first(self) -> SlotBatch:
        """The same grouping with groups ordered by row count, longest first (ties: by slot), so
        the groups that still have a row at position p are a prefix. Cached; shares the Triton
        view and the sort with this batch."""
        if self._base is not None:
            return self
        return self._longest_first_view

    @cached_property
    def _longest_first_view(self) -> SlotBatch:
        return SlotBatch(self.slots, _grouped_from=self)

    @property
    def num_rows(self) -> int:
        """N: the valid rows."""
        host = self._host_lists
        return len(host[0]) if host is not None else self.rows.numel()

    @property
    def num_segments(self) -> int:
        """U: the slots with rows."""
        host = self._host_lists
        return len(host[1]) if host is not None else self.slot.numel()

    @property
    def max_count(self) -> int:
        return max(self.counts_list, default=0)

    @property
    def is_rectangular(self) -> bool:
        """Every group has max_count rows: grouped rows are already a [U, L] grid."""
        return self.num_rows == self.num_segments * self.max_count

    def unpad(self, values: torch.Tensor) -> torch.Tensor:
        """[U, L, ...] -> [N, ...] in grouped order (inverse of padded)."""
        if self.is_rectangular:
            return values.reshape((self.num_rows,) + tuple(values.shape[2:]))
        return values[self.seg, self.pos]

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, ...] -> [N, ...] in grouped order (no copy when the batch already is)."""
        if self.rows_in_place and self.num_rows == values.shape[0]:
            return values
        return values.index_select(0, self.rows)

    def first_rows(self) -> torch.Tensor:
        """The first (earliest) batch row of every group, [U]."""
        return self.rows[self.count.cumsum(0) - self.count]

    def padded(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """values [N, ...] in grouped order -> zero-padded [U, length, ...]."""
        if self.is_rectangular and length == self.max_count:
            return values.view((self.num_segments, length) + tuple(values.shape[1:]))
        out = values.new_zeros((self.num_segments, length) + tuple(values.shape[1:]))
        out[self.seg, self.pos] = values
        return out

    # ---- the profile and the torch code path it picks --------------------------------------

    @property
    def profile(self) -> tuple[int, ...]:
        """The row counts of the slots with rows, longest first (host values)."""
        return tuple(sorted(self.counts_list, reverse=True))

    @property
    def torch_path(self) -> str:
        """The torch path's grouping for this profile: "one_slot", "padded" or "per_row" (see the
        module docstring); "empty" without valid rows."""
        if self.num_segments == 0:
            return "empty"
        if self.num_segments == 1:
            return "one_slot"
        if self.num_segments * self.max_count <= 2 * self.num_rows + PADDED_SLACK_ROWS:
            return "padded"
        return "per_row"

    def other_counts(self, slot: int) -> list[int]:
        """Row counts of the other slots of the call (ascending slot): what a log keeps next to
        slot's rows for replay_slots."""
        return [c for s, c in zip(self.slot.tolist(), self.counts_list) if s != slot]

    # ---- Triton view ------------------------------------------------------------------------

    @cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._base is not None:
            return self._base._sorted
        sorted_slots, order = torch.sort(self.slots.long(), stable=True)
        seg_start = torch.searchsorted(sorted_slots, sorted_slots, right=False)
        seg_end = torch.searchsorted(sorted_slots, sorted_slots, right=True)
        return order.contiguous(), sorted_slots.contiguous(), seg_start, seg_end

    @property
    def order(self) -> torch.Tensor:
        """[B]: the batch row at each sorted position (skipped rows first)."""
        return self._sorted[0]

    @property
    def sorted_slots(self) -> torch.Tensor:
        """[B]: the slot at each sorted position."""
        return self._sorted[1]

    @property
    def seg_start(self) -> torch.Tensor:
        """[B]: the first sorted position of that slot's rows."""
        return self._sorted[2]

    @property
    def seg_end(self) -> torch.Tensor:
        """[B]: one past the last."""
        return self._sorted[3]

    def segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first [B], count [1] int32): the sorted position where each slot's rows begin (the
        skipped rows' group included), compacted to the front in ascending order and padded
        with B, and how many there are. Kernels loop over this list instead of launching a
        program per row that mostly returns at once."""
        return self.row_tiles(0)

    def row_tiles(self, rows_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like segments(), for tiles of up to rows_per_tile consecutive rows of one slot
        (0: whole segments): positions p with (p - seg_start[p]) % rows_per_tile == 0."""
        base = self._base if self._base is not None else self
        cache = base.__dict__.setdefault("_tile_lists", {})
        if rows_per_tile not in cache:
            B = self.size
            positions = torch.arange(B, device=self.device)
            offset = positions - self.seg_start
            starts = offset == 0 if rows_per_tile == 0 else offset % rows_per_tile == 0
            cache[rows_per_tile] = compact_positions(starts)
        return cache[rows_per_tile]

    def __repr__(self) -> str:
        view = ", longest first" if self._base is not None else ""
        return f"SlotBatch({self.size} rows on {self.device}{view})"


def replay_slots(own_rows: int, others: Sequence[int]) -> list[int]:
    """The slots [B] of a replay call with the live call's profile: the replayed session's
    own_rows rows at slot 0 first, then others[u] rows of stand-in slot u + 1 for each u.

        replay_slots(2, [3, 1]) == [0, 0, 1, 1, 1, 2]

    The caller fills the stand-in rows and slots with anything finite (zeros); see the module
    docstring for why this reproduces the live call's values for slot 0 on the torch path."""
    if own_rows < 1 or any(c < 1 for c in others):
        raise ValueError(f"row counts must be positive, got own_rows={own_rows}, others={list(others)}")
    return [0] * own_rows + [u + 1 for u, c in enumerate(others) for _ in range(c)]


def compact_positions(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flags [B] bool -> (the indices where flags is true, ascending, padded with B to length B;
    their number as an int32 tensor [1]), with device ops only (no synchronisation)."""
    B = flags.numel()
    out = torch.full((B + 1,), B, dtype=torch.int64, device=flags.device)
    target = torch.where(flags, torch.cumsum(flags, 0) - 1, B)
    out.scatter_(0, target, torch.arange(B, device=flags.device))  # unflagged rows all land on out[B]
    out[B] = B
    return out[:B].contiguous(), flags.sum().to(torch.int32).reshape(1)


def _segment_and_position(count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For consecutive groups of the given lengths: each row's group and its position in it."""
    seg = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    pos = torch.arange(seg.numel(), device=count.device) - (count.cumsum(0) - count)[seg]
    return seg, pos

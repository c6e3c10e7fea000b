"""Batched torch implementations of the head ops (the CPU path).

No Python loop runs over sessions. Rows are grouped into per-slot segments once (a stable sort,
so a segment keeps arrival order); every op then works on the U touched slots at once:
gathered heads, batched matmuls, index_add_. The sequential rules (delta, RLS) loop over the
position within a segment — at most the largest number of rows any one slot has in the batch,
usually a handful — and each step updates every slot that still has a row, vectorised.

Math and semantics: see the docstrings of the public ops (kernels/ops.py) and kernels/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


@dataclass
class Segments:
    """Valid rows (slot >= 0) grouped by slot; each group keeps arrival order."""

    rows: torch.Tensor  # [N] row indices into the batch, grouped by segment
    slot: torch.Tensor  # [U] the slot of each segment
    count: torch.Tensor  # [U] rows per segment
    seg: torch.Tensor  # [N] segment of each grouped row
    pos: torch.Tensor  # [N] position of each grouped row inside its segment
    counts_list: list[int]  # count, on the host (sizes loops and padded buffers)
    rows_in_place: bool = False  # rows == arange(N): the batch is already grouped

    @property
    def num_segments(self) -> int:
        return len(self.counts_list)

    @property
    def max_count(self) -> int:
        return max(self.counts_list, default=0)

    @property
    def is_rectangular(self) -> bool:
        """Every segment has max_count rows: grouped rows are already a [U, L] grid."""
        return self.rows.numel() == self.num_segments * self.max_count

    def unpad(self, values: torch.Tensor) -> torch.Tensor:
        """[U, L, ...] -> [N, ...] in grouped order (inverse of padded)."""
        if self.is_rectangular:
            return values.reshape((self.rows.numel(),) + tuple(values.shape[2:]))
        return values[self.seg, self.pos]

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, ...] -> [N, ...] in grouped order (no copy when the batch already is)."""
        if self.rows_in_place and self.rows.numel() == values.shape[0]:
            return values
        return values.index_select(0, self.rows)

    def first_rows(self) -> torch.Tensor:
        """The first (earliest) batch row of every segment, [U]."""
        return self.rows[self.count.cumsum(0) - self.count]

    def padded(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """values [N, ...] in grouped order -> zero-padded [U, length, ...]."""
        if self.is_rectangular and length == self.max_count:
            return values.view((self.num_segments, length) + tuple(values.shape[1:]))
        out = values.new_zeros((self.num_segments, length) + tuple(values.shape[1:]))
        out[self.seg, self.pos] = values
        return out


def segments(slots: torch.Tensor, by_count: bool = False) -> Segments:
    """Group the batch rows by slot. With by_count, segments are ordered longest first, so the
    segments that still have a row at position p are exactly the first few (a prefix)."""
    slots = slots.long()
    valid_rows = (slots >= 0).nonzero().squeeze(1)
    sorted_slots, order = torch.sort(slots[valid_rows], stable=True)
    rows = valid_rows[order]
    slot, count = torch.unique_consecutive(sorted_slots, return_counts=True)
    if by_count and slot.numel() > 1:
        # Move whole segments, longest first; rows inside a segment keep arrival order.
        old_starts = count.cumsum(0) - count
        perm = torch.argsort(count, descending=True, stable=True)
        slot, count = slot[perm], count[perm]
        seg, pos = _segment_and_position(count)
        rows = rows[old_starts[perm][seg] + pos]
    else:
        seg, pos = _segment_and_position(count)
    in_place = bool(rows.numel() == slots.numel() and torch.equal(rows, torch.arange(rows.numel(), device=rows.device)))
    return Segments(rows, slot, count, seg, pos, count.tolist(), in_place)


def _segment_and_position(count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For consecutive segments of the given lengths: each row's segment and its position in it."""
    seg = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    pos = torch.arange(seg.numel(), device=count.device) - (count.cumsum(0) - count)[seg]
    return seg, pos


def _padding_is_cheap(seg: Segments) -> bool:
    """Padded [U, L, .] buffers waste (U*L - N) rows; accept them while they stay comparable to N."""
    n = seg.rows.numel()
    return seg.num_segments * seg.max_count <= 2 * n + 64


def _grouped_matvec(xr: torch.Tensor, heads: torch.Tensor, seg: Segments) -> torch.Tensor:
    """out[j] = heads[seg.seg[j]] @ xr[j]: xr [N, d] grouped rows, heads [U, C, d] -> [N, C]."""
    if seg.num_segments == 1:
        return xr @ heads[0].T
    if _padding_is_cheap(seg):
        # Rows sharing a slot become one small GEMM each, batched: heads are read once per slot.
        out = torch.bmm(heads, seg.padded(xr, seg.max_count).transpose(1, 2))  # [U, C, L]
        return seg.unpad(out.transpose(1, 2))
    return torch.bmm(heads.index_select(0, seg.seg), xr.unsqueeze(2)).squeeze(2)


def _add_grouped_outer(heads: torch.Tensor, g: torch.Tensor, xr: torch.Tensor, seg: Segments) -> None:
    """heads[u] += sum over rows j of segment u of g[j] x[j]^T, in place: heads [U, C, d],
    g [N, C], xr [N, d]."""
    if seg.num_segments == 1:
        heads[0].addmm_(g.T, xr)
    elif _padding_is_cheap(seg):
        length = seg.max_count
        heads.baddbmm_(seg.padded(g, length).transpose(1, 2), seg.padded(xr, length))
    else:
        heads.index_add_(0, seg.seg, g.unsqueeze(2) * xr.unsqueeze(1))


def _live_classes(n_classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[U, C] bool: class c is live for a slot with n classes iff c < n."""
    return torch.arange(num_classes, device=n_classes.device) < n_classes.unsqueeze(1)


def head_forward_torch(x, W, b, slots, n_classes, normalize=None) -> torch.Tensor:
    B, C = x.shape[0], W.shape[1]
    out = torch.zeros((B, C), dtype=torch.float32, device=x.device)
    seg = segments(slots)
    if seg.rows.numel() == 0:
        return out
    xr = seg.gather_rows(x).float()
    if normalize is not None:
        unit_rows = normalize[seg.slot].bool()[seg.seg]
        xr = torch.where(unit_rows.unsqueeze(1), F.normalize(xr, dim=1, eps=NORM_EPS), xr)
    logits = _grouped_matvec(xr, W.index_select(0, seg.slot), seg) + b.index_select(0, seg.slot).index_select(0, seg.seg)
    live = _live_classes(n_classes[seg.slot], C)[seg.seg]
    out.index_copy_(0, seg.rows, logits.masked_fill_(~live, float("-inf")))
    return out


def gathered_logits(x, W, b, n_classes, seg: Segments):
    """The touched heads and their masked logits, for the gradient ops: grouped rows xr [N, d],
    gathered heads [U, C, d] (a copy, updated in place and written back by the caller), live
    classes [U, C] and logits [N, C] with -inf on masked classes."""
    xr = seg.gather_rows(x).float()
    heads = W.index_select(0, seg.slot)
    live = _live_classes(n_classes.index_select(0, seg.slot), W.shape[1])
    logits = _grouped_matvec(xr, heads, seg) + b.index_select(0, seg.slot).index_select(0, seg.seg)
    return xr, heads, live, logits.masked_fill_(~live[seg.seg], float("-inf"))


def sgd_step_torch(x, y, slots, W, b, n_classes, lr, weight_decay) -> None:
    """lr, weight_decay: float32 [S]. One gather of the touched heads, a batched GEMM for the
    logits, the decay and the gradient step fused into one in-place batched GEMM, one copy back."""
    seg = segments(slots)
    if seg.rows.numel() == 0:
        return
    C = W.shape[1]
    xr, heads, live, logits = gathered_logits(x, W, b, n_classes, seg)
    g = torch.softmax(logits, dim=1)
    g[torch.arange(g.shape[0], device=g.device), y[seg.rows]] -= 1.0  # p - onehot(y); 0 on masked classes
    lr_u = lr.index_select(0, seg.slot)
    # Fold "- lr / rows of the slot" into the small [N, C] factor so the big update is one GEMM.
    step = g * (-lr_u / seg.count)[seg.seg].unsqueeze(1)

    wd_u = weight_decay.index_select(0, seg.slot)
    if bool((wd_u != 0).any()):
        heads.mul_(torch.where(live, 1.0 - lr_u.unsqueeze(1) * wd_u.unsqueeze(1), 1.0).unsqueeze(2))
    _add_grouped_outer(heads, step, xr, seg)
    W.index_copy_(0, seg.slot, heads)
    b.index_add_(0, seg.slot, step.new_zeros((seg.num_segments, C)).index_add_(0, seg.seg, step))


def delta_step_torch(x, y, slots, W, n_classes, beta) -> None:
    """beta: float32 [S]. Loops over the position within a slot's rows (sequential semantics),
    vectorised over all slots that have a row at that position."""
    seg = segments(slots, by_count=True)
    if seg.rows.numel() == 0:
        return
    C = W.shape[1]
    keys = F.normalize(seg.gather_rows(x).float(), dim=1, eps=NORM_EPS)
    table = seg.padded(torch.arange(seg.rows.numel(), device=x.device), seg.max_count)
    labels = y[seg.rows].long()
    heads = W.index_select(0, seg.slot)
    live = _live_classes(n_classes[seg.slot], C)
    beta_u = beta[seg.slot].unsqueeze(1)
    for p, active in enumerate(_active_prefix_sizes(seg.counts_list)):
        j = table[:active, p]
        k = keys.index_select(0, j)
        target = F.one_hot(labels[j], C).float()
        error = target - torch.bmm(heads[:active], k.unsqueeze(2)).squeeze(2)
        error = torch.where(live[:active], error * beta_u[:active], 0.0)
        heads[:active].baddbmm_(error.unsqueeze(2), k.unsqueeze(1))
    W.index_copy_(0, seg.slot, heads)


def prototype_step_torch(x, y, slots, state_rows, sums, counts, W, n_classes, temperature) -> None:
    """temperature: float32 [S]. Scatter-adds into the class sums, then rewrites every touched
    head from its sums in one batched normalisation."""
    seg = segments(slots)
    if seg.rows.numel() == 0:
        return
    C = W.shape[1]
    r, labels = state_rows[seg.rows].long(), y[seg.rows].long()
    sums.index_put_((r, labels), seg.gather_rows(x).float(), accumulate=True)
    counts.index_put_((r, labels), torch.ones_like(labels, dtype=counts.dtype), accumulate=True)

    state_u = state_rows[seg.first_rows()].long()
    class_sums, class_counts = sums[state_u], counts[state_u]
    means = class_sums / class_counts.clamp_min(1.0).unsqueeze(2)
    heads = F.normalize(means, dim=2, eps=NORM_EPS) * temperature[seg.slot].view(-1, 1, 1)
    keep = (class_counts > 0) & _live_classes(n_classes[seg.slot], C)
    W.index_copy_(0, seg.slot, torch.where(keep.unsqueeze(2), heads, 0.0))


def rls_step_torch(x, y, slots, state_rows, W, P, n_classes) -> None:
    """Loops over the position within a slot's rows, vectorised over slots. P is updated as
    P - s s^T with s = k / sqrt(1 + x^T k), which keeps it exactly symmetric."""
    seg = segments(slots, by_count=True)
    if seg.rows.numel() == 0:
        return
    C = W.shape[1]
    xr = seg.gather_rows(x).float()
    table = seg.padded(torch.arange(seg.rows.numel(), device=x.device), seg.max_count)
    labels = y[seg.rows].long()
    state_u = state_rows[seg.first_rows()].long()
    heads, inverses = W.index_select(0, seg.slot), P.index_select(0, state_u)
    live = _live_classes(n_classes[seg.slot], C)
    for p, active in enumerate(_active_prefix_sizes(seg.counts_list)):
        j = table[:active, p]
        xa = xr.index_select(0, j)
        k = torch.bmm(inverses[:active], xa.unsqueeze(2)).squeeze(2)
        denom = 1.0 + (xa * k).sum(1, keepdim=True)
        target = F.one_hot(labels[j], C).float()
        error = target - torch.bmm(heads[:active], xa.unsqueeze(2)).squeeze(2)
        error = torch.where(live[:active], error, 0.0)
        heads[:active].baddbmm_(error.unsqueeze(2), (k / denom).unsqueeze(1))
        s = k * denom.rsqrt()
        inverses[:active].baddbmm_(s.unsqueeze(2), s.unsqueeze(1), alpha=-1.0)
    W.index_copy_(0, seg.slot, heads)
    P.index_copy_(0, state_u, inverses)


def _active_prefix_sizes(counts_desc: list[int]) -> list[int]:
    """For segments sorted longest first: how many have a row at position p, for every p."""
    sizes, active = [], len(counts_desc)
    for p in range(counts_desc[0] if counts_desc else 0):
        while counts_desc[active - 1] <= p:
            active -= 1
        sizes.append(active)
    return sizes

"""Batched torch paths of the label-free head ops (kernels/label_free_ops.py), the CPU path.

Like kernels/torch_ops.py: the call's rows are grouped by slot once (kernels.slot_batch, arrival
order kept inside a group), no Python loop runs over sessions, and the operations below and
their order are part of the replay contract of kernels/slot_batch.py (a slot's values depend on
its own rows, head and state, and on the call's profile only).

Math: the docstrings of kernels/label_free_ops.py and kernels/label_free_reference.py.
"""

from __future__ import annotations

import torch

from .label_free_reference import STATS_EPS
from .slot_batch import SlotBatch


def _batch(slots: torch.Tensor, batch: SlotBatch | None) -> SlotBatch:
    return SlotBatch(slots) if batch is None else batch


def _at_slots(value: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """A hyper-parameter tensor ([1]: one value for every slot, or [S]) at the given slots."""
    return value.expand(slot_index.numel()) if value.numel() == 1 else value.index_select(0, slot_index)


def _live(n_classes: torch.Tensor, C: int) -> torch.Tensor:
    return torch.arange(C, device=n_classes.device) < n_classes.unsqueeze(1)


def affine(mean_r, var_r, src_mean_r, src_var_r, power_r):
    """(a, t) [U, d]: x' = a * x + t re-standardises onto the source statistics."""
    a = torch.pow((src_var_r + STATS_EPS) / (var_r + STATS_EPS), 0.5 * power_r.unsqueeze(1))
    return a, src_mean_r - a * mean_r


def feature_stats_step_torch(x, slots, state_rows, count, mean, var, window, batch=None) -> None:
    """window: float32 [1] or [S]. Segment sums with index_add_ (rows added in arrival order),
    a two-pass batch variance, one merge per slot."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    U, d = seg.num_segments, x.shape[1]
    xr = seg.gather_rows(x).float()
    k = seg.count.to(torch.float32)
    m_b = xr.new_zeros((U, d)).index_add_(0, seg.seg, xr) / k.unsqueeze(1)
    dev = xr - m_b.index_select(0, seg.seg)
    v_b = xr.new_zeros((U, d)).index_add_(0, seg.seg, dev * dev) / k.unsqueeze(1)
    r = state_rows.index_select(0, seg.first_rows()).long()
    n = count.index_select(0, r)[:, 0]
    N = torch.minimum(n + k, _at_slots(window, seg.slot))
    w = torch.clamp(k / N, max=1.0).unsqueeze(1)
    old_mean, old_var = mean.index_select(0, r), var.index_select(0, r)
    delta = m_b - old_mean
    mean.index_copy_(0, r, old_mean + w * delta)
    var.index_copy_(0, r, (1.0 - w) * old_var + w * v_b + w * (1.0 - w) * delta * delta)
    count.index_copy_(0, r, N.unsqueeze(1))


def standardize_features_torch(x, slots, state_rows, mean, var, src_mean, src_var, power) -> torch.Tensor:
    """power: float32 [1] or [S]. Row-wise; returns float32 [B, d] (0 for rows of slot -1)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    valid = (slots >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return out
    r = state_rows.index_select(0, valid).long()
    a, t = affine(mean.index_select(0, r), var.index_select(0, r), src_mean.index_select(0, r),
                  src_var.index_select(0, r), _at_slots(power, slots.index_select(0, valid).long()))
    out.index_copy_(0, valid, a * x.index_select(0, valid).float() + t)
    return out


def standardized_head_torch(slots, state_rows, mean, var, src_mean, src_var, V, c0, W, b, n_classes, power,
                            batch=None) -> None:
    """power: float32 [S]. One gather of the touched slots' state, one batched product for the
    biases, live classes written back."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    C = W.shape[1]
    r = state_rows.index_select(0, seg.first_rows()).long()
    a, t = affine(mean.index_select(0, r), var.index_select(0, r), src_mean.index_select(0, r),
                  src_var.index_select(0, r), power.index_select(0, seg.slot))
    Vr = V.index_select(0, r)  # [U, C, d]
    new_W = Vr * a.unsqueeze(1)
    new_b = c0.index_select(0, r) + torch.bmm(Vr, t.unsqueeze(2)).squeeze(2)
    live = _live(n_classes.index_select(0, seg.slot), C)
    W.index_copy_(0, seg.slot, torch.where(live.unsqueeze(2), new_W.to(W.dtype), W.index_select(0, seg.slot)))
    b.index_copy_(0, seg.slot, torch.where(live, new_b.to(b.dtype), b.index_select(0, seg.slot)))


def affinity_step_torch(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory, batch=None) -> None:
    """lam, memory: float32 [S]. Grouped products like kernels/torch_ops.py's gradient ops: one
    gather of the touched heads and memories, batched products per grouping, one write back."""
    from .torch_ops import _add_grouped_outer, _grouped_matvec

    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    C = W.shape[1]
    r = state_rows.index_select(0, seg.first_rows()).long()
    mean_u, var_u = mean.index_select(0, r), var.index_select(0, r)
    sigma = var_u.sum(1).clamp_min(STATS_EPS).sqrt()  # [U]
    xr = seg.gather_rows(x).float()
    u = (xr - mean_u.index_select(0, seg.seg)) / sigma.index_select(0, seg.seg).unsqueeze(1)
    heads, mem = W.index_select(0, seg.slot).float(), M.index_select(0, r)
    live = _live(n_classes.index_select(0, seg.slot), C)
    lam_u = lam.index_select(0, seg.slot)
    bias = b.index_select(0, seg.slot).float()
    logits = (_grouped_matvec(xr, heads, seg) + bias.index_select(0, seg.seg)
              + lam_u.index_select(0, seg.seg).unsqueeze(1) * _grouped_matvec(u, mem, seg))
    z = torch.softmax(logits.masked_fill(~live.index_select(0, seg.seg), float("-inf")), dim=1)
    k = seg.count.to(torch.float32)
    rho = torch.pow(1.0 - 1.0 / memory.index_select(0, seg.slot), k)  # [U]
    new = torch.zeros_like(mem)
    _add_grouped_outer(new, z * ((1.0 - rho) / k).index_select(0, seg.seg).unsqueeze(1), u, seg)
    new = torch.where(live.unsqueeze(2), new + rho.view(-1, 1, 1) * mem, mem)
    M.index_copy_(0, r, new)
    scale = (lam_u / sigma).view(-1, 1, 1)
    W.index_copy_(0, seg.slot, torch.where(live.unsqueeze(2), heads + scale * new, heads).to(W.dtype))
    new_b = bias - scale.view(-1, 1) * torch.bmm(new, mean_u.unsqueeze(2)).squeeze(2)
    b.index_copy_(0, seg.slot, torch.where(live, new_b, bias).to(b.dtype))

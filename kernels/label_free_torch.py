"""Batched torch implementations of the label-free head ops (the CPU path): capped per-class
supports (support_step) and entropy minimisation on the head (entropy_step).

Same conventions as kernels/torch_path.py (whose segment helpers they reuse): no Python loop
over sessions; the sequential part of support_step loops over the position within a
(slot, class) group, vectorised across groups.

Math and semantics: kernels/ops.py and kernels/reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_path import NORM_EPS, _add_grouped_outer, _live_classes, gathered_logits, segments


def support_step_torch(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                       temperature) -> None:
    """capacity, temperature: float32 [S]."""
    valid = (slots >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return
    C, K = W.shape[1], supports.shape[2]
    # Groups of rows sharing (slot, class), each in arrival order.
    key = slots.long().index_select(0, valid) * C + y.long().index_select(0, valid)
    sorted_key, order = torch.sort(key, stable=True)
    rows = valid[order]
    _, count = torch.unique_consecutive(sorted_key, return_counts=True)
    first = count.cumsum(0) - count
    lead = rows[first]  # one row of every group
    g_slot, g_class, g_state = slots[lead].long(), y[lead].long(), state_rows[lead].long()
    cap = capacity.index_select(0, g_slot).long().clamp(0, K)
    in_cap = torch.arange(K, device=x.device) < cap.unsqueeze(1)  # [G, K]

    units = F.normalize(x.index_select(0, rows).float(), dim=1, eps=NORM_EPS)
    prio = priority.index_select(0, rows).float()
    E = torch.where(in_cap, support_priority[g_state, g_class], float("-inf"))  # [G, K]; beyond cap never chosen
    feats = supports[g_state, g_class]  # [G, K, d] (a copy)
    counts_list = count.tolist()
    for p in range(max(counts_list)):
        groups = (count > p).nonzero().squeeze(1)
        j = first.index_select(0, groups) + p
        worst, where = E.index_select(0, groups).max(1)  # first index of the maximum
        take = prio.index_select(0, j) < worst
        groups, where, j = groups[take], where[take], j[take]
        E[groups, where] = prio[j]
        feats[groups, where] = units[j]
    support_priority[g_state, g_class] = torch.where(in_cap, E, support_priority[g_state, g_class])
    supports[g_state, g_class] = feats

    # Rewrite every live class of every touched slot from its supports.
    seg = segments(slots)
    slot_u = seg.slot
    state_u = state_rows[seg.first_rows()].long()
    live = _live_classes(n_classes.index_select(0, slot_u), C)  # [U, C]
    u, c = live.nonzero(as_tuple=True)
    cap_u = capacity.index_select(0, slot_u).long().clamp(0, K)[u]
    keep = (torch.arange(K, device=x.device) < cap_u.unsqueeze(1)) & support_priority[state_u[u], c].isfinite()
    m = torch.where(keep.unsqueeze(2), supports[state_u[u], c], 0.0).sum(1)  # [L, d]
    heads = W.index_select(0, slot_u)
    heads[u, c] = F.normalize(m, dim=1, eps=NORM_EPS) * temperature.index_select(0, slot_u)[u].unsqueeze(1)
    W.index_copy_(0, slot_u, heads)


def entropy_step_torch(x, y, slots, W, b, n_classes, lr, min_confidence) -> None:
    """lr, min_confidence: float32 [S]. Like sgd_step_torch, with per-row gradients of the
    entropy (unlabelled rows) or the cross-entropy (labelled rows) and the mean over the rows
    that count."""
    seg = segments(slots)
    if seg.rows.numel() == 0:
        return
    xr, heads, live, logits = gathered_logits(x, W, b, n_classes, seg)
    p = torch.softmax(logits, dim=1)
    logp = torch.log_softmax(logits, dim=1)
    plogp = torch.where(p > 0, p * logp, 0.0)
    H = -plogp.sum(1, keepdim=True)
    g_ent = -torch.where(p > 0, p * (logp + H), 0.0)
    labels = y.index_select(0, seg.rows).long()
    labelled = labels >= 0
    g_ce = p.clone()
    g_ce[torch.arange(p.shape[0], device=p.device), labels.clamp_min(0)] -= 1.0
    confident = p.max(1).values >= min_confidence.index_select(0, seg.slot)[seg.seg]
    counts = labelled | confident
    g = torch.where(labelled.unsqueeze(1), g_ce, torch.where(confident.unsqueeze(1), g_ent, 0.0))
    m = torch.zeros(seg.num_segments, device=x.device).index_add_(0, seg.seg, counts.float())
    lr_u = lr.index_select(0, seg.slot)
    step = g * (-lr_u / m.clamp_min(1.0))[seg.seg].unsqueeze(1)
    _add_grouped_outer(heads, step, xr, seg)
    W.index_copy_(0, seg.slot, heads)
    b.index_add_(0, seg.slot, step.new_zeros((seg.num_segments, W.shape[1])).index_add_(0, seg.seg, step))

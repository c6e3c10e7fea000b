"""Batched torch implementations of the head ops (the CPU path), label-free ones included.

No Python loop runs over sessions. The call's rows are grouped by slot once (kernels.slot_batch:
a stable sort, so a group keeps arrival order); every op then works on the U touched slots at
once: gathered heads, batched matmuls, index_add_. The sequential rules (delta, RLS) loop over
the position within a group — at most the largest number of rows any one slot has in the
batch, usually a handful — and each step updates every slot that still has a row, vectorised;
support_step's sequential part loops over the position within a (slot, class) group.

Which grouped product runs is SlotBatch.torch_path, a function of the call's profile (its
per-slot row counts): the shape -> code path contract of kernels/slot_batch.py, which exact
log replay relies on. The operations below and their order are part of that contract: stored
write-ahead logs are replayed bit for bit.

Math and semantics: see the docstrings of the public ops (kernels/ops.py) and kernels/reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .slot_batch import SlotBatch

NORM_EPS = 1e-12


def _batch(slots: torch.Tensor, batch: SlotBatch | None) -> SlotBatch:
    return SlotBatch(slots) if batch is None else batch


def _grouped_matvec(xr: torch.Tensor, heads: torch.Tensor, seg: SlotBatch) -> torch.Tensor:
    """out[j] = heads[seg.seg[j]] @ xr[j]: xr [N, d] grouped rows, heads [U, C, d] -> [N, C]."""
    path = seg.torch_path
    if path == "one_slot":
        return xr @ heads[0].T
    if path == "padded":
        # Rows sharing a slot become one small GEMM each, batched: heads are read once per slot.
        out = torch.bmm(heads, seg.padded(xr, seg.max_count).transpose(1, 2))  # [U, C, L]
        return seg.unpad(out.transpose(1, 2))
    return torch.bmm(heads.index_select(0, seg.seg), xr.unsqueeze(2)).squeeze(2)


def _add_grouped_outer(heads: torch.Tensor, g: torch.Tensor, xr: torch.Tensor, seg: SlotBatch) -> None:
    """heads[u] += sum over rows j of segment u of g[j] x[j]^T, in place: heads [U, C, d],
    g [N, C], xr [N, d]."""
    path = seg.torch_path
    if path == "one_slot":
        heads[0].addmm_(g.T, xr)
    elif path == "padded":
        length = seg.max_count
        heads.baddbmm_(seg.padded(g, length).transpose(1, 2), seg.padded(xr, length))
    else:
        heads.index_add_(0, seg.seg, g.unsqueeze(2) * xr.unsqueeze(1))


def _gather_heads(W: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The heads of these slots as a float32 copy (bf16 storage is upcast once)."""
    return W.index_select(0, slot).float()


def _store_heads(W: torch.Tensor, slot: torch.Tensor, heads: torch.Tensor) -> None:
    W.index_copy_(0, slot, heads.to(W.dtype))


def _add_bias(b: torch.Tensor, slot: torch.Tensor, delta: torch.Tensor) -> None:
    """b[slot] += delta (float32 rows), rounded once for bf16 storage."""
    if b.dtype == torch.float32:
        b.index_add_(0, slot, delta)
    else:
        b.index_copy_(0, slot, (b.index_select(0, slot).float() + delta).to(b.dtype))


def _live_classes(n_classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[U, C] bool: class c is live for a slot with n classes iff c < n."""
    return torch.arange(num_classes, device=n_classes.device) < n_classes.unsqueeze(1)


def head_forward_torch(x, W, b, slots, n_classes, normalize=None, batch=None) -> torch.Tensor:
    B, C = x.shape[0], W.shape[1]
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return torch.zeros((B, C), dtype=torch.float32, device=x.device)
    xr = seg.gather_rows(x).float()
    if normalize is not None:
        unit_rows = normalize.index_select(0, seg.row_slot).bool()
        xr = torch.where(unit_rows.unsqueeze(1), F.normalize(xr, dim=1, eps=NORM_EPS), xr)
    logits = (_grouped_matvec(xr, _gather_heads(W, seg.slot), seg)
              + b.index_select(0, seg.row_slot).float())
    logits = torch.where(_live_classes(n_classes.index_select(0, seg.row_slot), C), logits, float("-inf"))
    if seg.rows_in_place and seg.num_rows == B:  # grouped order is batch order, no row skipped
        return logits
    out = torch.zeros((B, C), dtype=torch.float32, device=x.device)
    out.index_copy_(0, seg.rows, logits)
    return out


def gathered_logits(x, W, b, n_classes, seg: SlotBatch):
    """The touched heads and their masked logits, for the gradient ops: grouped rows xr [N, d],
    gathered heads [U, C, d] (a copy, updated in place and written back by the caller), live
    classes [U, C] and logits [N, C] with -inf on masked classes."""
    xr = seg.gather_rows(x).float()
    heads = _gather_heads(W, seg.slot)
    live = _live_classes(n_classes.index_select(0, seg.slot), W.shape[1])
    logits = _grouped_matvec(xr, heads, seg) + b.index_select(0, seg.row_slot).float()
    return xr, heads, live, torch.where(live.index_select(0, seg.seg), logits, float("-inf"))


def sgd_step_torch(x, y, slots, W, b, n_classes, lr, weight_decay, batch=None, feature_rates=None,
                   bias_rate=None) -> None:
    """lr, weight_decay: float32 [S]. One gather of the touched heads, a batched GEMM for the
    logits, the decay and the gradient step fused into one in-place batched GEMM, one copy back.
    feature_rates (float32 [d]) / bias_rate (a float or float32 [1]), the Meta-SGD rates: the
    gradient's column j is scaled by r[j] by scaling the rows fed to the update GEMM (the
    logits use the unscaled rows; G_W r[None, :] = sum_i g_i (x_i * r)^T / n), the bias step by
    rho. None skips the multiply, so the plain step runs exactly today's operations."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    C = W.shape[1]
    xr, heads, live, logits = gathered_logits(x, W, b, n_classes, seg)
    g = torch.softmax(logits, dim=1)
    g[torch.arange(g.shape[0], device=g.device), seg.gather_rows(y)] -= 1.0  # p - onehot(y); 0 on masked classes
    lr_u = lr.index_select(0, seg.slot)
    # Fold "- lr / rows of the slot" into the small [N, C] factor so the big update is one GEMM.
    step = g * (-lr_u / seg.count)[seg.seg].unsqueeze(1)

    wd_u = weight_decay.index_select(0, seg.slot)
    if bool((wd_u != 0).any()):
        heads.mul_(torch.where(live, 1.0 - lr_u.unsqueeze(1) * wd_u.unsqueeze(1), 1.0).unsqueeze(2))
    # The rates scale after the logits were taken: [N, d] and [U, C] multiplies, never a head.
    _add_grouped_outer(heads, step, xr if feature_rates is None else xr * feature_rates, seg)
    _store_heads(W, seg.slot, heads)
    bias_step = step.new_zeros((seg.num_segments, C)).index_add_(0, seg.seg, step)
    _add_bias(b, seg.slot, bias_step if bias_rate is None else bias_step * bias_rate)


def delta_step_torch(x, y, slots, W, n_classes, beta, batch=None) -> None:
    """beta: float32 [S]. Loops over the position within a slot's rows (sequential semantics),
    vectorised over all slots that have a row at that position."""
    seg = _batch(slots, batch).longest_first()
    if seg.num_rows == 0:
        return
    C = W.shape[1]
    keys = F.normalize(seg.gather_rows(x).float(), dim=1, eps=NORM_EPS)
    table = seg.padded(torch.arange(seg.rows.numel(), device=x.device), seg.max_count)
    labels = y[seg.rows].long()
    heads = _gather_heads(W, seg.slot)
    live = _live_classes(n_classes[seg.slot], C)
    beta_u = beta[seg.slot].unsqueeze(1)
    for p, active in enumerate(_active_prefix_sizes(seg.counts_list)):
        j = table[:active, p]
        k = keys.index_select(0, j)
        target = F.one_hot(labels[j], C).float()
        error = target - torch.bmm(heads[:active], k.unsqueeze(2)).squeeze(2)
        error = torch.where(live[:active], error * beta_u[:active], 0.0)
        heads[:active].baddbmm_(error.unsqueeze(2), k.unsqueeze(1))
    _store_heads(W, seg.slot, heads)


def prototype_step_torch(x, y, slots, state_rows, sums, counts, W, n_classes, temperature, batch=None) -> None:
    """temperature: float32 [S]. Scatter-adds into the class sums, then rewrites the (slot,
    class) cells that received rows from their sums in one batched normalisation."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    C, d = W.shape[1:]
    means, slot_of, cls = accumulate_class_means(x, y, slots, state_rows, sums, counts, n_classes, seg)
    heads = F.normalize(means, dim=1, eps=NORM_EPS) * temperature.index_select(0, slot_of).unsqueeze(1)
    W.view(-1, d).index_copy_(0, slot_of * C + cls, heads.to(W.dtype))


def accumulate_class_means(x, y, slots, state_rows, sums, counts, n_classes, seg: SlotBatch):
    """Every row added into its (state row, class) sum and count, then the means of the live
    cells that received rows -> (means [T, d] float32, their slots [T], their classes [T]).
    The running class statistics of prototype_step and class_mean_head_step."""
    C, d = sums.shape[1:]
    r, labels, rows = state_rows[seg.rows].long(), y[seg.rows].long(), seg.rows
    in_width = (labels >= 0) & (labels < C)
    if not bool(in_width.all()):  # a label past the head's width would address another state row
        r, labels, rows = r[in_width], labels[in_width], rows[in_width]
    cells = r * C + labels
    # Rows of one class add into their sums in arrival order. (index_put_(accumulate=True) on
    # CPU adds with atomics in a thread race once the update has 32768 elements: not
    # reproducible. index_add_ along dim 0 adds row after row; below that size both give the
    # same bits.) Counts add 1.0s, exact in any order. (On CUDA index_add_ would add with
    # atomics; both ops run their Triton kernels there, one program per cell, no atomics.)
    sums.view(-1, d).index_add_(0, cells, x.index_select(0, rows).float())
    counts.index_put_((r, labels), torch.ones_like(labels, dtype=counts.dtype), accumulate=True)

    touched, inverse = torch.unique(cells, return_inverse=True)
    slot_of = torch.empty_like(touched).scatter_(0, inverse, slots.long().index_select(0, rows))
    cls = touched % C
    live = cls < n_classes.index_select(0, slot_of)
    touched, slot_of, cls = touched[live], slot_of[live], cls[live]
    means = sums.view(-1, d).index_select(0, touched) / counts.view(-1).index_select(0, touched).clamp_min(1.0).unsqueeze(1)
    return means, slot_of, cls


def rls_step_torch(x, y, slots, state_rows, W, P, n_classes, batch=None) -> None:
    """Loops over the position within a slot's rows, vectorised over slots. P is updated as
    P - s s^T with s = k / sqrt(1 + x^T k), which keeps it exactly symmetric."""
    seg = _batch(slots, batch).longest_first()
    if seg.num_rows == 0:
        return
    C = W.shape[1]
    xr = seg.gather_rows(x).float()
    table = seg.padded(torch.arange(seg.rows.numel(), device=x.device), seg.max_count)
    labels = y[seg.rows].long()
    state_u = state_rows[seg.first_rows()].long()
    heads, inverses = _gather_heads(W, seg.slot), P.index_select(0, state_u)
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
    _store_heads(W, seg.slot, heads)
    P.index_copy_(0, state_u, inverses)


def _active_prefix_sizes(counts_desc: list[int]) -> list[int]:
    """For segments sorted longest first: how many have a row at position p, for every p."""
    sizes, active = [], len(counts_desc)
    for p in range(counts_desc[0] if counts_desc else 0):
        while counts_desc[active - 1] <= p:
            active -= 1
        sizes.append(active)
    return sizes


def support_step_torch(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                       temperature, batch=None) -> None:
    """capacity, temperature: float32 [S]."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
        return
    C, K, d = W.shape[1], supports.shape[2], W.shape[2]
    valid = seg.rows
    labels = y.long().index_select(0, valid)
    in_width = (labels >= 0) & (labels < C)
    if not bool(in_width.all()):  # a class past the head's width would address another state row
        valid, labels = valid[in_width], labels[in_width]
        if valid.numel() == 0:
            return
    # Groups of rows sharing (slot, class), each in arrival order (a stable sort of the valid rows).
    key = slots.long().index_select(0, valid) * C + labels
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
    counts_list = count.tolist()
    for p in range(max(counts_list)):
        groups = (count > p).nonzero().squeeze(1)
        j = first.index_select(0, groups) + p
        worst, where = E.index_select(0, groups).max(1)  # first index of the maximum
        take = prio.index_select(0, j) < worst
        groups, where, j = groups[take], where[take], j[take]
        E[groups, where] = prio[j]
        # Only the replaced entries are written (one unit row each; the groups' cells are distinct).
        supports[g_state[groups], g_class[groups], where] = units[j]
    support_priority[g_state, g_class] = torch.where(in_cap, E, support_priority[g_state, g_class])

    # Rewrite the live classes that received rows from their kept supports.
    live = g_class < n_classes.index_select(0, g_slot)
    g_slot, g_class, g_state, cap = g_slot[live], g_class[live], g_state[live], cap[live]
    keep = (torch.arange(K, device=x.device) < cap.unsqueeze(1)) & support_priority[g_state, g_class].isfinite()
    m = torch.where(keep.unsqueeze(2), supports[g_state, g_class], 0.0).sum(1)  # [G, d]
    heads = F.normalize(m, dim=1, eps=NORM_EPS) * temperature.index_select(0, g_slot).unsqueeze(1)
    W.view(-1, d).index_copy_(0, g_slot * C + g_class, heads.to(W.dtype))


def entropy_step_torch(x, y, slots, W, b, n_classes, lr, min_confidence, batch=None) -> None:
    """lr, min_confidence: float32 [S]. Like sgd_step_torch, with per-row gradients of the
    entropy (unlabelled rows) or the cross-entropy (labelled rows) and the mean over the rows
    that count."""
    seg = _batch(slots, batch)
    if seg.num_rows == 0:
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
    _store_heads(W, seg.slot, heads)
    _add_bias(b, seg.slot, step.new_zeros((seg.num_segments, W.shape[1])).index_add_(0, seg.seg, step))

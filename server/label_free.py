"""Label-free adaptation rules: what an update means for ``t3a`` and ``tent`` (registered in
server/rules.py). Both learn from unlabelled instances (``label`` omitted in ``/v1/adapt``, or
every ``/v1/predict`` of a session created with ``adapt_on_predict``); labelled instances, when
given, are used as such.

t3a (T3A-style, cosine head over per-class supports; kernels.support_step):
    the session's initial linear head (the base head for init="base", as T3A uses the trained
    classifier; the current cosine head for a zero-init session) pseudo-labels each unlabelled
    row (argmax) and scores it by its normalised entropy H(p) / log(n) in [0, 1]; rows above ``max_entropy`` are dropped, the rest
    compete for their class's ``supports_per_class`` entries (lowest entropy kept). A labelled
    row enters its true class with priority -1, so pseudo-labelled rows never displace it. The
    head is temperature * cosine to each class's support mean. With init="base" every class
    starts with one support: the unit base-head weight row, at priority 0 (kept by every
    pseudo-labelled row, displaced only by labelled ones).

tent (entropy minimisation on the session's head only; kernels.entropy_step):
    one step per request on the mean entropy of the confidently predicted unlabelled rows (max
    probability >= ``min_confidence``) plus the cross-entropy of labelled rows. Collapse guard:
    a per-session histogram of predicted classes decays by (1 - 1/collapse_window) per row;
    once it holds at least collapse_window / 2 and one class has at least ``collapse_share`` of
    it, the head goes back to its initial weights (the base head for init="base") and the
    histogram is cleared. Every reset is counted in ``fwserve_label_free_resets``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

import kernels

SUPPORT_CAPACITY = 32  # support entries per class held in the t3a state pool (the cap's upper bound)


# ---- state at session creation -----------------------------------------------------------------


def t3a_init(n: int, d: int, hyper: dict, head: Optional[dict]) -> dict[str, torch.Tensor]:
    supports = torch.zeros(n, SUPPORT_CAPACITY, d)
    priority = torch.full((n, SUPPORT_CAPACITY), math.inf)
    out = {"supports": supports, "support_priority": priority, "W0": torch.zeros(n, d), "b0": torch.zeros(n)}
    if head is None:
        return out
    W0 = head["W"].float()
    out["W0"], out["b0"] = W0.clone(), head["b"].float().clone()
    seeded = W0.norm(dim=1) > 0
    supports[seeded, 0] = F.normalize(W0[seeded], dim=1)
    priority[seeded, 0] = 0.0
    out["W"] = hyper["temperature"] * supports[:, 0].clone()
    out["b"] = torch.zeros(n)
    return out


def tent_init(n: int, d: int, hyper: dict, head: Optional[dict]) -> dict[str, torch.Tensor]:
    out = {"W0": torch.zeros(n, d), "b0": torch.zeros(n), "class_hist": torch.zeros(n)}
    if head is not None:
        out["W0"], out["b0"] = head["W"].float().clone(), head["b"].float().clone()
    return out


# ---- updates (one grouped kernel call per rule and micro-batch) ---------------------------------


def _entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked logits [B, C] -> (probabilities, entropy [B], argmax [B])."""
    p = torch.softmax(logits, dim=1)
    logp = torch.log_softmax(logits, dim=1)
    H = -torch.where(p > 0, p * logp, 0.0).sum(1)
    return p, H, p.argmax(1)


def t3a_update(heads, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, state_rows: torch.Tensor) -> int:
    h = heads.hyper
    pool = heads.pools["t3a"]
    # Pseudo-labels and entropies from the session's initial linear head (T3A: the base
    # classifier) when it has one, else from its current cosine head (zero-init sessions).
    n_state = torch.zeros(pool["W0"].shape[0], dtype=heads.n_classes.dtype, device=x.device)
    n_state[state_rows] = heads.n_classes.index_select(0, slots)
    anchored = pool["W0"].index_select(0, state_rows).flatten(1).abs().amax(1) > 0
    logits = torch.where(
        anchored.unsqueeze(1),
        kernels.head_forward(x, pool["W0"], pool["b0"], state_rows, n_state),
        kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize))
    _, H, pseudo = _entropy(logits)
    n = heads.n_classes.index_select(0, slots).clamp_min(2).float()
    H = H / n.log()
    labelled = y >= 0
    keep = labelled | (H <= h["max_entropy"].index_select(0, slots))
    cls = torch.where(labelled, y, pseudo)
    priority = torch.where(labelled, -1.0, H)
    kernels.support_step(x, cls, priority, torch.where(keep, slots, -1), state_rows, pool["supports"],
                         pool["support_priority"], heads.W, heads.n_classes, h["supports_per_class"],
                         h["temperature"])
    return 0


def tent_update(heads, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, state_rows: torch.Tensor) -> int:
    """Returns the number of sessions reset by the collapse guard."""
    h = heads.hyper
    logits = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
    pred = logits.argmax(1)
    kernels.entropy_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["lr"], h["min_confidence"])

    pool = heads.pools["tent"]
    slot_u, inverse, rows_u = torch.unique(slots, return_inverse=True, return_counts=True)
    state_u = torch.zeros_like(slot_u).index_copy_(0, inverse, state_rows.long())
    window = h["collapse_window"].index_select(0, slot_u)
    hist = pool["class_hist"].index_select(0, state_u)
    hist *= (1.0 - 1.0 / window).pow(rows_u.float()).unsqueeze(1)
    hist.index_put_((inverse, pred), torch.ones_like(pred, dtype=hist.dtype), accumulate=True)
    mass = hist.sum(1)
    collapsed = (mass >= window / 2) & (hist.max(1).values >= h["collapse_share"].index_select(0, slot_u) * mass)
    hist[collapsed] = 0.0
    pool["class_hist"].index_copy_(0, state_u, hist)
    if not bool(collapsed.any()):
        return 0
    slot_r, state_r = slot_u[collapsed], state_u[collapsed]
    C = heads.W.shape[1]
    live = torch.arange(C, device=x.device) < heads.n_classes.index_select(0, slot_r).unsqueeze(1)
    heads.W[slot_r] = torch.where(live.unsqueeze(2), pool["W0"][state_r], heads.W[slot_r])
    heads.b[slot_r] = torch.where(live, pool["b0"][state_r], heads.b[slot_r])
    return int(collapsed.sum())

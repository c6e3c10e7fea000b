"""tent (label-free, TENT-style): entropy minimisation on the session's head only.

One step per request on the mean entropy of the confidently predicted unlabelled rows (max
probability >= ``min_confidence``) plus the cross-entropy of labelled rows. Collapse guard: a
per-session histogram of predicted classes decays by (1 - 1/collapse_window) per row; once it
holds at least collapse_window / 2 and one class has at least ``collapse_share`` of it, the head
goes back to its initial weights (the base head for init="base") and the histogram is cleared.
Every reset is counted in ``fwserve_label_free_resets`` and reported as a guard trip (the default
guard of tent sessions, server/sessions/guard.py). ``collapse_reset`` false keeps the histogram
but never resets: a session created with a guard gets that, so its guard handles collapse.
Kernels: kernels.head_forward, kernels.entropy_step.
"""

from __future__ import annotations

import torch

import kernels

from server.rules.base import ADAPT_ON_PREDICT, Hyper, Rule, register


class Tent(Rule):
    name = "tent"
    normalize = False
    hyper = {
        "lr": Hyper(0.001, 0.0, 10.0, help="learning rate (0.001 suits features of norm ~10)"),
        "min_confidence": Hyper(0.9, 0.0, 1.0, low_open=False,
                                help="unlabelled rows count only if their top probability reaches this"),
        "collapse_share": Hyper(0.95, 0.0, 1.0, help="reset when one class holds this share of recent predictions"),
        "collapse_window": Hyper(64.0, 1.0, 1e6, low_open=False, help="predictions the class histogram spans"),
        "collapse_reset": Hyper(1.0, 0.0, 1.0, low_open=False, flag=True,
                                help="reset to the initial head on collapse (false: a guard handles it)"),
        "adapt_on_predict": ADAPT_ON_PREDICT,
    }
    state = {"W0": lambda n, d: (n, d), "b0": lambda n, d: (n,), "class_hist": lambda n, d: (n,)}
    base_init = True
    needs_labels = False
    reuses_logits = True
    description = ("label-free: entropy minimisation on the head (TENT, head only) with confidence "
                   "filtering and a reset when predictions collapse onto one class")
    search_space = {"lr": (0.001, 0.003, 0.01, 0.03), "min_confidence": (0.0, 0.5, 0.9),
                    "collapse_window": (64.0, 1e6)}  # 1e6: the guard never fires

    def init_state(self, n, d, hyper, head=None):
        out = {"W0": torch.zeros(n, d), "b0": torch.zeros(n), "class_hist": torch.zeros(n)}
        if head is not None:
            out["W0"], out["b0"] = head["W"].float().clone(), head["b"].float().clone()
        return out

    def update(self, heads, x, y, slots, state_rows, batch=None, logits=None):
        h = heads.hyper
        given = logits
        if logits is None:
            logits = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize,
                                          batch=batch)
        pred = logits.argmax(1)
        kernels.entropy_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["lr"], h["min_confidence"],
                             batch=batch, logits=given)
        return self._collapse_guard(heads, slots, state_rows, pred)

    def _collapse_guard(self, heads, slots, state_rows, pred):
        """-> 0, or the slots reset (a tensor)."""
        h = heads.hyper
        pool = heads.pools[self.name]
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
        collapsed &= h["collapse_reset"].index_select(0, slot_u) > 0
        if not bool(collapsed.any()):
            return 0
        slot_r, state_r = slot_u[collapsed], state_u[collapsed]
        C = heads.W.shape[1]
        live = torch.arange(C, device=slots.device) < heads.n_classes.index_select(0, slot_r).unsqueeze(1)
        heads.W[slot_r] = torch.where(live.unsqueeze(2), pool["W0"][state_r], heads.W[slot_r])
        heads.b[slot_r] = torch.where(live, pool["b0"][state_r], heads.b[slot_r])
        return slot_r


RULE = register(Tent())

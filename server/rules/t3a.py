"""t3a (label-free, T3A-style): a cosine head over per-class supports of confidently
pseudo-labelled features, filtered by entropy and capped per class.

The session's initial linear head (the base head for init="base", as T3A uses the trained
classifier; the current cosine head for a zero-init session) pseudo-labels each unlabelled row
(argmax) and scores it by its normalised entropy H(p) / log(n) in [0, 1]; rows above
``max_entropy`` are dropped, the rest compete for their class's ``supports_per_class`` entries
(lowest entropy kept). A labelled row enters its true class with priority -1, so pseudo-labelled
rows never displace it. The head is temperature * cosine to each class's support mean. With
init="base" every class starts with one support: the unit base-head weight row, at priority 0
(kept by every pseudo-labelled row, displaced only by labelled ones).
Kernels: kernels.head_forward (pseudo-labels), kernels.support_step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels

from server.rules.base import ADAPT_ON_PREDICT, Hyper, Rule, register

SUPPORT_CAPACITY = 32  # support entries per class held in the state pool (the cap's upper bound)


def entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked logits [B, C] -> (probabilities, entropy [B], argmax [B])."""
    p = torch.softmax(logits, dim=1)
    logp = torch.log_softmax(logits, dim=1)
    H = -torch.where(p > 0, p * logp, 0.0).sum(1)
    return p, H, p.argmax(1)


class T3A(Rule):
    name = "t3a"
    normalize = True
    hyper = {
        "temperature": Hyper(10.0, 0.0, 1000.0, help="logit scale of cosine similarities"),
        "supports_per_class": Hyper(20.0, 1.0, float(SUPPORT_CAPACITY), low_open=False,
                                    help="most supports kept per class (lowest entropy first)"),
        "max_entropy": Hyper(0.5, 0.0, 1.0, help="unlabelled rows above this entropy / log(classes) are dropped"),
        "adapt_on_predict": ADAPT_ON_PREDICT,
    }
    state = {"supports": lambda n, d: (n, SUPPORT_CAPACITY, d),
             "support_priority": lambda n, d: (n, SUPPORT_CAPACITY),
             "W0": lambda n, d: (n, d), "b0": lambda n, d: (n,)}
    inf_state = ("support_priority",)
    base_init = True
    needs_labels = False
    reuses_logits = True
    description = ("label-free: cosine head over per-class supports of confidently pseudo-labelled "
                   "features, filtered by entropy and capped per class (T3A)")
    search_space = {"max_entropy": (0.2, 0.5, 1.0), "supports_per_class": (5, 20, 32)}

    def init_state(self, n, d, hyper, head=None):
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

    def update(self, heads, x, y, slots, state_rows, batch=None, logits=None) -> int:
        h = heads.hyper
        pool = heads.pools[self.name]
        # Pseudo-labels and entropies from the session's initial linear head when it has one,
        # else from its current cosine head (zero-init sessions).
        n_state = torch.zeros(pool["W0"].shape[0], dtype=heads.n_classes.dtype, device=x.device)
        n_state[state_rows] = heads.n_classes.index_select(0, slots)
        anchored = pool["W0"].index_select(0, state_rows).flatten(1).abs().amax(1) > 0
        current = logits if logits is not None else kernels.head_forward(
            x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize, batch=batch)
        logits = torch.where(anchored.unsqueeze(1), kernels.head_forward(x, pool["W0"], pool["b0"], state_rows, n_state),
                             current)
        _, H, pseudo = entropy(logits)
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


RULE = register(T3A())

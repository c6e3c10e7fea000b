"""feature_stats_t3a (label-free): t3a's support head built on re-standardised features.

Each request first updates the session's running feature statistics (as feature_stats), then
re-standardises its rows onto the source statistics (x', kernels.standardize_features). The
initial head scores x' to pseudo-label each row and give its normalised entropy; rows that pass
t3a's filter compete for their class's supports (unit x' rows, lowest entropy kept, capped per
class; labelled rows enter their class first), seeded like t3a's with the unit base-head rows.
The head is temperature * unit(support mean) . x' / rho, with rho the root mean square norm of
a source feature (so scores are on a cosine's scale), folded onto raw features like
feature_stats' head. Kernels: kernels.feature_stats_step, kernels.standardize_features,
kernels.head_forward, kernels.support_step, kernels.standardized_head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels

from server.rules.base import ADAPT_ON_PREDICT, Rule, register
from server.rules.feature_stats import STATS_HYPER, STATS_STATE, stats_state, update_stats
from server.rules.t3a import SUPPORT_CAPACITY, T3A, entropy


def _by_state_row(values: torch.Tensor, slots: torch.Tensor, state_rows: torch.Tensor, R: int) -> torch.Tensor:
    """Per-slot values [S] re-indexed by state row [R] (each row's slot at its state row)."""
    out = torch.zeros(R, dtype=values.dtype, device=values.device)
    valid = slots >= 0
    return out.index_copy_(0, state_rows[valid].long(), values.index_select(0, slots[valid].long()))


def source_rms(src_mean: torch.Tensor, src_var: torch.Tensor) -> torch.Tensor:
    """Root mean square norm of a source feature, sqrt(sum(var + mean^2)) ([..., d] -> [...])."""
    return (src_var + src_mean ** 2).sum(-1).sqrt().clamp_min(1e-6)


class FeatureStatsT3A(Rule):
    name = "feature_stats_t3a"
    normalize = False
    hyper = {**STATS_HYPER, **{k: v for k, v in T3A.hyper.items() if k != "adapt_on_predict"},
             "adapt_on_predict": ADAPT_ON_PREDICT}
    state = {**STATS_STATE, "supports": lambda n, d: (n, SUPPORT_CAPACITY, d),
             "support_priority": lambda n, d: (n, SUPPORT_CAPACITY), "V": lambda n, d: (n, d)}
    inf_state = ("support_priority",)
    base_init = True
    needs_labels = False
    description = ("label-free: t3a's capped, entropy-filtered support head built on features re-standardised "
                   "with the session's running statistics (feature_stats composed with t3a)")
    search_space = {"prior_count": (0.0, 16.0), "max_entropy": (0.5, 1.0), "supports_per_class": (5, 20, 32)}

    def init_state(self, n, d, hyper, head=None):
        out = stats_state(self, n, d, hyper, head)
        supports = torch.zeros(n, SUPPORT_CAPACITY, d)
        priority = torch.full((n, SUPPORT_CAPACITY), math.inf)
        out.update(supports=supports, support_priority=priority, V=torch.zeros(n, d))
        if head is None:
            return out
        seeded = out["W0"].norm(dim=1) > 0
        supports[seeded, 0] = F.normalize(out["W0"][seeded], dim=1)
        priority[seeded, 0] = 0.0
        # The support head of the seeds; the statistics start at the source's, so x' = x.
        out["V"] = hyper["temperature"] / source_rms(out["src_mean"], out["src_var"]) * supports[:, 0].clone()
        out["W"], out["b"] = out["V"].clone(), torch.zeros(n)
        return out

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        h = heads.hyper
        pool = heads.pools[self.name]
        update_stats(heads, x, slots, state_rows, pool, batch)
        R = pool["W0"].shape[0]
        xs = kernels.standardize_features(x, slots, state_rows, pool["mean"], pool["var"], pool["src_mean"],
                                          pool["src_var"], h["power"])
        # Pseudo-labels and entropies: the initial head on the standardised rows (state-row space).
        n_state = _by_state_row(heads.n_classes, slots, state_rows, R)
        sr = torch.where(slots >= 0, state_rows.long(), -1)
        logits = kernels.head_forward(xs, pool["W0"], pool["b0"], sr, n_state)
        _, H, pseudo = entropy(logits)
        n = heads.n_classes.index_select(0, slots.clamp_min(0)).clamp_min(2).float()
        H = H / n.log()
        labelled = y >= 0
        keep = (slots >= 0) & (labelled | (H <= h["max_entropy"].index_select(0, slots.clamp_min(0))))
        cls = torch.where(labelled, y, pseudo)
        priority = torch.where(labelled, -1.0, H)
        rho = torch.ones(R, device=x.device).index_copy_(
            0, sr[slots >= 0], source_rms(pool["src_mean"].index_select(0, sr[slots >= 0]),
                                          pool["src_var"].index_select(0, sr[slots >= 0])))
        kernels.support_step(xs, cls, priority, torch.where(keep, sr, -1), state_rows, pool["supports"],
                             pool["support_priority"], pool["V"], n_state,
                             _by_state_row(h["supports_per_class"], slots, state_rows, R),
                             _by_state_row(h["temperature"], slots, state_rows, R) / rho)
        kernels.standardized_head(slots, state_rows, pool["mean"], pool["var"], pool["src_mean"], pool["src_var"],
                                  pool["V"], torch.zeros_like(pool["b0"]), heads.W, heads.b, heads.n_classes,
                                  h["power"], batch=batch)
        return 0


RULE = register(FeatureStatsT3A())

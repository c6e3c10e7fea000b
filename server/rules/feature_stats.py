"""feature_stats (label-free): per-session re-standardisation of frozen features, the
frozen-feature analogue of re-estimating batch-norm statistics at test time.

Every session keeps running estimates of its own feature mean and variance (all its rows so
far, the source statistics counting as ``prior_count`` rows; past ``window`` rows an exponential
moving estimate) and scores with its initial head on re-standardised features

    x' = a * (x - mean) + src_mean,   a = ((src_var + eps) / (var + eps))^(power / 2)   (per dimension)

folded into the head (W = W0 * a, b = b0 + W0 . (src_mean - a * mean)), so the feature cache,
the grouped forward and batching stay as they are. The source statistics are the backbone's
features on its training images (models/source_stats.py), handed to the rule with the base
head; ``init="base"`` needs them. Labels, when given, are not used. An unlabelled request moves
the statistics whatever its classes: they are averages over the session, not per request.
Kernels: kernels.feature_stats_step, kernels.standardized_head.
"""

from __future__ import annotations

from typing import Optional

import torch

import kernels

from server.errors import invalid
from server.rules.base import ADAPT_ON_PREDICT, Hyper, Rule, register

STATS_HYPER = {
    "prior_count": Hyper(16.0, 0.0, 1e9, low_open=False, per_slot=False,
                         help="the source statistics weigh as this many rows in the running estimate"),
    "window": Hyper(1e9, 1.0, 1e9, low_open=False,
                    help="rows the running estimate spans at most (then an exponential moving estimate)"),
    "power": Hyper(1.0, 0.0, 1.0, low_open=False, help="1: match means and variances; 0: means only"),
}
STATS_STATE = {
    "W0": lambda n, d: (n, d), "b0": lambda n, d: (n,),
    "src_mean": lambda n, d: (d,), "src_var": lambda n, d: (d,),
    "mean": lambda n, d: (d,), "var": lambda n, d: (d,), "count": lambda n, d: (1,),
}


def stats_state(rule: Rule, n: int, d: int, hyper: dict, head: Optional[dict]) -> dict[str, torch.Tensor]:
    """The statistics part of a fresh session: the initial head, the source statistics, and the
    running estimate started at them with weight prior_count."""
    out = {"W0": torch.zeros(n, d), "b0": torch.zeros(n), "src_mean": torch.zeros(d), "src_var": torch.ones(d),
           "mean": torch.zeros(d), "var": torch.ones(d), "count": torch.zeros(1)}
    if head is None:
        return out
    W0 = head["W"].float()
    out["W0"], out["b0"] = W0.clone(), head["b"].float().clone()
    if "feature_mean" in head:
        out["src_mean"], out["src_var"] = head["feature_mean"].float().clone(), head["feature_var"].float().clone()
    elif bool((W0 != 0).any()):
        raise invalid("missing_source_stats", f"rule {rule.name!r} re-standardises features onto the backbone's "
                      "source statistics, and this backbone has none (models/source_stats.py)")
    out["mean"], out["var"] = out["src_mean"].clone(), out["src_var"].clone()
    out["count"] = torch.full((1,), float(hyper["prior_count"]))
    return out


def update_stats(heads, x, slots, state_rows, pool, batch) -> None:
    kernels.feature_stats_step(x, slots, state_rows, pool["count"], pool["mean"], pool["var"],
                               heads.hyper["window"], batch=batch)


class FeatureStats(Rule):
    name = "feature_stats"
    normalize = False
    hyper = {**STATS_HYPER, "adapt_on_predict": ADAPT_ON_PREDICT}
    state = STATS_STATE
    base_init = True
    needs_labels = False
    description = ("label-free: re-standardises the session's features with running estimates of their mean "
                   "and variance onto the backbone's source statistics (an affine map folded into the head)")
    search_space = {"prior_count": (0.0, 16.0, 128.0), "power": (0.0, 1.0)}

    def init_state(self, n, d, hyper, head=None):
        return stats_state(self, n, d, hyper, head)

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        pool = heads.pools[self.name]
        update_stats(heads, x, slots, state_rows, pool, batch)
        kernels.standardized_head(slots, state_rows, pool["mean"], pool["var"], pool["src_mean"], pool["src_var"],
                                  pool["W0"], pool["b0"], heads.W, heads.b, heads.n_classes, heads.hyper["power"],
                                  batch=batch)
        return 0


RULE = register(FeatureStats())

"""lame (label-free, LAME-style): output smoothing by a Laplacian term over the session's recent
rows, on top of feature_stats' re-standardised head; the initial head is never trained.

LAME corrects a batch's outputs towards agreement between similar inputs: z_i is proportional
to p_i exp(lam sum_j w_ij z_j). A served head cannot change the answers of the request it
learns from, so here the affinities are to a memory of the session's recent rows: with a
linear kernel on centred, scaled features (w(x, x_j) = u(x) . u_j) the term is lam M u(x), with
M the decayed sum of z_j u_j^T over about ``memory`` rows. Each request: the running feature
statistics move (feature_stats), the head is rewritten from the initial head on
re-standardised features, then kernels.affinity_step computes the request's assignments z with
the old memory, merges them into M and adds lam M u(x) to the head. Nothing accumulates but
the statistics and the decaying memory, so a run of one class fades once it has passed.
Kernels: kernels.feature_stats_step, kernels.standardized_head, kernels.affinity_step.
"""

from __future__ import annotations

import torch

import kernels

from server.rules.base import ADAPT_ON_PREDICT, Hyper, Rule, register
from server.rules.feature_stats import STATS_HYPER, STATS_STATE, stats_state, update_stats


class Lame(Rule):
    name = "lame"
    normalize = False
    hyper = {**STATS_HYPER,
             "affinity": Hyper(2.0, 0.0, 1e3, low_open=False, help="weight lam of the Laplacian (affinity) term"),
             "memory": Hyper(50.0, 1.0, 1e6, low_open=False, help="rows the affinity memory spans (decay 1 - 1/memory)"),
             "adapt_on_predict": ADAPT_ON_PREDICT}
    state = {**STATS_STATE, "M": lambda n, d: (n, d)}
    base_init = True
    needs_labels = False
    description = ("label-free: LAME-style Laplacian output smoothing against a decayed memory of the session's "
                   "recent rows, on feature_stats' re-standardised head")
    search_space = {"prior_count": (0.0,), "affinity": (1.0, 4.0, 16.0), "memory": (10.0, 50.0)}

    def init_state(self, n, d, hyper, head=None):
        return {**stats_state(self, n, d, hyper, head), "M": torch.zeros(n, d)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        h = heads.hyper
        pool = heads.pools[self.name]
        update_stats(heads, x, slots, state_rows, pool, batch)
        kernels.standardized_head(slots, state_rows, pool["mean"], pool["var"], pool["src_mean"], pool["src_var"],
                                  pool["W0"], pool["b0"], heads.W, heads.b, heads.n_classes, h["power"], batch=batch)
        kernels.affinity_step(x, slots, state_rows, pool["M"], pool["mean"], pool["var"], heads.W, heads.b,
                              heads.n_classes, h["affinity"], h["memory"], batch=batch)
        return 0


RULE = register(Lame())

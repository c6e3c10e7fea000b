"""hyper: a set encoder that turns a session's labelled examples into head weights in one pass.

    state   sums [C, d], counts [C]  (the support set, pooled per class)
    update  sums[y] += x, counts[y] += 1; for every class that got examples, m its mean:
            W[c] = logit_scale M m,  b[c] = -logit_scale / 2 m^T M m
    scores  W x + b = -logit_scale / 2 (x - m_c)^T M (x - m_c) + a term shared by all classes
The metric M [d, d] is the learned part (with the logit scale folded in): it starts from the
inverse of the backbone's within-class feature covariance on its training classes (a
class-agnostic statistic of the features: directions along which digits of one class vary
count less), shrunk towards the identity, and is meta-trained on episodes of those classes
(`fwserve train-rule hyper`, eval/train_rule.py). Only the classes an adapt touches are
regenerated. Kernel: kernels.class_mean_head_step (Triton on CUDA, batched torch on the CPU).
"""

from __future__ import annotations

import kernels

from server.rules.base import Hyper, Rule, learned_tensors, register


class HyperHead(Rule):
    name = "hyper"
    normalize = False
    hyper = {"logit_scale": Hyper(1.0, 0.0, 1000.0, help="multiplies the learned logit scale")}
    state = {"sums": lambda n, d: (n, d), "counts": lambda n, d: (n,)}
    learned = ("metric",)
    description = "class means mapped to head weights through a meta-learned metric (trained offline)"

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        pool = heads.pools[self.name]
        kernels.class_mean_head_step(x, y, slots, state_rows, pool["sums"], pool["counts"], heads.W, heads.b,
                                     heads.n_classes, learned_tensors(heads, self)["metric"],
                                     heads.hyper["logit_scale"], batch=batch)
        return 0


RULE = register(HyperHead())

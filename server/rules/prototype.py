"""prototype: cosine nearest class mean over running class sums.

    state   sums [C, d], counts [C]
    update  sums[y] += x, counts[y] += 1;  W[c] = temperature * unit(sums[c] / counts[c])
    scores  W x / ||x||  (temperature * cosine to each class mean)
Kernel: kernels.prototype_step.
"""

from __future__ import annotations

import kernels

from server.rules.base import Hyper, Rule, register


class Prototype(Rule):
    name = "prototype"
    normalize = True
    hyper = {"temperature": Hyper(10.0, 0.0, 1000.0, help="logit scale of cosine similarities")}
    state = {"sums": lambda n, d: (n, d), "counts": lambda n, d: (n,)}
    description = "cosine nearest class mean over running class sums"
    search_space = {"temperature": (10.0,)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        pool = heads.pools[self.name]
        kernels.prototype_step(x, y, slots, state_rows, pool["sums"], pool["counts"], heads.W, heads.n_classes,
                               heads.hyper["temperature"], batch=batch)
        return 0


RULE = register(Prototype())

"""delta: the delta rule (LMS) on unit-norm features, instances one by one.

    scores  W x / ||x||
    update  W <- W + beta (onehot(y) - W k) k^T,  k = x / ||x||, per instance in order
Kernel: kernels.delta_step.
"""

from __future__ import annotations

import kernels

from server.rules.base import Hyper, Rule, register


class Delta(Rule):
    name = "delta"
    normalize = True
    hyper = {"beta": Hyper(0.5, 0.0, 2.0, help="step size on unit-norm keys (1 stores a row exactly)")}
    description = "delta rule / LMS on unit-norm features, instances one by one"
    search_space = {"beta": (0.03, 0.1, 0.3, 1.0)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        kernels.delta_step(x, y, slots, heads.W, heads.n_classes, heads.hyper["beta"], batch=batch)
        return 0


RULE = register(Delta())

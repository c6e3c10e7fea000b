"""sgd: one softmax cross-entropy SGD step per adapt request (the mean over its instances).

    scores  W x + b
    update  W <- W - lr (mean_i (p_i - onehot(y_i)) x_i^T + weight_decay W),  b likewise without decay
Kernel: kernels.sgd_step.
"""

from __future__ import annotations

import kernels

from server.rules.base import Hyper, Rule, register


class SGD(Rule):
    name = "sgd"
    normalize = False
    hyper = {
        "lr": Hyper(0.1, 0.0, 100.0, help="learning rate"),
        "weight_decay": Hyper(0.0, 0.0, 10.0, low_open=False, help="L2 decay of W"),
    }
    base_init = True
    description = "one softmax cross-entropy SGD step per adapt request (mean over its instances)"
    search_space = {"lr": (0.001, 0.003, 0.01, 0.03, 0.1)}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        h = heads.hyper
        kernels.sgd_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["lr"], h["weight_decay"], batch=batch)
        return 0


RULE = register(SGD())

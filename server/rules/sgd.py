"""sgd: one softmax cross-entropy SGD step per adapt request (the mean over its instances).

    scores  W x + b
    update  W <- W - lr (mean_i (p_i - onehot(y_i)) x_i^T + weight_decay W),  b likewise without decay
Kernel: kernels.sgd_step.
"""

from __future__ import annotations

import kernels

from server.errors import invalid
from server.rules.base import Hyper, Rule, register


class SGD(Rule):
    name = "sgd"
    normalize = False
    hyper = {
        "lr": Hyper(0.1, 0.0, 10.0, help="learning rate"),
        "weight_decay": Hyper(0.0, 0.0, 1.0, low_open=False, help="L2 decay of W (lr * weight_decay <= 1)"),
    }
    base_init = True
    reuses_logits = True
    description = "one softmax cross-entropy SGD step per adapt request (mean over its instances)"
    search_space = {"lr": (0.001, 0.003, 0.01, 0.03, 0.1)}

    def check_together(self, hyper):
        # W is scaled by 1 - lr * weight_decay each step: beyond 1 it flips sign and grows
        if hyper["lr"] * hyper["weight_decay"] > 1.0:
            raise invalid("invalid_hyperparameter", f"sgd: lr * weight_decay = {hyper['lr'] * hyper['weight_decay']:g}"
                          " must be at most 1 (the decay would make the head oscillate and diverge)")

    def update(self, heads, x, y, slots, state_rows, batch=None, logits=None) -> int:
        h = heads.hyper
        kernels.sgd_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["lr"], h["weight_decay"], batch=batch,
                         logits=logits)
        return 0


RULE = register(SGD())

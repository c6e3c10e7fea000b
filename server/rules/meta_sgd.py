"""meta_sgd: SGD with meta-learned per-feature step sizes and a learned number of inner steps.

    scores  W x + b
    update  `steps` times:  W <- W - rate_scale (r * G_W + weight_decay W),  b <- b - rate_scale rho G_b
            (G: the mean softmax cross-entropy gradient over the request's instances, kernels.sgd_step)
The per-feature rates r [d], the bias rate rho and the number of inner steps are meta-trained
offline (Meta-SGD: the step sizes are learned so that a few steps from the head's start go as
far as they can) on episodes of the backbone's own training classes (`fwserve train-rule
meta_sgd`, eval/train_rule.py). Classes are named by each session, so the initialisation is
class-agnostic: zeros, or the backbone's base head (init="base"). Kernel: kernels.sgd_step with
feature_rates / bias_rate, one grouped call per inner step.
"""

from __future__ import annotations

import kernels

from server.errors import invalid
from server.rules.base import Hyper, Rule, learned_tensors, register


class MetaSGD(Rule):
    name = "meta_sgd"
    normalize = False
    hyper = {
        "rate_scale": Hyper(1.0, 0.0, 100.0, help="multiplies the learned step sizes"),
        "weight_decay": Hyper(0.0, 0.0, 1.0, low_open=False, help="L2 decay of W per inner step"),
    }
    learned = ("feature_rates", "bias_rate", "steps")  # [d], [1] on the device; steps: a float
    base_init = True
    reuses_logits = True
    description = "SGD with meta-learned per-feature step sizes and inner steps (trained offline)"

    def check_together(self, hyper):
        if hyper["rate_scale"] * hyper["weight_decay"] > 1.0:
            raise invalid("invalid_hyperparameter", "meta_sgd: rate_scale * weight_decay must be at most 1")

    def update(self, heads, x, y, slots, state_rows, batch=None, logits=None) -> int:
        p = learned_tensors(heads, self)
        h = heads.hyper
        for step in range(max(1, int(p["steps"]))):
            # the round's logits are the heads before the first inner step only
            kernels.sgd_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["rate_scale"], h["weight_decay"],
                             batch=batch, logits=logits if step == 0 else None,
                             feature_rates=p["feature_rates"], bias_rate=p["bias_rate"])
        return 0


RULE = register(MetaSGD())

"""A rule from one file: Hebbian class sums on unit features (W[y] += lr * x / ||x||).

Everything a rule needs: a name, how its head scores (normalize: cosine), its hyper-parameters,
and one grouped update over the rows of many sessions (here plain torch; a real rule would call
its op in kernels/)."""

import torch
import torch.nn.functional as F

from server.rules import Hyper, Rule, register


class Hebb(Rule):
    name = "hebb"
    normalize = True
    hyper = {"lr": Hyper(1.0, 0.0, 10.0, help="step per example")}
    description = "toy: W[y] += lr * x / ||x||"

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        keep = slots >= 0
        s, labels = slots[keep], y[keep]
        step = F.normalize(x[keep].float(), dim=1) * heads.hyper["lr"].index_select(0, s).unsqueeze(1)
        heads.W.index_put_((s, labels), step, accumulate=True)
        return 0


RULE = register(Hebb())

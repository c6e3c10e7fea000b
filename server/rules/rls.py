"""rls: recursive least squares onto one-hot targets (online ridge regression).

    state   P [d, d], starting at I / lambda
    update  per instance in order: k = P x, g = k / (1 + x^T k), W += (onehot(y) - W x) g^T, P -= k k^T / (1 + x^T k)
    scores  W x + b
After rows X with one-hot targets Y: W = Y^T X (X^T X + lambda I)^-1, the closed-form ridge solution.
Kernel: kernels.rls_step.
"""

from __future__ import annotations

import torch

import kernels

from server.rules.base import Hyper, Rule, register


class RLS(Rule):
    name = "rls"
    normalize = False
    hyper = {"lambda": Hyper(1.0, 1e-3, 1e6, low_open=False, per_slot=False,
                             help="ridge strength: P starts as I / lambda")}
    state = {"P": lambda n, d: (d, d)}
    base_init = True
    description = "recursive least squares onto one-hot targets (online ridge regression)"
    search_space = {"lambda": (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)}

    def init_state(self, n, d, hyper, head=None):
        return {"P": torch.eye(d, dtype=torch.float32) / hyper["lambda"]}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        kernels.rls_step(x, y, slots, state_rows, heads.W, heads.pools[self.name]["P"], heads.n_classes, batch=batch)
        return 0


RULE = register(RLS())

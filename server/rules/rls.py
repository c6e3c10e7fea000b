"""rls: recursive least squares onto one-hot targets (online ridge regression).

    state   P [d, d], starting at (lambda A)^-1, A = prior S + (1 - prior) I
    update  per instance in order: k = P x, g = k / (1 + x^T k), W += (onehot(y) - W x) g^T, P -= k k^T / (1 + x^T k)
    scores  W x + b
After rows X with one-hot targets Y: W = Y^T X (X^T X + lambda A)^-1, the closed-form ridge solution
with the penalty tr(W A W^T). prior = 0 is plain ridge (A = I). With prior > 0, S is the
backbone's within-class feature covariance on its training classes, scaled to mean eigenvalue 1
(models/source_stats.py, `within_cov`): weights along directions in which one class of the
old digits varies cost more, the prior that new classes vary within a class the way the old ones
do (docs/eval/diagnostics.md). Only the starting P changes; the kernel is the same.
Kernel: kernels.rls_step.
"""

from __future__ import annotations

import weakref

import torch

import kernels

from server.errors import invalid
from server.rules.base import Hyper, Rule, register

WITHIN_COV = "feature_within_cov"  # the init_state head key of the source within-class covariance
# starting P by id of the covariance tensor (the store's; its entry goes when the tensor does),
# then (lambda, prior)
_STARTS: dict[int, dict[tuple[float, float], torch.Tensor]] = {}


class RLS(Rule):
    name = "rls"
    normalize = False
    hyper = {"lambda": Hyper(1.0, 1e-3, 1e6, low_open=False, per_slot=False,
                             help="ridge strength: P starts as (lambda A)^-1"),
             "prior": Hyper(0.0, 0.0, 1.0, low_open=False, per_slot=False,
                            help="A = prior S + (1 - prior) I, S the backbone's within-class feature covariance "
                                 "(0: plain ridge)")}
    state = {"P": lambda n, d: (d, d)}
    base_init = True
    source_keys = (WITHIN_COV,)
    description = "recursive least squares onto one-hot targets (online ridge regression)"
    search_space = {"lambda": (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0), "prior": (0.0, 0.9, 0.99)}

    def init_state(self, n, d, hyper, head=None):
        prior = float(hyper.get("prior", 0.0))
        if prior == 0.0:
            return {"P": torch.eye(d, dtype=torch.float32) / hyper["lambda"]}
        S = (head or {}).get(WITHIN_COV)
        if S is None:
            raise invalid("missing_source_stats", "rls.prior > 0 starts from the backbone's within-class feature "
                          "covariance, and this backbone has none (models/source_stats.py)")
        # every session with these settings starts from the same P: an inverse of [d, d] (0.5 ms
        # at d = 128, ~50 ms at 768) once per covariance tensor and setting, a copy after that
        cached = _STARTS.get(id(S))
        if cached is None:
            cached = _STARTS[id(S)] = {}
            weakref.finalize(S, _STARTS.pop, id(S), None)
        key = (float(hyper["lambda"]), prior)
        if key not in cached:
            S64 = S.double()
            A = prior * S64 * (d / torch.trace(S64)) + (1.0 - prior) * torch.eye(d, dtype=torch.float64)
            ev = torch.linalg.eigvalsh(A)
            if not bool(ev.min() > 1e-9 * ev.max()):  # prior = 1 on a rank-deficient S
                raise invalid("invalid_hyperparameter", f"rls.prior={prior:g} leaves the ridge penalty singular "
                              "for this backbone's within-class covariance; use a prior below 1")
            P = torch.linalg.inv(hyper["lambda"] * A)
            cached[key] = (0.5 * (P + P.T)).float()
        return {"P": cached[key].clone()}

    def update(self, heads, x, y, slots, state_rows, batch=None) -> int:
        kernels.rls_step(x, y, slots, state_rows, heads.W, heads.pools[self.name]["P"], heads.n_classes, batch=batch)
        return 0


RULE = register(RLS())

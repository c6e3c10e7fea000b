"""Adaptation rules: hyper-parameters, per-session state and which kernel op an update is.

A rule never owns tensors: the store (or an episodic head set) hands it the stacked heads
(``Heads``) and the rows of one micro-batch, and the rule makes one grouped kernel call.

| rule      | scores                 | update (kernels/)  | hyper-parameters (default)          | state   |
|-----------|------------------------|--------------------|-------------------------------------|---------|
| sgd       | W x + b                | sgd_step           | lr (0.1), weight_decay (0.0)        | -       |
| delta     | W x/||x||              | delta_step         | beta (0.5)                          | -       |
| prototype | W x/||x|| (cosine NCM)| prototype_step     | temperature (10.0)                  | sums, counts |
| rls       | W x + b                | rls_step           | lambda (1.0): P starts as I/lambda  | P       |
| t3a       | W x/||x|| (cosine to supports) | support_step | temperature (10), supports_per_class (20), max_entropy (0.5) | supports |
| tent      | W x + b                | entropy_step       | lr (0.001), min_confidence (0.9), collapse_share (0.95), collapse_window (64) | initial head, class histogram |

t3a and tent are label-free (server/label_free.py): instances without a label adapt them, and
with the flag hyper-parameter ``adapt_on_predict`` every ``/v1/predict`` of the session adapts
it on its own instances (the predictions are made before the update).

Semantics of one adapt request (its instances in request order): sgd takes one mini-batch step
(mean gradient over the request's instances); delta, prototype and rls apply the instances one
by one. Successive requests are successive updates, exactly as if sent one at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import kernels

from server import label_free
from server.errors import invalid


@dataclass
class Heads:
    """Stacked head tensors a rule updates in place (one slot per head)."""

    W: torch.Tensor  # [S, C, d] float32
    b: torch.Tensor  # [S, C] float32
    n_classes: torch.Tensor  # [S] int64
    normalize: torch.Tensor  # [S] bool
    hyper: dict[str, torch.Tensor]  # name -> [S] float32 (per-slot hyper-parameters)
    pools: dict[str, dict[str, torch.Tensor]]  # rule name -> state name -> [R, ...]


@dataclass(frozen=True)
class Hyper:
    default: float
    low: float
    high: float = math.inf
    low_open: bool = True  # low excluded
    per_slot: bool = True  # lives in a per-slot tensor used by the kernel
    help: str = ""
    flag: bool = False  # a switch: true/false (or 1/0), kept as 1.0/0.0

    def check(self, rule: str, name: str, value) -> float:
        if self.flag:
            if isinstance(value, bool) or value in (0, 1):
                return float(value)
            raise invalid("invalid_hyperparameter", f"{rule}.{name} must be true or false")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("invalid_hyperparameter", f"{rule}.{name} must be a number")
        v = float(value)
        ok = math.isfinite(v) and (v > self.low if self.low_open else v >= self.low) and v <= self.high
        if not ok:
            lo = "(" if self.low_open else "["
            raise invalid(
                "invalid_hyperparameter", f"{rule}.{name}={value} is outside {lo}{self.low:g}, {self.high:g}]"
            )
        return v


@dataclass(frozen=True)
class Rule:
    name: str
    normalize: bool  # does head_forward use unit-norm features for this rule?
    hyper: dict[str, Hyper]
    state: dict[str, Callable[[int, int], tuple[int, ...]]] = field(default_factory=dict)  # name -> (C, d) -> shape
    base_init: bool = False  # may start from the backbone's base head
    needs_labels: bool = True
    inf_state: tuple[str, ...] = ()  # state tensors where +inf is a legal value (an empty entry)
    description: str = ""

    def validate(self, given: dict) -> dict[str, float]:
        unknown = sorted(set(given) - set(self.hyper))
        if unknown:
            known = ", ".join(sorted(self.hyper)) or "none"
            raise invalid(
                "invalid_hyperparameter", f"rule {self.name!r} has no hyper-parameter {unknown[0]!r} (known: {known})"
            )
        return {k: h.check(self.name, k, given.get(k, h.default)) for k, h in self.hyper.items()}

    def init_state(self, n: int, d: int, hyper: dict[str, float],
                   head: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """A fresh session's rule state (CPU tensors) for a head of n classes. `head` ({"W", "b"}):
        the session's initial head; a rule may return "W"/"b" to replace it (t3a: cosine head)."""
        if self.name == "t3a":
            return label_free.t3a_init(n, d, hyper, head)
        if self.name == "tent":
            return label_free.tent_init(n, d, hyper, head)
        out = {}
        for name, shape in self.state.items():
            t = torch.zeros(shape(n, d), dtype=torch.float32)
            if self.name == "rls" and name == "P":
                t = torch.eye(d, dtype=torch.float32) / hyper["lambda"]
            out[name] = t
        return out

    def update(self, heads: Heads, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
               state_rows: Optional[torch.Tensor]) -> Optional[int]:
        """One grouped kernel call over this rule's rows (all in place). y = -1 marks an unlabelled
        row (label-free rules only). Label-free rules return how many sessions their collapse
        guard reset."""
        h = heads.hyper
        if self.name == "t3a":
            return label_free.t3a_update(heads, x, y, slots, state_rows)
        if self.name == "tent":
            return label_free.tent_update(heads, x, y, slots, state_rows)
        if self.name == "sgd":
            kernels.sgd_step(x, y, slots, heads.W, heads.b, heads.n_classes, h["lr"], h["weight_decay"])
        elif self.name == "delta":
            kernels.delta_step(x, y, slots, heads.W, heads.n_classes, h["beta"])
        elif self.name == "prototype":
            pool = heads.pools["prototype"]
            kernels.prototype_step(
                x, y, slots, state_rows, pool["sums"], pool["counts"], heads.W, heads.n_classes, h["temperature"]
            )
        elif self.name == "rls":
            kernels.rls_step(x, y, slots, state_rows, heads.W, heads.pools["rls"]["P"], heads.n_classes)
        else:  # pragma: no cover - every registered rule is handled above
            raise NotImplementedError(self.name)


_ADAPT_ON_PREDICT = Hyper(0.0, 0.0, 1.0, low_open=False, per_slot=False, flag=True,
                          help="adapt on every /v1/predict of the session (test-time adaptation)")

RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "sgd",
            normalize=False,
            hyper={
                "lr": Hyper(0.1, 0.0, 100.0, help="learning rate"),
                "weight_decay": Hyper(0.0, 0.0, 10.0, low_open=False, help="L2 decay of W"),
            },
            base_init=True,
            description="one softmax cross-entropy SGD step per adapt request (mean over its instances)",
        ),
        Rule(
            "delta",
            normalize=True,
            hyper={"beta": Hyper(0.5, 0.0, 2.0, help="step size on unit-norm keys (1 stores a row exactly)")},
            description="delta rule / LMS on unit-norm features, instances one by one",
        ),
        Rule(
            "prototype",
            normalize=True,
            hyper={"temperature": Hyper(10.0, 0.0, 1000.0, help="logit scale of cosine similarities")},
            state={"sums": lambda n, d: (n, d), "counts": lambda n, d: (n,)},
            description="cosine nearest class mean over running class sums",
        ),
        Rule(
            "rls",
            normalize=False,
            hyper={"lambda": Hyper(1.0, 0.0, 1e6, per_slot=False, help="ridge strength: P starts as I / lambda")},
            state={"P": lambda n, d: (d, d)},
            base_init=True,
            description="recursive least squares onto one-hot targets (online ridge regression)",
        ),
        Rule(
            "t3a",
            normalize=True,
            hyper={
                "temperature": Hyper(10.0, 0.0, 1000.0, help="logit scale of cosine similarities"),
                "supports_per_class": Hyper(20.0, 1.0, float(label_free.SUPPORT_CAPACITY), low_open=False,
                                            help="most supports kept per class (lowest entropy first)"),
                "max_entropy": Hyper(0.5, 0.0, 1.0, help="unlabelled rows above this entropy / log(classes) are dropped"),
                "adapt_on_predict": _ADAPT_ON_PREDICT,
            },
            state={"supports": lambda n, d: (n, label_free.SUPPORT_CAPACITY, d),
                   "support_priority": lambda n, d: (n, label_free.SUPPORT_CAPACITY),
                   "W0": lambda n, d: (n, d), "b0": lambda n, d: (n,)},
            inf_state=("support_priority",),
            base_init=True,
            needs_labels=False,
            description="label-free: cosine head over per-class supports of confidently pseudo-labelled "
            "features, filtered by entropy and capped per class (T3A)",
        ),
        Rule(
            "tent",
            normalize=False,
            hyper={
                "lr": Hyper(0.001, 0.0, 100.0, help="learning rate (0.001 suits features of norm ~10)"),
                "min_confidence": Hyper(0.9, 0.0, 1.0, low_open=False,
                                        help="unlabelled rows count only if their top probability reaches this"),
                "collapse_share": Hyper(0.95, 0.0, 1.0, help="reset when one class holds this share of recent predictions"),
                "collapse_window": Hyper(64.0, 1.0, 1e6, low_open=False, help="predictions the class histogram spans"),
                "adapt_on_predict": _ADAPT_ON_PREDICT,
            },
            state={"W0": lambda n, d: (n, d), "b0": lambda n, d: (n,), "class_hist": lambda n, d: (n,)},
            base_init=True,
            needs_labels=False,
            description="label-free: entropy minimisation on the head (TENT, head only) with confidence "
            "filtering and a reset when predictions collapse onto one class",
        ),
    )
}

# per-slot hyper-parameter tensors the store keeps: name -> value for slots of other rules
PER_SLOT_HYPER: dict[str, float] = {
    name: 0.0 for rule in RULES.values() for name, h in rule.hyper.items() if h.per_slot
}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise invalid("unknown_rule", f"unknown rule {name!r}; known: {', '.join(RULES)}") from None

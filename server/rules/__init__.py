"""Adaptation rules, one module each, in one registry.

| rule      | scores                 | update (kernels/)  | hyper-parameters (default)          | state   |
|-----------|------------------------|--------------------|-------------------------------------|---------|
| sgd       | W x + b                | sgd_step           | lr (0.1), weight_decay (0.0)        | -       |
| delta     | W x/||x||              | delta_step         | beta (0.5)                          | -       |
| prototype | W x/||x|| (cosine NCM)| prototype_step     | temperature (10.0)                  | sums, counts |
| rls       | W x + b                | rls_step           | lambda (1.0): P starts as I/lambda  | P       |
| t3a       | W x/||x|| (cosine to supports) | support_step | temperature (10), supports_per_class (20), max_entropy (0.5) | supports |
| tent      | W x + b                | entropy_step       | lr (0.001), min_confidence (0.9), collapse_share (0.95), collapse_window (64) | initial head, class histogram |

t3a and tent are label-free: instances without a label adapt them, and with the flag
hyper-parameter ``adapt_on_predict`` every ``/v1/predict`` of the session adapts it on its own
instances (the predictions are made before the update).

Semantics of one adapt request (its instances in request order): sgd takes one mini-batch step
(mean gradient over the request's instances); delta, prototype and rls apply the instances one
by one. Successive requests are successive updates, exactly as if sent one at a time.

A new rule is one module: subclass ``Rule``, call ``register(MyRule())`` at import, and import
the module before the server starts (``--rule-modules my.module`` does it for ``fwserve serve``).
"""

from server.rules.base import (
    ADAPT_ON_PREDICT, RULES, Heads, Hyper, Rule, get_rule, per_slot_hyper, register, scratch_heads,
)
from server.rules import delta, prototype, rls, sgd, t3a, tent  # noqa: E402,F401  (registers the built-in rules)

__all__ = ["ADAPT_ON_PREDICT", "RULES", "Heads", "Hyper", "Rule", "get_rule", "per_slot_hyper", "register",
           "scratch_heads"]

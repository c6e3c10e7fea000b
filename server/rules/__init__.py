"""Adaptation rules, one module each, in one registry.

| rule      | scores                 | update (kernels/)  | hyper-parameters (default)          | state   |
|-----------|------------------------|--------------------|-------------------------------------|---------|
| sgd       | W x + b                | sgd_step           | lr (0.1), weight_decay (0.0)        | -       |
| delta     | W x/||x||              | delta_step         | beta (0.5)                          | -       |
| prototype | W x/||x|| (cosine NCM)| prototype_step     | temperature (10.0)                  | sums, counts |
| rls       | W x + b                | rls_step           | lambda (1.0): P starts as I/lambda  | P       |
| t3a       | W x/||x|| (cosine to supports) | support_step | temperature (10), supports_per_class (20), max_entropy (0.5) | supports |
| tent      | W x + b                | entropy_step       | lr (0.001), min_confidence (0.9), collapse_share (0.95), collapse_window (64) | initial head, class histogram |
| feature_stats | W0 x' + b0, folded into W x + b | feature_stats_step, standardized_head | prior_count (16), window (1e9), power (1) | initial head, source and running feature statistics |
| feature_stats_t3a | t3a's support head on x', folded | + standardize_features, support_step | the above and t3a's | both |
| meta_sgd  | W x + b                | sgd_step with learned per-feature rates, learned inner steps | rate_scale (1.0), weight_decay (0.0) | - |
| hyper     | W x + b (class means through a learned metric) | class_mean_head_step | logit_scale (1.0) | sums, counts |

meta_sgd and hyper are learned rules: their parameters are meta-trained offline on one backbone
(`fwserve train-rule`) and stored beside its weights (models/rule_params.py); a server whose
backbone has none (or has files trained for other weights) refuses the rule with a clear error.

x' = the session's features re-standardised from its running mean / variance onto the
backbone's source statistics (server/rules/feature_stats.py).

t3a, tent, feature_stats and feature_stats_t3a are label-free: instances without a label adapt them, and with the flag
hyper-parameter ``adapt_on_predict`` every ``/v1/predict`` of the session adapts it on its own
instances (the predictions are made before the update).

Semantics of one adapt request (its instances in request order): sgd takes one mini-batch step
(mean gradient over the request's instances); delta, prototype and rls apply the instances one
by one. Successive requests are successive updates, exactly as if sent one at a time.

A new rule is one module: subclass ``Rule``, call ``register(MyRule())`` at import, and import
the module before the server starts (``--rule-modules my.module`` does it for ``fwserve serve``).
"""

from server.rules.base import (
    ADAPT_ON_PREDICT, RULES, Heads, Hyper, Rule, check_trained, device_learned, get_rule, per_slot_hyper, register,
    scratch_heads, source_head,
)
from server.rules import delta, prototype, rls, sgd, t3a, tent  # noqa: E402,F401  (registers the built-in rules)
from server.rules import feature_stats, feature_stats_t3a, lame  # noqa: E402,F401
from server.rules import hyper, meta_sgd  # noqa: E402,F401  (learned rules)

__all__ = ["ADAPT_ON_PREDICT", "RULES", "Heads", "Hyper", "Rule", "check_trained", "device_learned", "get_rule", "per_slot_hyper", "register",
           "scratch_heads", "source_head"]

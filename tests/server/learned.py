"""Stand-in parameters for the learned rules (meta_sgd, hyper) at any feature width, for tests
that build a store or heads without a trained backbone: seeded, finite, a symmetric
positive-definite metric, so every rule of the registry can run at a test's small d."""

from __future__ import annotations

import torch


def learned_params(d: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) / d ** 0.5
    return {
        "meta_sgd": {"feature_rates": 0.5 + torch.rand(d, generator=g), "bias_rate": torch.tensor([0.7]),
                     "steps": torch.tensor(2.0)},
        "hyper": {"metric": (a @ a.T + torch.eye(d)).float()},
    }

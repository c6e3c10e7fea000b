"""Source feature statistics: the per-dimension mean and variance of a backbone's features on
the images it was trained on, stored beside its weights.

Label-free rules that re-standardise a session's features (server/rules/feature_stats.py)
map the session's running mean / variance onto these; `rls` may start from the pooled
within-class covariance as its ridge prior (server/rules/rls.py). The file for weights
`X.safetensors` is `X.source_stats.safetensors` (tensors `mean`, `var` [d] and, when the
labels were known, `within_cov` [d, d], float32; metadata: the sha256 of the weights they were
computed with, and the image set). `fwserve train-backbone` writes it; a
file whose sha256 does not match the weights beside it is ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch


def stats_path(weights: Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".source_stats.safetensors")


def weights_sha256(weights: Path) -> str:
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def compute_source_stats(features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """features [N, d] -> {"mean": [d], "var": [d]} (float64 accumulation, biased variance);
    with labels [N], also "within_cov" [d, d]: the covariance of each row about its class mean,
    pooled over all rows (biased)."""
    f = features.detach().double()
    out = {"mean": f.mean(0).float().contiguous(), "var": f.var(0, unbiased=False).float().contiguous()}
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if len(labels) != len(f):
            raise ValueError(f"{len(labels)} labels for {len(f)} feature rows")
        centred = f.clone()
        for c in torch.unique(labels):
            rows = labels == c
            centred[rows] -= f[rows].mean(0)
        out["within_cov"] = (centred.T @ centred / len(f)).float().contiguous()
    return out


def save_source_stats(weights: Path, stats: dict[str, torch.Tensor], image_set: str) -> Path:
    from safetensors.torch import save_file

    path = stats_path(weights)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path),
              metadata={"weights_sha256": weights_sha256(weights), "images": image_set})
    return path


def load_source_stats(weights: Optional[Path]) -> Optional[dict[str, torch.Tensor]]:
    """The statistics beside `weights`, or None (no file, or made for other weights)."""
    if weights is None:
        return None
    path = stats_path(weights)
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("weights_sha256") != weights_sha256(weights):
            return None
        return {k: f.get_tensor(k).float() for k in ("mean", "var", "within_cov") if k in f.keys()}

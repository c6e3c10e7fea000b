"""Source feature statistics: the per-dimension mean and variance of a backbone's features on
the images it was trained on, stored beside its weights.

Label-free rules that re-standardise a session's features (server/rules/feature_stats.py)
map the session's running mean / variance onto these. The file for weights `X.safetensors` is
`X.source_stats.safetensors` (tensors `mean`, `var` [d] float32; metadata: the sha256 of the
weights they were computed with, and the image set). `fwserve train-backbone` writes it; a
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


def compute_source_stats(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """features [N, d] -> {"mean": [d], "var": [d]} (float64 accumulation, biased variance)."""
    f = features.detach().double()
    return {"mean": f.mean(0).float().contiguous(), "var": f.var(0, unbiased=False).float().contiguous()}


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
        return {k: f.get_tensor(k).float() for k in ("mean", "var")}

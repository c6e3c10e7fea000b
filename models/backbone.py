"""The frozen backbone as the server sees it: features, a base head, preprocessing."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.checkpoint import load_into, read_state_dict
from models.config import DEFAULT_BACKBONE, ViTConfig, get_config
from models.preprocess import preprocess
from models.rule_params import RuleParams, bundled_rule_params
from models.source_stats import load_source_stats
from models.vit import VisionTransformer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_WEIGHTS = {DEFAULT_BACKBONE: WEIGHTS_DIR / f"{DEFAULT_BACKBONE}.safetensors"}


class Backbone:
    """A VisionTransformer frozen for serving (eval mode, no grad) and its base linear head."""

    def __init__(self, model: VisionTransformer, device: str | torch.device = "cpu",
                 source_stats: dict[str, torch.Tensor] | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.config: ViTConfig = model.cfg
        self.device = torch.device(device)
        # {"mean", "var"} [d] of the features on the training images (models/source_stats.py), or None
        self.source_stats = source_stats
        # learned rules' parameters trained for exactly these weights (models/rule_params.py):
        # rule -> RuleParams; files made for other weights: rule -> why they were refused
        self.rule_params: dict[str, RuleParams] = {}
        self.rule_params_refused: dict[str, str] = {}

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights: every tensor of the state dict by name, dtype, shape and bytes.
        Sessions record it, so heads made for other weights are never paired with these features."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def class_names(self) -> list[str]:
        return list(self.config.labels)

    @property
    def head(self) -> nn.Linear:
        return self.model.head

    def preprocess(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """A plain image -> float32 [C, H, W] on the CPU, ready to stack into a batch."""
        return preprocess(image, self.config)

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, d] float32."""
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model.features(x).float()
        return self.model.features(x)

    @torch.inference_mode()
    def base_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, num_classes] with the backbone's own head."""
        return self.model.head(feats.to(self.device).float())


def bundled_weights(name: str) -> Path | None:
    path = BUNDLED_WEIGHTS.get(name)
    return path if path is not None and path.is_file() else None


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
    seed: int = 0,
    **overrides,
) -> Backbone:
    """Build a named backbone and load its weights.

    weights: a timm-layout checkpoint; by default the bundled weights of `name`, if it has any.
    random_init: skip loading (seeded random weights), e.g. to benchmark a ViT-S at real size.
    The source feature statistics beside the weights, when there are any for exactly these
    weights, come with the backbone (`Backbone.source_stats`; None otherwise), and so do the
    learned rules' parameters trained for them (`Backbone.rule_params`; a file trained for
    other weights is refused, with the reason in `Backbone.rule_params_refused`).
    overrides: config fields to change, e.g. img_size=384 (position embeddings are resampled).
    """
    cfg = get_config(name)
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    model = VisionTransformer(cfg, init=False)
    stats, path = None, None
    if random_init:
        model.reset_parameters(seed=seed)
    else:
        path = Path(weights) if weights is not None else bundled_weights(name)
        if path is None:
            raise ValueError(f"backbone {name!r} has no bundled weights: pass weights=PATH or random_init=True")
        load_into(model, read_state_dict(path))
        if not overrides:
            stats = load_source_stats(path)
    bb = Backbone(model, device=device, source_stats=stats)
    if path is not None and not overrides:
        bb.rule_params, bb.rule_params_refused = bundled_rule_params(path, lambda: bb.fingerprint)
    return bb

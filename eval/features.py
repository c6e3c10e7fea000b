"""Backbone features for the evaluation, computed once per image set and kept on disk.

Every rule and seed of a report streams the same images, so their features are computed once
(the server's preprocessing, then ``Backbone.features``) and cached under the cache directory
by the sha256 of the weights and of the images. The server computes the same features for the
same PNG-encoded images (tests/eval checks a stream through the server against the offline
simulation).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CHUNK = 256


class FeatureBank:
    """One backbone, its base head, its source feature statistics and a feature cache."""

    def __init__(self, backbone: str = "fwserve-mnist-vit", weights: Optional[Path] = None, random_init: bool = False,
                 cache_dir: Optional[Path] = None) -> None:
        from models import bundled_weights, load_backbone

        self.bb = load_backbone(backbone, weights=weights, random_init=random_init)
        path = weights or (None if random_init else bundled_weights(backbone))
        self.weights_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else "random-init"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.lock = threading.Lock()
        self.memory: dict[str, np.ndarray] = {}
        self.W0 = self.bb.head.weight.detach().float().cpu().clone()
        self.b0 = self.bb.head.bias.detach().float().cpu().clone()
        self.source_stats = self.bb.source_stats or self._computed_source_stats()
        # learned rules trained for this backbone (models/rule_params.py): rule -> tensors, and their cards
        self.learned = {name: p.tensors for name, p in self.bb.rule_params.items()}
        self.learned_cards = {name: p.card for name, p in self.bb.rule_params.items()}

    def _computed_source_stats(self) -> dict[str, torch.Tensor]:
        """No statistics beside the weights (a random-init backbone in tests): compute them on
        the documented set, the training split's digits 0-4 (models/source_stats.py)."""
        from models.data import KNOWN_CLASSES, mnist_split
        from models.source_stats import compute_source_stats

        train = mnist_split("train").subset(KNOWN_CLASSES)
        return compute_source_stats(torch.from_numpy(self(train.images)), torch.from_numpy(train.labels))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W] -> float32 [N, d] (cached)."""
        key = hashlib.sha256(self.weights_sha256.encode() + images.tobytes()).hexdigest()[:32]
        with self.lock:
            if key in self.memory:
                return self.memory[key]
            path = self.cache_dir / f"features-{key}.npy" if self.cache_dir else None
            if path is not None and path.is_file():
                out = np.load(path)
            else:
                out = np.concatenate([self._forward(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]) \
                    if len(images) else np.zeros((0, self.bb.embed_dim), np.float32)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, out)
            self.memory[key] = out
            return out

    def _forward(self, images: np.ndarray) -> np.ndarray:
        x = torch.stack([self.bb.preprocess(img) for img in images])
        return self.bb.features(x).float().cpu().numpy()

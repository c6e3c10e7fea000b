"""Turning a client's plain image into the tensor a backbone expects (the config's spec)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from models.config import ViTConfig

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def array_to_image(array: np.ndarray) -> Image.Image:
    """An H x W or H x W x C array of pixel values 0..255 -> a PIL image.

    Raises ValueError for shapes or values that are not an image.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an array image must be H x W or H x W x C with C in (1, 3, 4); got shape {list(array.shape)}")
    if min(array.shape[:2]) < 1:
        raise ValueError("an array image must not be empty")
    if not np.isfinite(array).all():
        raise ValueError("an array image must not contain NaN or Inf")
    if array.min() < 0 or array.max() > 255:
        raise ValueError("array pixel values must lie in 0..255")
    return Image.fromarray(np.rint(array).astype(np.uint8))


@functools.lru_cache(maxsize=16)
def _normalising_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [256, C]: (v / 255 - mean_c) / std_c for every 8-bit value v and channel c."""
    v = np.arange(256, dtype=np.float64)[:, None] / 255.0
    return ((v - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)).astype(np.float32)


def preprocess(image: Image.Image | np.ndarray, cfg: ViTConfig) -> torch.Tensor:
    """Image -> float32 [C, H, W]: channels converted, resized to img_size, normalised.

    The normalisation is a lookup of each 8-bit value in a [256, C] table: one numpy gather, no
    per-image torch ops. The API thread runs this for every image, and each small torch op there
    would release and retake the GIL against the engine thread."""
    if not isinstance(image, Image.Image):
        image = array_to_image(image)
    mode = "L" if cfg.in_chans == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    size = (cfg.img_size, cfg.img_size)
    if image.size != size:
        image = image.resize(size, _RESAMPLE[cfg.resize])
    table = _normalising_table(tuple(cfg.mean), tuple(cfg.std))
    values = np.asarray(image)  # uint8 [H, W] or [H, W, C]
    if values.ndim == 2:
        return torch.from_numpy(table[:, 0][values][None])  # [1, H, W]
    pixels = table[values, np.arange(values.shape[2])]  # [H, W, C]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [C, H, W]

"""Decoding and validating instances (runs in the decode thread pool, off the event loop).

Accepted inputs:
- ``image``: base64 (optionally a ``data:image/...;base64,`` URL) of a PNG or JPEG of any size up
  to ``max_image_pixels``; converted to the backbone's channels and resized to its img_size.
- ``array``: nested list of pixel values in 0..255, shape ``[H, W]`` or ``[H, W, C]`` with
  ``H = W = img_size`` of the backbone (28 for the bundled model) and C in 1, 3, 4 (converted
  to the backbone's channels). No NaN/Inf.

Each instance becomes a ``Row``: its feature-cache key and either cached features or the
preprocessed pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

from server.batcher import Row
from server.errors import invalid
from server.feature_cache import array_key, image_key

FORMATS = ("PNG", "JPEG")


def decode_rows(instances, backbone, cache, settings, field: str = "instances") -> list[Row]:
    return [decode_one(inst, backbone, cache, settings, f"{field}[{i}]") for i, inst in enumerate(instances)]


def decode_one(inst, backbone, cache, settings, where: str) -> Row:
    if inst.image is not None:
        raw = _b64(inst.image, where)
        key = image_key(raw)
        feats = cache.get(key)
        if feats is not None:
            return Row(key, feats=feats)
        img = _image(raw, settings.max_image_pixels, where)
        return Row(key, pixels=backbone.preprocess(img))
    arr = check_array(inst.array, backbone.config, where)
    key = array_key(arr)
    feats = cache.get(key)
    if feats is not None:
        return Row(key, feats=feats)
    return Row(key, pixels=backbone.preprocess(arr))


def _b64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise invalid("invalid_base64", f"{where}.image: a data URL must be base64 encoded")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("invalid_base64", f"{where}.image is not valid base64") from None
    if not raw:
        raise invalid("invalid_image", f"{where}.image is empty")
    return raw


def _image(raw: bytes, max_pixels: int, where: str) -> Image.Image:
    bad = invalid("invalid_image", f"{where}.image could not be decoded as PNG or JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Exception:
        raise bad from None
    w, h = img.size
    if w * h > max_pixels:
        raise invalid("image_too_large", f"{where}.image is {w}x{h}; at most {max_pixels} pixels")
    try:
        img.load()
    except Exception:
        raise bad from None
    return img


def check_array(value, cfg, where: str) -> np.ndarray:
    """A nested list -> float32 array [H, W] or [H, W, C], or a 422 saying what is wrong."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise invalid("invalid_array", f"{where}.array must be a rectangular nested list of numbers") from None
    s = cfg.img_size
    want = f"[{s}, {s}] or [{s}, {s}, C] with C in 1, 3, 4"
    if arr.ndim not in (2, 3) or arr.shape[:2] != (s, s) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise invalid("invalid_array", f"{where}.array has shape {list(arr.shape)}; expected {want}")
    if not np.isfinite(arr).all():
        raise invalid("invalid_array", f"{where}.array contains NaN or Inf")
    if arr.min() < 0 or arr.max() > 255:
        raise invalid("invalid_array", f"{where}.array values must lie in 0..255")
    return arr.astype(np.float32)

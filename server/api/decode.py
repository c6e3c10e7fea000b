"""Decoding and preprocessing what clients send into the engine's inputs (runs in the API's
decode thread pool, off the event loop; with several HTTP processes, in each of them).

Accepted instances:
- ``image``: base64 (optionally a ``data:image/...;base64,`` URL) of a PNG or JPEG of any size up
  to ``max_image_pixels``; converted to the backbone's channels and resized to its img_size.
- ``array``: nested list of pixel values in 0..255, shape ``[H, W]`` or ``[H, W, C]`` with
  ``H = W = img_size`` of the backbone (28 for the bundled model) and C in 1, 3, 4 (converted
  to the backbone's channels). No NaN/Inf.

Each instance becomes an ``Input``: the content hash of what the client sent (the feature
cache's key: the decoded image bytes, or the array's float32 bytes and shape) and the
preprocessed pixels ``[C, H, W]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings

import numpy as np
from PIL import Image

from models.config import ViTConfig
from models.preprocess import preprocess
from server.engine.messages import Input
from server.errors import invalid

FORMATS = ("PNG", "JPEG")


def image_key(data: bytes) -> str:
    return "img:" + hashlib.blake2b(data, digest_size=20).hexdigest()


def array_key(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    return "arr:" + h.hexdigest()


class PixelBudget:
    """Decoded pixels one request may still use (decoding is the amplification a small body buys)."""

    def __init__(self, pixels: int) -> None:
        self.total = self.left = pixels

    def take(self, n: int, where: str) -> None:
        if n > self.left:
            raise invalid("too_many_pixels", f"{where}: the request's images hold more than {self.total} pixels")
        self.left -= n


class Decoder:
    def __init__(self, cfg: ViTConfig, max_image_pixels: int, max_request_pixels: int = 1 << 62) -> None:
        self.cfg, self.max_image_pixels, self.max_request_pixels = cfg, max_image_pixels, max_request_pixels

    def budget(self) -> PixelBudget:
        return PixelBudget(self.max_request_pixels)

    def instances(self, instances, field: str = "instances", budget: PixelBudget | None = None) -> list[Input]:
        budget = budget or self.budget()
        return [self.instance(inst, f"{field}[{i}]", budget) for i, inst in enumerate(instances)]

    def instance(self, inst, where: str, budget: PixelBudget) -> Input:
        if inst.image is not None:
            return self.image_b64(inst.image, where, budget)
        return self.array(check_array(inst.array, self.cfg, where))

    def image_b64(self, text: str, where: str, budget: PixelBudget | None = None) -> Input:
        raw = _b64(text, where)
        return Input(image_key(raw), preprocess(self._image(raw, where, budget or self.budget()), self.cfg))

    def array(self, arr: np.ndarray) -> Input:
        """A checked float32 array [H, W] or [H, W, C] (check_array)."""
        return Input(array_key(arr), preprocess(arr, self.cfg))

    def _image(self, raw: bytes, where: str, budget: PixelBudget) -> Image.Image:
        bad = invalid("invalid_image", f"{where}.image could not be decoded as PNG or JPEG")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw), formats=FORMATS)
        except Exception:
            raise bad from None
        w, h = img.size
        if w * h > self.max_image_pixels:
            raise invalid("image_too_large", f"{where}.image is {w}x{h}; at most {self.max_image_pixels} pixels")
        budget.take(w * h, f"{where}.image")
        try:
            img.load()
        except Exception:
            raise bad from None
        return img


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


def check_array(value, cfg: ViTConfig, where: str) -> np.ndarray:
    """A nested list (or array) -> float32 array [H, W] or [H, W, C], or InvalidInput saying what is wrong."""
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

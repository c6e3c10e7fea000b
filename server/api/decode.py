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

Tensors (``Decoder.tensor``: a datatype, a shape and the data, as the Open Inference Protocol
carries them; every binary input path uses it): a batch ``[B, S, S]`` / ``[B, S, S, C]`` of pixel
values of a numeric datatype, or ``[B]`` BYTES of encoded images. The data is either raw bytes
(binary: numbers little-endian in row-major order; BYTES elements each a 4-byte little-endian
length and then its bytes) or a list (JSON: numbers, nested or flat; BYTES elements as base64
strings). A BYTES element is the PNG/JPEG itself, or its base64 text. Both forms give exactly
the inputs the ``instances`` path gives for the same pixels or image bytes: the same content
hash, the same preprocessed pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import struct
import threading
import warnings
from collections import OrderedDict
from typing import NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from models.config import ViTConfig
from models.preprocess import preprocess
from server.engine.messages import Input
from server.errors import invalid

FORMATS = ("PNG", "JPEG")
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
# OIP datatypes a pixel tensor may have -> numpy dtypes of their binary form (little-endian)
PIXEL_DTYPES = {"UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
                "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
LABEL_DTYPES = {"INT64": "<i8", "INT32": "<i4"}  # class indices; BYTES: class names (UTF-8)
TensorData = Union[bytes, bytearray, memoryview, list]


def image_key(data: bytes) -> str:
    return "img:" + hashlib.blake2b(data, digest_size=20).hexdigest()


def array_key(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    return "arr:" + h.hexdigest()


class Decoded(NamedTuple):
    input: Input
    image_pixels: int  # the encoded image's width x height: what it takes of a request's pixel budget


class RecentImages:
    """The last decoded base64 images, by their text, up to `max_bytes` of pixels and text: a
    client that predicts on an image and then adapts on it (or retries) sends the same text twice,
    and the second time costs a lookup instead of base64, PNG decoding and preprocessing. The
    entry is what decoding that text gave (the same content hash and pixels; the engine only
    reads pixels), so a hit answers exactly what a decode would, budget and limits included."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.size = max_bytes, 0
        self._entries: OrderedDict[str, Decoded] = OrderedDict()
        self._lock = threading.Lock()  # decodes run on the event loop and in the decode threads
        self.hits = self.misses = 0

    @staticmethod
    def _cost(text: str, d: Decoded) -> int:
        return len(text) + d.input.pixels.numel() * d.input.pixels.element_size()

    def get(self, text: str) -> Optional[Decoded]:
        with self._lock:
            d = self._entries.get(text)
            if d is None:
                self.misses += 1
            else:
                self._entries.move_to_end(text)
                self.hits += 1
            return d

    def put(self, text: str, d: Decoded) -> None:
        cost = self._cost(text, d)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(text, None)
            if old is not None:
                self.size -= self._cost(text, old)
            self._entries[text] = d
            self.size += cost
            while self.size > self.max_bytes:
                t, e = self._entries.popitem(last=False)
                self.size -= self._cost(t, e)


class PixelBudget:
    """Decoded pixels one request may still use (decoding is the amplification a small body buys)."""

    def __init__(self, pixels: int) -> None:
        self.total = self.left = pixels

    def take(self, n: int, where: str) -> None:
        if n > self.left:
            raise invalid("too_many_pixels", f"{where}: the request's images hold more than {self.total} pixels")
        self.left -= n


def bytes_elements(raw, where: str) -> list[bytes]:
    """A BYTES tensor in binary form -> its elements (each: uint32 little-endian length, bytes)."""
    raw = memoryview(raw)
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise invalid("invalid_inputs", f"{where}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise invalid("invalid_inputs", f"{where}: a BYTES element of {n} bytes runs past the data")
        out.append(bytes(raw[at:at + n]))
        at += n
    return out


def _is_raw(data) -> bool:
    return isinstance(data, (bytes, bytearray, memoryview))


class Decoder:
    def __init__(self, cfg: ViTConfig, max_image_pixels: int, max_instances: Optional[int] = None,
                 max_request_pixels: int = 1 << 62, recent_bytes: int = 0) -> None:
        self.cfg, self.max_image_pixels, self.max_instances = cfg, max_image_pixels, max_instances
        self.max_request_pixels = max_request_pixels
        self.recent = RecentImages(recent_bytes) if recent_bytes > 0 else None

    # ---- tensors (Open Inference Protocol; binary input paths) --------------------------------

    def tensor(self, datatype: str, shape, data: TensorData, where: str = "inputs[0]",
               budget: Optional["PixelBudget"] = None) -> list[Input]:
        """One image tensor -> one Input per batch row (see the module docstring), or InvalidInput."""
        budget = budget or self.budget()
        shape = self._batch_shape(shape, where)
        B = shape[0]
        if datatype == "BYTES":
            if shape not in ([B], [B, 1]):
                raise invalid("invalid_inputs", f"{where}: a BYTES image tensor has shape [B] (or [B, 1]), got {shape}")
            elems = bytes_elements(data, where) if _is_raw(data) else _flat(data)
            if len(elems) != B:
                raise invalid("invalid_inputs", f"{where}: shape {shape} needs {B} BYTES elements, got {len(elems)}")
            return [self.image_element(e, f"{where}[{i}]", budget) for i, e in enumerate(elems)]
        dtype = PIXEL_DTYPES.get(datatype)
        if dtype is None:
            raise invalid("invalid_inputs", f"{where}: unsupported datatype {datatype!r}; pixel tensors are "
                          f"{', '.join(PIXEL_DTYPES)}, encoded images BYTES")
        s = self.cfg.img_size
        if len(shape) not in (3, 4) or shape[1:3] != [s, s] or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise invalid("invalid_inputs", f"{where}: shape {shape}; expected [B, {s}, {s}] or [B, {s}, {s}, C] "
                          "with C in 1, 3, 4")
        n = math.prod(shape)
        if _is_raw(data):
            want = n * np.dtype(dtype).itemsize
            if len(data) != want:
                raise invalid("invalid_inputs", f"{where}: {datatype} {shape} needs {want} bytes of data, got "
                              f"{len(data)}")
            arr = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            try:
                arr = np.asarray(data, dtype=np.float64).reshape(-1)
            except (ValueError, TypeError):
                raise invalid("invalid_inputs", f"{where}: data must be a (nested) list of numbers") from None
            if arr.size != n:
                raise invalid("invalid_inputs", f"{where}: data has {arr.size} values, shape {shape} needs {n}")
            arr = arr.reshape(shape)
        return [self.array(check_array(arr[i], self.cfg, f"{where}[{i}]", "")) for i in range(B)]

    def labels(self, datatype: str, shape, data: TensorData, batch: int, where: str = "label") -> list:
        """A label tensor ([B] or [B, 1]: BYTES class names, or INT64/INT32 class indices) -> labels."""
        shape = self._batch_shape(shape, where)
        if shape not in ([batch], [batch, 1]):
            raise invalid("invalid_inputs", f"{where}: shape {shape}; one label per image: [{batch}]")
        if datatype == "BYTES":
            elems = bytes_elements(data, where) if _is_raw(data) else _flat(data)
            out = []
            for e in elems:
                if isinstance(e, (bytes, bytearray)):
                    try:
                        e = bytes(e).decode("utf-8")
                    except UnicodeDecodeError:
                        raise invalid("invalid_inputs", f"{where}: class names must be UTF-8") from None
                if not isinstance(e, str):
                    raise invalid("invalid_inputs", f"{where}: BYTES labels are class names (strings)")
                out.append(e)
        elif datatype in LABEL_DTYPES:
            if _is_raw(data):
                if len(data) != batch * np.dtype(LABEL_DTYPES[datatype]).itemsize:
                    raise invalid("invalid_inputs", f"{where}: {datatype} [{batch}] needs "
                                  f"{batch * np.dtype(LABEL_DTYPES[datatype]).itemsize} bytes of data")
                out = [int(v) for v in np.frombuffer(data, dtype=LABEL_DTYPES[datatype])]
            else:
                out = _flat(data)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
                    raise invalid("invalid_inputs", f"{where}: {datatype} labels are class indices (integers)")
        else:
            raise invalid("invalid_inputs", f"{where}: labels are BYTES (class names) or INT64 (class indices), "
                          f"got {datatype!r}")
        if len(out) != batch:
            raise invalid("invalid_inputs", f"{where}: {len(out)} labels for {batch} images")
        return out

    def image_element(self, element, where: str, budget: Optional["PixelBudget"] = None) -> Input:
        """One BYTES element: the encoded image itself (bytes), or its base64 text."""
        budget = budget or self.budget()
        if isinstance(element, (bytes, bytearray)):
            raw = bytes(element)
            if raw.startswith(IMAGE_MAGIC):
                return Input(image_key(raw), preprocess(self._image(raw, where, budget), self.cfg))
            try:
                element = raw.decode("ascii")
            except UnicodeDecodeError:
                raise invalid("invalid_image", f"{where}.image could not be decoded as PNG or JPEG") from None
        if not isinstance(element, str):
            raise invalid("invalid_inputs", f"{where}: a BYTES element must be an encoded image or base64 text")
        return self.image_b64(element, where, budget)

    def _batch_shape(self, shape, where: str) -> list[int]:
        if not isinstance(shape, (list, tuple)) or not shape or \
                any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in shape):
            raise invalid("invalid_inputs", f"{where}: shape must be a non-empty list of non-negative integers")
        shape = [int(n) for n in shape]
        limit = self.max_instances
        if shape[0] < 1 or (limit is not None and shape[0] > limit):
            raise invalid("too_many_instances", f"{where}: batch of {shape[0]}; 1..{limit or 'any'} per request")
        return shape

    # ---- instances (JSON /v1) -------------------------------------------------------------------

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
        budget = budget or self.budget()
        hit = self.recent.get(text) if self.recent is not None else None
        if hit is not None:
            budget.take(hit.image_pixels, f"{where}.image")
            return hit.input
        raw = _b64(text, where)
        img = self._image(raw, where, budget)
        decoded = Decoded(Input(image_key(raw), preprocess(img, self.cfg)), img.size[0] * img.size[1])
        if self.recent is not None:
            self.recent.put(text, decoded)
        return decoded.input

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


def _flat(data) -> list:
    """JSON tensor data, nested or flat, in row-major order."""
    if not isinstance(data, list):
        raise invalid("invalid_inputs", "tensor data must be a list")
    out, stack = [], [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def check_array(value, cfg: ViTConfig, where: str, field: str = ".array") -> np.ndarray:
    """A nested list (or array) -> float32 array [H, W] or [H, W, C], or InvalidInput saying what is wrong."""
    what = where + field
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise invalid("invalid_array", f"{what} must be a rectangular nested list of numbers") from None
    s = cfg.img_size
    want = f"[{s}, {s}] or [{s}, {s}, C] with C in 1, 3, 4"
    if arr.ndim not in (2, 3) or arr.shape[:2] != (s, s) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise invalid("invalid_array", f"{what} has shape {list(arr.shape)}; expected {want}")
    if not np.isfinite(arr).all():
        raise invalid("invalid_array", f"{what} contains NaN or Inf")
    if arr.min() < 0 or arr.max() > 255:
        raise invalid("invalid_array", f"{what} values must lie in 0..255")
    return arr.astype(np.float32)

"""The shared decoder: tensors as raw bytes (binary paths) and as JSON lists give exactly the
inputs the /v1 instances path gives for the same pixels or image (content hash and preprocessed
pixels), and reject what the JSON path rejects."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from models import get_config
from server.api.decode import Decoder, bytes_elements
from server.api.schemas import Instance
from server.errors import InvalidInput

CFG = get_config("fwserve-mnist-vit")
DEC = Decoder(CFG, max_image_pixels=4096 * 4096, max_instances=8)
RNG = np.random.default_rng(7)
PIXELS = RNG.integers(0, 256, size=(2, 28, 28)).astype(np.uint8)


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def same(a, b) -> None:
    assert [i.key for i in a] == [i.key for i in b]
    for x, y in zip(a, b):
        assert torch.equal(x.pixels, y.pixels)


def test_pixel_tensors_binary_and_json_match_the_instances_path():
    v1 = DEC.instances([Instance(array=x.tolist()) for x in PIXELS])
    f32 = PIXELS.astype(np.float32)
    variants = {
        "fp32 binary": DEC.tensor("FP32", [2, 28, 28], f32.astype("<f4").tobytes()),
        "fp32 json flat": DEC.tensor("FP32", [2, 28, 28], f32.reshape(-1).tolist()),
        "fp32 json nested": DEC.tensor("FP32", [2, 28, 28], f32.tolist()),
        "uint8 binary": DEC.tensor("UINT8", [2, 28, 28], PIXELS.tobytes()),
        "fp64 binary": DEC.tensor("FP64", [2, 28, 28], PIXELS.astype("<f8").tobytes()),
        "int64 json": DEC.tensor("INT64", [2, 28, 28], PIXELS.astype(int).reshape(-1).tolist()),
        "fp16 binary": DEC.tensor("FP16", [2, 28, 28], PIXELS.astype("<f2").tobytes()),
    }
    for what, inputs in variants.items():
        same(inputs, v1), what
    assert v1[0].key != v1[1].key and v1[0].key.startswith("arr:")


def test_image_tensors_binary_and_json_match_the_instances_path():
    images = [png(x) for x in PIXELS]
    b64 = [base64.b64encode(i).decode() for i in images]
    v1 = DEC.instances([Instance(image=t) for t in b64])
    same(DEC.tensor("BYTES", [2], length_prefixed(images)), v1)  # binary: the PNG itself
    same(DEC.tensor("BYTES", [2], length_prefixed([t.encode() for t in b64])), v1)  # binary: base64 text
    same(DEC.tensor("BYTES", [2], b64), v1)  # JSON: base64 strings
    same(DEC.tensor("BYTES", [2, 1], [images[0], images[1]]), v1)  # gRPC typed contents: bytes
    assert v1[0].key.startswith("img:")
    # the same pixels as an array and as a PNG are different content (different cache keys), same pixels
    arr = DEC.tensor("UINT8", [2, 28, 28], PIXELS.tobytes())
    assert arr[0].key != v1[0].key and torch.equal(arr[0].pixels, v1[0].pixels)


@pytest.mark.parametrize("case", ["nan", "inf", "range_high", "range_negative", "shape", "channels", "bytes_short",
                                  "bytes_long", "dtype", "batch", "zero_batch", "image", "bytes_truncated",
                                  "bytes_count", "json_count", "bool_shape"])
def test_binary_inputs_are_validated_like_json(case):
    f = np.zeros((1, 28, 28), "<f4")
    nan, inf = f.copy(), f.copy()
    nan[0, 3, 3], inf[0, 1, 1] = np.nan, np.inf
    bad = {
        "nan": ("FP32", [1, 28, 28], nan.tobytes(), "invalid_array"),
        "inf": ("FP32", [1, 28, 28], inf.tobytes(), "invalid_array"),
        "range_high": ("UINT16", [1, 28, 28], np.full((1, 28, 28), 300, "<u2").tobytes(), "invalid_array"),
        "range_negative": ("INT8", [1, 28, 28], np.full((1, 28, 28), -1, "<i1").tobytes(), "invalid_array"),
        "shape": ("FP32", [1, 28, 27], np.zeros((1, 28, 27), "<f4").tobytes(), "invalid_inputs"),
        "channels": ("FP32", [1, 28, 28, 2], np.zeros((1, 28, 28, 2), "<f4").tobytes(), "invalid_inputs"),
        "bytes_short": ("FP32", [1, 28, 28], f.tobytes()[:-1], "invalid_inputs"),
        "bytes_long": ("FP32", [1, 28, 28], f.tobytes() + b"\0" * 4, "invalid_inputs"),
        "dtype": ("BOOL", [1, 28, 28], b"\0" * 784, "invalid_inputs"),
        "batch": ("UINT8", [9, 28, 28], b"\0" * 784 * 9, "too_many_instances"),
        "zero_batch": ("UINT8", [0, 28, 28], b"", "too_many_instances"),
        "image": ("BYTES", [1], length_prefixed([b"\x89PNG\r\n\x1a\n broken"]), "invalid_image"),
        "bytes_truncated": ("BYTES", [1], struct.pack("<I", 100) + b"short", "invalid_inputs"),
        "bytes_count": ("BYTES", [2], length_prefixed([png(PIXELS[0])]), "invalid_inputs"),
        "json_count": ("FP32", [1, 28, 28], [0.0] * 10, "invalid_inputs"),
        "bool_shape": ("UINT8", [True, 28, 28], b"\0" * 784, "invalid_inputs"),
    }
    datatype, shape, data, code = bad[case]
    with pytest.raises(InvalidInput) as ei:
        DEC.tensor(datatype, shape, data)
    assert ei.value.code == code, ei.value.message


def test_labels():
    assert DEC.labels("BYTES", [2], length_prefixed([b"7", "ü".encode()]), 2) == ["7", "ü"]
    assert DEC.labels("BYTES", [2], ["7", "5"], 2) == ["7", "5"]
    assert DEC.labels("INT64", [2, 1], np.array([3, 1], "<i8").tobytes(), 2) == [3, 1]
    assert DEC.labels("INT64", [2], [[3], [1]], 2) == [3, 1]
    for args in (("INT64", [3], [1, 2, 3], 2), ("FP32", [2], [1.0, 2.0], 2), ("INT64", [2], [1.5, 2], 2),
                 ("BYTES", [1], length_prefixed([b"\xff"]), 1), ("INT64", [2], b"\0" * 8, 2)):
        with pytest.raises(InvalidInput):
            DEC.labels(*args)


def test_bytes_elements_roundtrip():
    elems = [b"", b"a", bytes(range(256)) * 3]
    assert bytes_elements(length_prefixed(elems), "x") == elems


def test_recent_images_answer_what_decoding_gives():
    """A repeat of a base64 image is served from the recent-images memory: the same content hash
    and pixels as a fresh decode, the request's pixel budget charged the same; what fails to decode
    is never kept; the memory stays within its bytes, oldest out first."""
    texts = [base64.b64encode(png(RNG.integers(0, 256, size=(28, 28)).astype(np.uint8))).decode() for _ in range(4)]
    cost = len(texts[0]) + 28 * 28 * 4
    dec = Decoder(CFG, max_image_pixels=4096 * 4096, max_instances=8, recent_bytes=int(2.5 * cost))
    fresh = [DEC.image_b64(t, "x") for t in texts]
    first = [dec.image_b64(t, "x") for t in texts[:2]]
    assert dec.recent.hits == 0 and dec.recent.misses == 2
    again = dec.image_b64(texts[0], "x")
    assert dec.recent.hits == 1 and again is first[0]
    same([again, first[1]], fresh[:2])

    budget = dec.budget()
    budget.left = 28 * 28 * 2 - 1  # room for one image, not two
    dec.image_b64(texts[0], "x", budget)  # a hit takes its pixels from the budget too
    with pytest.raises(InvalidInput) as e:
        dec.image_b64(texts[1], "y", budget)
    assert e.value.code == "too_many_pixels"

    with pytest.raises(InvalidInput):
        dec.image_b64(base64.b64encode(b"\x89PNG\r\n\x1a\nnot a png").decode(), "x")
    assert len(dec.recent._entries) == 2

    dec.image_b64(texts[2], "x")  # a third entry does not fit: the least recently used one (0) goes
    assert dec.recent.size <= dec.recent.max_bytes and set(dec.recent._entries) == {texts[1], texts[2]}
    misses = dec.recent.misses
    same([dec.image_b64(texts[0], "x")], [fresh[0]])
    assert dec.recent.misses == misses + 1
    assert Decoder(CFG, max_image_pixels=4096 * 4096).recent is None  # off unless given memory

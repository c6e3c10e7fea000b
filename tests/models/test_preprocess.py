import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import array_to_image, get_config, preprocess

MNIST = get_config("fwserve-mnist-vit")
TINY = get_config("vit_tiny_patch16_224")


def test_grayscale_array_is_normalised_with_the_config_spec():
    arr = np.zeros((28, 28))
    arr[0, 0] = 255
    x = preprocess(arr, MNIST)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0].item() == pytest.approx((1 - MNIST.mean[0]) / MNIST.std[0], rel=1e-5)
    assert x[0, 5, 5].item() == pytest.approx(-MNIST.mean[0] / MNIST.std[0], rel=1e-5)


def test_png_and_array_of_the_same_pixels_agree():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(28, 28)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    from_png = preprocess(Image.open(io.BytesIO(buf.getvalue())), MNIST)
    assert torch.equal(from_png, preprocess(arr, MNIST))


def test_colour_images_are_converted_and_resized():
    rgb = np.full((40, 50, 3), 128, dtype=np.float32)
    assert preprocess(rgb, MNIST).shape == (1, 28, 28)
    gray = np.full((64, 64), 10.0)
    assert preprocess(gray, TINY).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3, 4, 5)), "H x W"),
        (np.zeros((28, 28, 2)), "H x W"),
        (np.full((28, 28), np.nan), "NaN or Inf"),
        (np.full((28, 28), np.inf), "NaN or Inf"),
        (np.full((28, 28), 300.0), "0..255"),
        (np.full((28, 28), -1.0), "0..255"),
        (np.zeros((0, 28)), "empty"),
    ],
)
def test_bad_arrays_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        array_to_image(bad)


@pytest.mark.parametrize("cfg, shape", [(MNIST, (28, 28)), (TINY, (224, 224, 3))])
def test_normalisation_matches_the_arithmetic_definition(cfg, shape):
    # every 8-bit value on every channel, against (v / 255 - mean) / std in float64
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=shape).astype(np.uint8)
    arr.reshape(-1)[:256] = np.arange(256)
    x = preprocess(arr, cfg).double()
    v = torch.from_numpy(arr).double()
    v = v[None] if v.ndim == 2 else v.permute(2, 0, 1)
    mean = torch.tensor(cfg.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float64)[:, None, None]
    expected = (v / 255 - mean) / std
    assert x.shape == expected.shape and preprocess(arr, cfg).is_contiguous()
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)

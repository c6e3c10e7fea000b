"""Kernel tests run on the GPU when there is one (Triton compiled), else on CPU tensors with the
Triton interpreter (set up in tests/conftest.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _tensors_on_the_test_device():
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")

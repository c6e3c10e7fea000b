"""Implementation selection and the small argument helpers every op shares.

`auto` means Triton for CUDA tensors and the batched torch path for CPU tensors. Either can be
forced; forcing Triton on CPU tensors only works under the Triton interpreter
(TRITON_INTERPRET=1), which is how the kernels are tested on machines without a GPU.
Triton is imported only when a Triton implementation is actually requested, so importing
`kernels` works where Triton is not installed.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """The concrete implementation ("torch" or "triton") for tensors living where x lives."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton is not importable")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
    return impl


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def per_slot(value, num_slots: int, device: torch.device) -> torch.Tensor:
    """A hyper-parameter (float or per-slot tensor [S]) as a contiguous float32 tensor [S]."""
    if isinstance(value, torch.Tensor):
        if value.numel() != num_slots:
            raise ValueError(f"per-slot hyper-parameter must have {num_slots} entries, got {value.numel()}")
        return value.to(device=device, dtype=torch.float32).reshape(num_slots).contiguous()
    return torch.full((num_slots,), float(value), dtype=torch.float32, device=device)


def check_batch(x: torch.Tensor, slots: torch.Tensor, W: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Cheap shape/dtype checks (no device synchronisation)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be [B, d] float32 or bfloat16, got {tuple(x.shape)} {x.dtype}")
    if W.dim() != 3 or W.dtype != torch.float32 or not W.is_contiguous():
        raise ValueError(f"W must be a contiguous float32 [S, C, d] tensor, got {tuple(W.shape)} {W.dtype}")
    if x.shape[1] != W.shape[2]:
        raise ValueError(f"x has d={x.shape[1]} but W has d={W.shape[2]}")
    if slots.shape != (x.shape[0],):
        raise ValueError(f"slots must be [B]={x.shape[0]}, got {tuple(slots.shape)}")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y must be [B]={x.shape[0]}, got {tuple(y.shape)}")
    for name, t in (("slots", slots), ("y", y)):
        if t is not None and t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be int64 or int32, got {t.dtype}")


def check_state(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}, "
                         f"got {tuple(t.shape)} {t.dtype}")

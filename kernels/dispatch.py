"""Implementation selection, the debug index checks and the small argument helpers every op shares.

`auto` means Triton for CUDA tensors and the batched torch path for CPU tensors. Either can be
forced; forcing Triton on CPU tensors only works under the Triton interpreter
(TRITON_INTERPRET=1), which is how the kernels are tested on machines without a GPU.
Triton is imported only when a Triton implementation is actually requested, so importing
`kernels` works where Triton is not installed.

No silent paths: CUDA tensors that end up on the torch path (Triton not importable) or on the
Triton interpreter (TRITON_INTERPRET set in the environment) log a warning, once per op and
reason, on the "fwserve.kernels" logger; `implementations(device)` says per op what a call on
that device runs, for start-up logs and the server's build-info metric.

Index checks (`FWSERVE_KERNEL_CHECKS=1`, or `set_checks(True)`): every op validates slots,
labels and state rows before touching any tensor (a host synchronisation per call, so a debug
setting) and the Triton kernels are compiled with in-kernel bounds checks that skip an
out-of-range row and report it (kernels.triton.common.raise_if_flagged).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

IMPLS = ("auto", "torch", "triton")
OPS = ("head_forward", "sgd_step", "delta_step", "prototype_step", "rls_step", "support_step", "entropy_step",
       "class_mean_head_step")
HEAD_DTYPES = (torch.float32, torch.bfloat16)

log = logging.getLogger("fwserve.kernels")
_warned: set[tuple[str, str]] = set()
_checks_override: bool | None = None


def resolve_impl(impl: str, x: torch.Tensor, op: str = "op") -> str:
    """The concrete implementation ("torch" or "triton") for tensors living where x lives."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if not x.is_cuda:
            return "torch"
        if not triton_available():
            _warn_once(op, "no-triton", "%s: CUDA tensors on the batched torch path: triton is not importable", op)
            return "torch"
        if interpreter_enabled():
            _warn_once(op, "interpreter", "%s: CUDA tensors under the Triton interpreter (TRITON_INTERPRET is "
                       "set): every kernel runs on the host, far slower than compiled", op)
        return "triton"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but triton is not importable")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        if x.is_cuda and interpreter_enabled():
            _warn_once(op, "interpreter", "%s: CUDA tensors under the Triton interpreter (TRITON_INTERPRET is set)", op)
    return impl


def implementations(device: str | torch.device) -> dict[str, str]:
    """Per op, what `impl="auto"` runs for tensors on `device`: "triton" (compiled),
    "triton-interpreter", "torch" (CPU tensors) or "torch-fallback" (CUDA tensors, no Triton)."""
    device = torch.device(device)
    if device.type != "cuda":
        choice = "torch"
    elif not triton_available():
        choice = "torch-fallback"
    elif interpreter_enabled():
        choice = "triton-interpreter"
    else:
        choice = "triton"
    return {op: choice for op in OPS}


def describe_implementations(device: str | torch.device) -> str:
    """implementations(device) as one short string, e.g. "triton" or "head_forward=torch,...":
    the label value of the server's build-info metric."""
    impls = implementations(device)
    values = set(impls.values())
    if len(values) == 1:
        return values.pop()
    return ",".join(f"{op}={impl}" for op, impl in impls.items())


def logits_reusable(x: torch.Tensor) -> bool:
    """True when the update ops would use caller-supplied logits for rows like x (the Triton
    path; the torch path always recomputes them, see kernels.ops.sgd_step)."""
    return x.is_cuda and triton_available()


def _warn_once(op: str, reason: str, msg: str, *args) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning(msg, *args)


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- debug index checks ---------------------------------------------------------------------


def checks_enabled() -> bool:
    """Index checks on? `set_checks` wins over FWSERVE_KERNEL_CHECKS."""
    if _checks_override is not None:
        return _checks_override
    return os.environ.get("FWSERVE_KERNEL_CHECKS", "0") not in ("", "0")


def set_checks(enabled: bool | None) -> None:
    """Turn the index checks on or off for this process (None: back to FWSERVE_KERNEL_CHECKS)."""
    global _checks_override
    _checks_override = enabled


def check_indices(op: str, slots: torch.Tensor, num_slots: int, *, y: torch.Tensor | None = None,
                  n_classes: torch.Tensor | None = None, unlabelled_ok: bool = False,
                  state_rows: torch.Tensor | None = None, num_state_rows: int | None = None) -> None:
    """Raise IndexError unless every row's slot is -1 or in [0, S), every valid row's label in
    [0, n_classes[slot]) (or -1 where unlabelled_ok), every valid row's state row in [0, R) and
    the rows of one slot share one state row. A synchronisation: debug use (checks_enabled)."""
    slots = slots.long()
    bad_slot = (slots < -1) | (slots >= num_slots)
    if bool(bad_slot.any()):
        raise IndexError(f"{op}: slot {int(slots[bad_slot][0])} is outside [-1, {num_slots})")
    valid = slots >= 0
    if y is not None and n_classes is not None:
        labels = y.long()[valid]
        limit = n_classes.long()[slots[valid]]
        bad = (labels >= limit) | (labels < (-1 if unlabelled_ok else 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise IndexError(f"{op}: label {int(labels[i])} is outside [0, {int(limit[i])}) for slot "
                             f"{int(slots[valid][i])}")
    if state_rows is not None and num_state_rows is not None:
        rows = state_rows.long()[valid]
        bad = (rows < 0) | (rows >= num_state_rows)
        if bool(bad.any()):
            raise IndexError(f"{op}: state row {int(rows[bad][0])} is outside [0, {num_state_rows})")
        if rows.numel():
            first = torch.full((num_slots,), -1, dtype=torch.int64, device=rows.device)
            first.scatter_(0, slots[valid], rows)  # any one row's state row per slot
            if bool((first[slots[valid]] != rows).any()):
                raise IndexError(f"{op}: rows of one slot name different state rows")
            used = first[first >= 0]
            if used.unique().numel() != used.numel():
                raise IndexError(f"{op}: two slots share a state row")


# ---- argument helpers ---------------------------------------------------------------------


def per_slot(value, num_slots: int, device: torch.device) -> torch.Tensor:
    """A hyper-parameter (float or per-slot tensor [S]) as a contiguous float32 tensor [S]."""
    if isinstance(value, torch.Tensor):
        if value.numel() != num_slots:
            raise ValueError(f"per-slot hyper-parameter must have {num_slots} entries, got {value.numel()}")
        return value.to(device=device, dtype=torch.float32).reshape(num_slots).contiguous()
    return torch.full((num_slots,), float(value), dtype=torch.float32, device=device)


def check_batch(x: torch.Tensor, slots: torch.Tensor, W: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Cheap shape/dtype checks (no device synchronisation). Heads W may be float32 or bfloat16
    (bf16 storage: every op computes in float32 and rounds once per stored value)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be [B, d] float32 or bfloat16, got {tuple(x.shape)} {x.dtype}")
    if W.dim() != 3 or W.dtype not in HEAD_DTYPES or not W.is_contiguous():
        raise ValueError(f"W must be a contiguous float32 or bfloat16 [S, C, d] tensor, got {tuple(W.shape)} {W.dtype}")
    if x.shape[1] != W.shape[2]:
        raise ValueError(f"x has d={x.shape[1]} but W has d={W.shape[2]}")
    if slots.shape != (x.shape[0],):
        raise ValueError(f"slots must be [B]={x.shape[0]}, got {tuple(slots.shape)}")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y must be [B]={x.shape[0]}, got {tuple(y.shape)}")
    for name, t in (("slots", slots), ("y", y)):
        if t is not None and t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be int64 or int32, got {t.dtype}")


def check_bias(b: torch.Tensor, shape: tuple[int, int]) -> None:
    if b.dtype not in HEAD_DTYPES or not b.is_contiguous() or tuple(b.shape) != shape:
        raise ValueError(f"b must be a contiguous float32 or bfloat16 tensor of shape {shape}, "
                         f"got {tuple(b.shape)} {b.dtype}")


def check_logits(logits: torch.Tensor | None, rows: int, num_classes: int) -> None:
    if logits is None:
        return
    if logits.dtype != torch.float32 or tuple(logits.shape) != (rows, num_classes):
        raise ValueError(f"logits must be float32 [{rows}, {num_classes}], got {tuple(logits.shape)} {logits.dtype}")


def check_state(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}, "
                         f"got {tuple(t.shape)} {t.dtype}")

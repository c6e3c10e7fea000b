"""The public head ops: argument checks, implementation choice, then the torch or Triton path.

Layout (see docs/ARCHITECTURE.md, "kernels"): heads are stacked by slot, W [S, C, d] and
b [S, C] float32; n_classes [S] masks classes c >= n_classes[s]. A batch is x [B, d] (float32 or
bfloat16; computed in float32), slots [B] (-1: the row is skipped) and y [B] labels with
0 <= y < n_classes[slot]. Rule state that not every slot has (P, prototype sums) lives in its own
pool addressed per row by state_rows [B]; all rows of one slot must carry the same state row and
different slots different state rows. Hyper-parameters are floats or float32 tensors [S].
Sessions never interfere: a call changes only the slots (and state rows) its rows name, and only
their live classes.

impl: "auto" (Triton for CUDA tensors, torch for CPU tensors), "torch" or "triton".
"""

from __future__ import annotations

import importlib
import sys

import torch

from . import torch_path
from .dispatch import check_batch, check_state, per_slot, resolve_impl

__all__ = ["head_forward", "sgd_step", "delta_step", "prototype_step", "rls_step"]


def _triton(module: str):
    """The Triton launcher module, imported on first use (Triton may be absent)."""
    name = f"kernels.{module}"
    if name in sys.modules:
        return sys.modules[name]
    launcher = importlib.import_module(name)
    # Importing kernels.head_forward binds the submodule to the package attribute of the same
    # name, shadowing the public function: put the public ops back.
    package = sys.modules["kernels"]
    for op in __all__:
        setattr(package, op, globals()[op])
    return launcher


def head_forward(x, W, b, slots, n_classes, normalize=None, impl="auto") -> torch.Tensor:
    """Grouped head forward (BGMV): every row is scored by its own slot's head.

        logits[i, c] = W[s_i, c] . u_i + b[s_i, c]     c <  n_classes[s_i]
                     = -inf                            c >= n_classes[s_i]
        logits[i, :] = 0                               s_i = -1
        u_i = x_i / max(||x_i||, 1e-12) if normalize[s_i] else x_i

    normalize: optional bool [S]; True for cosine heads (prototype sessions).
    Any number of rows may share a slot. Returns float32 [B, C].
    """
    check_batch(x, slots, W)
    S, C, _ = W.shape
    check_state("b", b, (S, C))
    if resolve_impl(impl, x) == "triton":
        return _triton("head_forward").head_forward_triton(x, W, b, slots, n_classes, normalize)
    return torch_path.head_forward_torch(x, W, b, slots, n_classes, normalize)


def sgd_step(x, y, slots, W, b, n_classes, lr, weight_decay=0.0, impl="auto") -> None:
    """One SGD step on softmax cross-entropy, in place; the mean over each slot's rows.

    For every slot s with rows R_s (n_s = |R_s| > 0), all rows seeing the heads as they were
    before the call (mini-batch semantics):
        p_i  = softmax over live classes of (W_s x_i + b_s)
        G_W  = sum_{i in R_s} (p_i - onehot(y_i)) x_i^T / n_s
        G_b  = sum_{i in R_s} (p_i - onehot(y_i))       / n_s
        W_s <- W_s - lr_s * (G_W + weight_decay_s * W_s)
        b_s <- b_s - lr_s * G_b                            (the bias is not decayed)
    Masked classes get no gradient and no decay; slots without rows are untouched.
    """
    check_batch(x, slots, W, y)
    S, C, _ = W.shape
    check_state("b", b, (S, C))
    lr, weight_decay = per_slot(lr, S, W.device), per_slot(weight_decay, S, W.device)
    if resolve_impl(impl, x) == "triton":
        _triton("sgd").sgd_step_triton(x, y, slots, W, b, n_classes, lr, weight_decay)
    else:
        torch_path.sgd_step_torch(x, y, slots, W, b, n_classes, lr, weight_decay)


def delta_step(x, y, slots, W, n_classes, beta, impl="auto") -> None:
    """Delta rule (LMS) on unit-norm keys, in place; a slot's rows applied in arrival order.

    For every row i of slot s, in order (each row sees the previous rows' updates):
        k = x_i / max(||x_i||, 1e-12)
        W_s[:n] <- W_s[:n] + beta_s * (onehot(y_i) - W_s[:n] k) k^T        n = n_classes[s]
    No bias. The torch path loops over the position within a slot (at most the largest number
    of rows one slot has in the batch), vectorised across slots.
    """
    check_batch(x, slots, W, y)
    beta = per_slot(beta, W.shape[0], W.device)
    if resolve_impl(impl, x) == "triton":
        _triton("delta").delta_step_triton(x, y, slots, W, n_classes, beta)
    else:
        torch_path.delta_step_torch(x, y, slots, W, n_classes, beta)


def prototype_step(x, y, slots, state_rows, sums, counts, W, n_classes, temperature, impl="auto") -> None:
    """Class prototypes (cosine nearest class mean), in place.

    For every row i (slot s_i, state row r_i = state_rows[i]):
        sums[r_i, y_i] += x_i;  counts[r_i, y_i] += 1
    then every slot s with rows in the batch (state row r) is rewritten, for every class c:
        W[s, c] = temperature_s * m_c / max(||m_c||, 1e-12),  m_c = sums[r, c] / counts[r, c]
                  if c < n_classes[s] and counts[r, c] > 0, else 0
    sums [R, C, d], counts [R, C] float32. The bias is not touched (the server keeps it 0).
    head_forward(..., normalize=True for these slots) then gives temperature * cosine.
    """
    check_batch(x, slots, W, y)
    C, d = W.shape[1:]
    check_state("sums", sums, (sums.shape[0], C, d))
    check_state("counts", counts, (sums.shape[0], C))
    temperature = per_slot(temperature, W.shape[0], W.device)
    if resolve_impl(impl, x) == "triton":
        _triton("prototype").prototype_step_triton(
            x, y, slots, state_rows, sums, counts, W, n_classes, temperature)
    else:
        torch_path.prototype_step_torch(x, y, slots, state_rows, sums, counts, W, n_classes, temperature)


def rls_step(x, y, slots, state_rows, W, P, n_classes, impl="auto") -> None:
    """Recursive least squares (ridge onto one-hot targets), in place; rows in arrival order.

    For every row i of slot s (state row r), in order, with P = P[r] [d, d]:
        k = P x_i
        g = k / (1 + x_i^T k)                                  (Sherman-Morrison gain)
        W_s[:n] <- W_s[:n] + (onehot(y_i) - W_s[:n] x_i) g^T      n = n_classes[s]
        P <- P - k k^T / (1 + x_i^T k)                         (symmetric form of P - g k^T)
    The caller initialises P[r] = I / lambda; after rows X [N, d] with one-hot targets Y this is
    P = (X^T X + lambda I)^-1 and W_s = Y^T X P, the closed-form ridge solution. No bias.
    The torch path loops over the position within a slot, vectorised across slots.
    """
    check_batch(x, slots, W, y)
    d = W.shape[2]
    check_state("P", P, (P.shape[0], d, d))
    if resolve_impl(impl, x) == "triton":
        _triton("rls").rls_step_triton(x, y, slots, state_rows, W, P, n_classes)
    else:
        torch_path.rls_step_torch(x, y, slots, state_rows, W, P, n_classes)

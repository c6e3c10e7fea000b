"""Public head ops of the label-free rules that work on a frozen backbone (server/rules:
feature_stats, feature_stats_t3a, lame, infomax): per-session feature statistics, re-standardised
rows and heads, an affinity memory (LAME-style) and an information-maximisation step (SHOT-style).

Conventions are those of kernels/ops.py: x [B, d] float32 or bfloat16 (computed in float32),
slots [B] (-1: skipped), state_rows [B] (the rule's state row of each row's slot; one per slot),
heads W, b float32 or bfloat16 storage, state pools contiguous float32, hyper-parameters a float or a float32 tensor [S], impl "auto" |
"torch" | "triton", batch an optional kernels.SlotBatch shared by the ops of one call. The torch
path is kernels/label_free_torch.py, the Triton launchers kernels/triton/<op>.py, the float64
references (the definitions) kernels/label_free_reference.py.
"""

from __future__ import annotations

import torch

from . import label_free_torch as torch_path
from .dispatch import HEAD_DTYPES, check_bias, check_state, per_slot, resolve_impl
from .ops import _batch_for, _triton
from .slot_batch import SlotBatch

__all__ = ["feature_stats_step", "standardize_features", "standardized_head", "affinity_step"]


def _check_rows(x: torch.Tensor, slots: torch.Tensor, state_rows: torch.Tensor, d: int) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[1] != d:
        raise ValueError(f"x must be [B, {d}] float32 or bfloat16, got {tuple(x.shape)} {x.dtype}")
    for name, t in (("slots", slots), ("state_rows", state_rows)):
        if t.shape != (x.shape[0],) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be int64 or int32 [B]={x.shape[0]}, got {tuple(t.shape)} {t.dtype}")


def _hyper(value, device) -> torch.Tensor:
    """A hyper-parameter for ops without a head argument: float32 [1] (one value) or [S]."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def _check_head(W: torch.Tensor, b: torch.Tensor) -> None:
    """Heads as every op takes them: float32 or bfloat16 storage (computed in float32)."""
    if W.dim() != 3 or W.dtype not in HEAD_DTYPES or not W.is_contiguous():
        raise ValueError(f"W must be a contiguous float32 or bfloat16 [S, C, d] tensor, got {tuple(W.shape)} {W.dtype}")
    check_bias(b, tuple(W.shape[:2]))


def _check_stats(mean, var, *more) -> tuple[int, int]:
    R, d = mean.shape
    for name, t in (("mean", mean), ("var", var)) + tuple(more):
        check_state(name, t, (R, d))
    return R, d


def feature_stats_step(x, slots, state_rows, count, mean, var, window, impl="auto", *,
                       batch: SlotBatch | None = None) -> None:
    """Running per-session feature mean and variance, in place: one merge per slot and call.

    For every slot s with k > 0 rows (state row r), with the rows' batch mean m_b and (biased)
    variance v_b per dimension, and n = count[r, 0]:
        N = min(n + k, window_s);  w = min(1, k / N);  delta = m_b - mean[r]
        mean[r] <- mean[r] + w delta
        var[r]  <- (1 - w) var[r] + w v_b + w (1 - w) delta^2;   count[r, 0] <- N
    Exact pooled statistics of all rows so far while n + k <= window (Chan's merge), an
    exponential moving estimate over about `window` rows afterwards. count [R, 1], mean and
    var [R, d] float32. A slot's result does not depend on how its rows are split within a call.
    """
    R, d = _check_stats(mean, var)
    _check_rows(x, slots, state_rows, d)
    check_state("count", count, (R, 1))
    window = _hyper(window, x.device)
    batch = _batch_for(slots, batch)
    if resolve_impl(impl, x) == "triton":
        _triton("feature_stats").feature_stats_step_triton(x, slots, state_rows, count, mean, var, window,
                                                            batch=batch)
    else:
        torch_path.feature_stats_step_torch(x, slots, state_rows, count, mean, var, window, batch=batch)


def standardize_features(x, slots, state_rows, mean, var, src_mean, src_var, power=1.0, impl="auto") -> torch.Tensor:
    """Rows re-standardised from their session's running statistics onto the source's:

        x'_i = a * (x_i - mean[r]) + src_mean[r],   a = ((src_var[r] + EPS) / (var[r] + EPS))^(power_s / 2)

    per dimension (r = state_rows[i], EPS = 1e-5; power 1: means and variances matched, 0: means
    only). Returns float32 [B, d], 0 for rows of slot -1. All statistics are pools [R, d].
    """
    _check_stats(mean, var, ("src_mean", src_mean), ("src_var", src_var))
    _check_rows(x, slots, state_rows, mean.shape[1])
    power = _hyper(power, x.device)
    if resolve_impl(impl, x) == "triton":
        return _triton("feature_stats").standardize_features_triton(x, slots, state_rows, mean, var, src_mean,
                                                                     src_var, power)
    return torch_path.standardize_features_torch(x, slots, state_rows, mean, var, src_mean, src_var, power)


def standardized_head(slots, state_rows, mean, var, src_mean, src_var, V, c0, W, b, n_classes, power=1.0,
                      impl="auto", *, batch: SlotBatch | None = None) -> None:
    """A head on re-standardised features folded into W, b (raw features), in place.

    For every slot s named in slots (state row r), with a and t = src_mean[r] - a * mean[r] as in
    standardize_features, for every live class c < n_classes[s]:
        W[s, c] = V[r, c] * a          b[s, c] = c0[r, c] + V[r, c] . t
    so head_forward(x, W, b) gives V[r] x' + c0[r] on the re-standardised x': the feature cache
    and the grouped forward stay as they are. V [R, C, d], c0 [R, C] are a state pool (the
    session's initial head, or a support head built on standardised rows). Masked classes and
    slots without rows are untouched.
    """
    S, C, d = W.shape
    R, _ = _check_stats(mean, var, ("src_mean", src_mean), ("src_var", src_var))
    _check_head(W, b)
    check_state("V", V, (R, C, d))
    check_state("c0", c0, (R, C))
    if slots.dim() != 1 or state_rows.shape != slots.shape:
        raise ValueError("slots and state_rows must be [B]")
    power = per_slot(power, S, W.device)
    batch = _batch_for(slots, batch)
    if resolve_impl(impl, W) == "triton":
        _triton("feature_stats").standardized_head_triton(slots, state_rows, mean, var, src_mean, src_var, V, c0, W,
                                                          b, n_classes, power, batch=batch)
    else:
        torch_path.standardized_head_torch(slots, state_rows, mean, var, src_mean, src_var, V, c0, W, b,
                                           n_classes, power, batch=batch)


def affinity_step(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory, impl="auto", *,
                  batch: SlotBatch | None = None) -> None:
    """LAME-style output smoothing across requests (a Laplacian term with a linear kernel over a
    decayed memory of the session's centred rows and their assignments), in place.

    For every slot s with k > 0 rows (state row r), sigma = sqrt(max(sum(var[r]), EPS)):
        u_i = (x_i - mean[r]) / sigma
        z_i = softmax over live classes of (W_s x_i + b_s + lam_s M[r] u_i)
        rho = (1 - 1 / memory_s)^k
        M[r] <- rho M[r] + (1 - rho) (1/k) sum_i z_i u_i^T
        W_s <- W_s + (lam_s / sigma) M[r];   b_s <- b_s - (lam_s / sigma) M[r] . mean[r]
    On entry W_s, b_s are the session's head without the memory term; afterwards head_forward
    scores W x + b + lam M u(x). M [R, C, d], mean / var [R, d] (the running statistics of
    feature_stats_step). Masked classes and slots without rows are untouched.
    """
    S, C, d = W.shape
    R = M.shape[0]
    _check_rows(x, slots, state_rows, d)
    check_state("M", M, (R, C, d))
    check_state("mean", mean, (R, d))
    check_state("var", var, (R, d))
    _check_head(W, b)
    lam, memory = per_slot(lam, S, W.device), per_slot(memory, S, W.device)
    batch = _batch_for(slots, batch)
    if resolve_impl(impl, x) == "triton":
        _triton("affinity").affinity_step_triton(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory,
                                                 batch=batch)
    else:
        torch_path.affinity_step_torch(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory, batch=batch)

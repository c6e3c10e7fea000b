"""Float64 references of the label-free head ops (kernels/label_free_ops.py): what they compute.

Naive on purpose, like kernels/reference.py (whose notation this module shares): a Python loop
over slots and rows, new float64 tensors returned, inputs never mutated. Every fast path
(batched torch, Triton) is tested against these.

Extra notation:
    state_rows [B]    row i's state row r_i in the rule's pools (one per slot)
    EPS               the variance floor, STATS_EPS = 1e-5
"""

from __future__ import annotations

import torch

from .reference import _f64, _rows_by_slot

__all__ = ["feature_stats_step_ref", "standardize_features_ref", "standardized_head_ref", "affinity_step_ref",
           "STATS_EPS"]

STATS_EPS = 1e-5


def feature_stats_step_ref(x, slots, state_rows, count, mean, var, window):
    """Running per-session feature mean and variance, one merge per call and slot.

    For every slot s with k = n_rows_s > 0 rows (state row r), its rows' batch statistics
        m_b = (1/k) sum_i x_i,   v_b = (1/k) sum_i (x_i - m_b)^2           (per dimension)
    are merged into the running ones (n = count[r, 0], mean[r], var[r]):
        N = min(n + k, window_s);  w = min(1, k / N);  delta = m_b - mean[r]
        mean[r] <- mean[r] + w delta
        var[r]  <- (1 - w) var[r] + w v_b + w (1 - w) delta^2
        count[r, 0] <- N
    While n + k <= window this is the exact pooled mean and (biased) variance of every row so
    far (Chan et al.'s pairwise merge); afterwards each call weighs k / window: an exponential
    moving estimate over about `window` rows. A caller that starts count at n0 with the source
    statistics in mean / var makes them a prior worth n0 rows. count [R, 1], mean and var [R, d].
    Returns (count, mean, var) as new float64 tensors.
    """
    x, count, mean, var = _f64(x), _f64(count), _f64(mean), _f64(var)
    for s, rows in _rows_by_slot(slots).items():
        r = int(state_rows[rows[0]])
        xs = x[rows]
        k = len(rows)
        m_b = xs.mean(0)
        v_b = ((xs - m_b) ** 2).mean(0)
        n = float(count[r, 0])
        N = min(n + k, _at(window, s))
        w = min(1.0, k / N)
        delta = m_b - mean[r]
        mean[r] = mean[r] + w * delta
        var[r] = (1 - w) * var[r] + w * v_b + w * (1 - w) * delta ** 2
        count[r, 0] = N
    return count, mean, var


def _at(value, s: int) -> float:
    """A hyper-parameter (a float, or a per-slot tensor [S]) for slot s."""
    return float(value[s]) if isinstance(value, torch.Tensor) else float(value)


def _affine(mean_r, var_r, src_mean_r, src_var_r, power):
    """(a, t) with a = ((src_var + EPS) / (var + EPS))^(power / 2), t = src_mean - a * mean."""
    a = ((src_var_r + STATS_EPS) / (var_r + STATS_EPS)) ** (power / 2.0)
    return a, src_mean_r - a * mean_r


def standardize_features_ref(x, slots, state_rows, mean, var, src_mean, src_var, power):
    """Each row re-standardised from its session's running statistics onto the source's:

        x'_i = a_r * (x_i - mean[r]) + src_mean[r],   a_r = ((src_var[r] + EPS) / (var[r] + EPS))^(p_s / 2)

    (per dimension; r = state_rows[i], p_s = power of slot s_i: 1 matches means and variances,
    0 only means). Rows of slot -1 are 0. Returns float64 [B, d].
    """
    x, mean, var, src_mean, src_var = _f64(x), _f64(mean), _f64(var), _f64(src_mean), _f64(src_var)
    out = torch.zeros_like(x)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        r = int(state_rows[i])
        a, t = _affine(mean[r], var[r], src_mean[r], src_var[r], _at(power, s))
        out[i] = a * x[i] + t
    return out


def standardized_head_ref(slots, state_rows, mean, var, src_mean, src_var, V, c0, W, b, n_classes, power):
    """A head on re-standardised features, folded into a head on raw features.

    For every slot s with rows (state row r), with a_r, t_r = src_mean - a_r * mean[r] as in
    standardize_features_ref, for every live class c < n_s:
        W[s, c] = V[r, c] * a_r                  (per dimension)
        b[s, c] = c0[r, c] + V[r, c] . t_r
    so that W[s] x + b[s] = V[r] x' + c0[r] for x' the re-standardised x. V [R, C, d] and c0 [R, C]
    (the session's head on standardised features: its initial head, or a support head) are
    state pools. Masked classes and slots without rows are untouched. Returns (W, b) float64.
    """
    mean, var, src_mean, src_var = _f64(mean), _f64(var), _f64(src_mean), _f64(src_var)
    V, c0, W, b = _f64(V), _f64(c0), _f64(W), _f64(b)
    for s, rows in _rows_by_slot(slots).items():
        r, n = int(state_rows[rows[0]]), int(n_classes[s])
        a, t = _affine(mean[r], var[r], src_mean[r], src_var[r], _at(power, s))
        W[s, :n] = V[r, :n] * a
        b[s, :n] = c0[r, :n] + V[r, :n] @ t
    return W, b


def affinity_step_ref(x, slots, state_rows, M, mean, var, W, b, n_classes, lam, memory):
    """LAME-style Laplacian term with a linear kernel over a decayed memory (one merge per call).

    For every slot s with k = n_rows_s > 0 rows (state row r), with the session's running
    feature statistics mean[r], var[r] and sigma = sqrt(max(sum_d var[r], EPS)):
        u_i = (x_i - mean[r]) / sigma                                      (centred rows)
        z_i = softmax over live classes of (W_s x_i + b_s + lam_s M[r] u_i)  (LAME's assignment:
              the head's own probabilities times exp(affinity to the memory's assignments))
        rho = (1 - 1 / memory_s)^k
        M[r] <- rho M[r] + (1 - rho) (1/k) sum_i z_i u_i^T                    (live classes)
        W_s <- W_s + (lam_s / sigma) M[r];   b_s <- b_s - (lam_s / sigma) M[r] . mean[r]
    so the head then scores W x + b + lam M u(x): the affinity u(x) . u_j of x to the memory's
    rows, weighted by their assignments. W, b must not already hold the memory term (the rule
    rewrites its head from its initial head before every call). M [R, C, d]; masked classes of
    M, W, b and slots without rows are untouched. Returns (M, W, b) as new float64 tensors.
    """
    x, M, mean, var, W, b = _f64(x), _f64(M), _f64(mean), _f64(var), _f64(W), _f64(b)
    for s, rows in _rows_by_slot(slots).items():
        r, n, k = int(state_rows[rows[0]]), int(n_classes[s]), len(rows)
        sigma = max(float(var[r].sum()), STATS_EPS) ** 0.5
        lam_s = _at(lam, s)
        u = (x[rows] - mean[r]) / sigma
        z = torch.softmax(x[rows] @ W[s, :n].T + b[s, :n] + lam_s * u @ M[r, :n].T, dim=1)
        rho = (1.0 - 1.0 / _at(memory, s)) ** k
        M[r, :n] = rho * M[r, :n] + (1.0 - rho) * (z.T @ u) / k
        W[s, :n] = W[s, :n] + lam_s / sigma * M[r, :n]
        b[s, :n] = b[s, :n] - lam_s / sigma * (M[r, :n] @ mean[r])
    return M, W, b

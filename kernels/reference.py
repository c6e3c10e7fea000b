"""Float64 references for the head ops: the definition of what each op computes.

These are deliberately naive — a Python loop over sessions and, for the sequential rules, over
rows — so that they can be read against the math. Every fast path (batched torch, Triton) is
tested against them. Each function takes the same arguments as its public op, returns new
tensors (float64) instead of updating in place, and never mutates its inputs.

Notation, shared by all ops:
    x [B, d]          feature rows; row i belongs to slot s_i = slots[i] (-1: no session)
    W [S, C, d]       stacked heads, b [S, C] biases
    n_s               n_classes[s]: classes c >= n_s are masked (logit -inf, never updated)
    R_s               rows of slot s in arrival order, n_rows_s = |R_s|
    onehot(y)         the length-C indicator of class y
    h_s               a hyper-parameter given as a float or a per-slot tensor [S]
"""

from __future__ import annotations

import torch

__all__ = [
    "head_forward_ref",
    "sgd_step_ref",
    "delta_step_ref",
    "prototype_step_ref",
    "rls_step_ref",
    "support_step_ref",
    "entropy_step_ref",
    "per_slot",
]

NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize: a zero row stays zero


def per_slot(value, num_slots: int) -> torch.Tensor:
    """A float or a per-slot tensor [S], as a float64 tensor [S] on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).reshape(num_slots)
    return torch.full((num_slots,), float(value), dtype=torch.float64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(NORM_EPS)


def _rows_by_slot(slots: torch.Tensor) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            rows.setdefault(s, []).append(i)
    return rows


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).clone()


def head_forward_ref(x, W, b, slots, n_classes, normalize=None) -> torch.Tensor:
    """Grouped head forward (BGMV): each row is scored by its own slot's head.

        logits[i, c] = W[s_i, c] . u_i + b[s_i, c]    for c <  n_{s_i}
                     = -inf                           for c >= n_{s_i}
        logits[i, :] = 0                              if s_i = -1
        u_i = x_i / max(||x_i||, eps) if normalize[s_i] else x_i

    Returns float64 [B, C].
    """
    x, W, b = _f64(x), _f64(W), _f64(b)
    B, C = x.shape[0], W.shape[1]
    out = torch.zeros(B, C, dtype=torch.float64)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        u = _unit(x[i]) if normalize is not None and bool(normalize[s]) else x[i]
        n = int(n_classes[s])
        out[i, :n] = W[s, :n] @ u + b[s, :n]
        out[i, n:] = float("-inf")
    return out


def sgd_step_ref(x, y, slots, W, b, n_classes, lr, weight_decay=0.0, *, feature_rates=None, bias_rate=None):
    """One SGD step on the softmax cross-entropy, mini-batch mean per slot.

    For every slot s with n_rows_s > 0, using the heads as they were before the call:
        p_i = softmax(W_s[:n_s] x_i + b_s[:n_s])                  (over the live classes)
        g_i = p_i - onehot(y_i)                                    [n_s]
        G_W = sum_i g_i x_i^T / n_rows_s,  G_b = sum_i g_i / n_rows_s
        W_s[:n_s] <- W_s[:n_s] - lr_s * (G_W * r[None, :] + wd_s * W_s[:n_s])
        b_s[:n_s] <- b_s[:n_s] - lr_s * rho * G_b
    r = feature_rates [d] (default all ones) and rho = bias_rate (a float or a tensor [1],
    default 1): Meta-SGD's learned per-feature rates, shared by all slots; the decay is not
    scaled by r. Masked classes (c >= n_s) and slots without rows are untouched (no weight
    decay either). The bias is not decayed. Returns (W, b) as new float64 tensors.
    """
    x, W, b = _f64(x), _f64(W), _f64(b)
    lr, wd = per_slot(lr, W.shape[0]), per_slot(weight_decay, W.shape[0])
    r = torch.ones(W.shape[2], dtype=torch.float64) if feature_rates is None else _f64(feature_rates).reshape(-1)
    rho = 1.0 if bias_rate is None else float(bias_rate)  # a float or a one-element tensor
    for s, rows in _rows_by_slot(slots).items():
        n = int(n_classes[s])
        xs = x[rows]
        p = torch.softmax(xs @ W[s, :n].T + b[s, :n], dim=1)
        g = p - torch.nn.functional.one_hot(y[rows].cpu().long(), n).to(torch.float64)
        grad_W = g.T @ xs / len(rows)
        grad_b = g.sum(0) / len(rows)
        W[s, :n] -= lr[s] * (grad_W * r[None, :] + wd[s] * W[s, :n])
        b[s, :n] -= lr[s] * rho * grad_b
    return W, b


def delta_step_ref(x, y, slots, W, n_classes, beta):
    """Delta rule (least mean squares) on unit-norm keys, rows applied one by one.

    For every row i of slot s, in arrival order (each row sees the updates of the rows before):
        k   = x_i / max(||x_i||, eps)
        e   = onehot(y_i) - W_s[:n_s] k                            [n_s]
        W_s[:n_s] <- W_s[:n_s] + beta_s * e k^T
    With beta_s = 1 a row is stored exactly: afterwards W_s k = onehot(y_i).
    Returns W as a new float64 tensor.
    """
    x, W = _f64(x), _f64(W)
    beta = per_slot(beta, W.shape[0])
    for s, rows in _rows_by_slot(slots).items():
        n = int(n_classes[s])
        for i in rows:
            k = _unit(x[i])
            e = -(W[s, :n] @ k)
            e[int(y[i])] += 1.0
            W[s, :n] += beta[s] * torch.outer(e, k)
    return W


def accumulate_class_sums_ref(x, y, slots, state_rows, sums, counts) -> set[tuple[int, int, int]]:
    """sums[r_i, y_i] += x_i and counts[r_i, y_i] += 1 for every row with a slot, in place (float64
    tensors) -> the (slot, state row, class) cells that received rows."""
    touched: set[tuple[int, int, int]] = set()
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        r, c = int(state_rows[i]), int(y[i])
        sums[r, c] += x[i]
        counts[r, c] += 1
        touched.add((s, r, c))
    return touched


def prototype_step_ref(x, y, slots, state_rows, sums, counts, W, n_classes, temperature):
    """Class prototypes: running class sums/counts, head = scaled unit class means.

    For every row i (slot s_i, state row r_i):
        sums[r_i, y_i]   += x_i
        counts[r_i, y_i] += 1
    then for every (slot s, class c) that received rows (r the slot's state row), c < n_s:
        W[s, c] = temperature_s * m_c / max(||m_c||, eps),  m_c = sums[r, c] / counts[r, c]
    Other classes keep their weights: a head that only this rule writes, starting from 0, is
    0 for the classes never seen, which is what a full rewrite would give.
    head_forward with normalize=True then yields temperature_s * cos(x, m_c): cosine
    nearest-class-mean. Returns (sums, counts, W) as new float64 tensors.
    """
    x, sums, counts, W = _f64(x), _f64(sums), _f64(counts), _f64(W)
    temperature = per_slot(temperature, W.shape[0])
    for s, r, c in accumulate_class_sums_ref(x, y, slots, state_rows, sums, counts):
        if c < int(n_classes[s]):
            W[s, c] = temperature[s] * _unit(sums[r, c] / counts[r, c])
    return sums, counts, W


def rls_step_ref(x, y, slots, state_rows, W, P, n_classes):
    """Recursive least squares (ridge regression onto one-hot targets), rows one by one.

    For every row i of slot s (state row r), in arrival order, with P = P[r]:
        k = P x_i
        g = k / (1 + x_i^T k)                                      (Sherman-Morrison gain)
        e = onehot(y_i) - W_s[:n_s] x_i                            [n_s]
        W_s[:n_s] <- W_s[:n_s] + e g^T
        P <- P - k k^T / (1 + x_i^T k)                             (= P - g k^T, symmetric form)
    Starting from P = I / lambda and W_s = 0, after rows X [N, d] with one-hot targets Y [N, n_s]:
        P   = (X^T X + lambda I)^-1
        W_s = Y^T X (X^T X + lambda I)^-1                          (closed-form ridge)
    Returns (W, P) as new float64 tensors.
    """
    x, W, P = _f64(x), _f64(W), _f64(P)
    for s, rows in _rows_by_slot(slots).items():
        n = int(n_classes[s])
        for i in rows:
            r = int(state_rows[i])
            k = P[r] @ x[i]
            denom = 1.0 + x[i] @ k
            e = -(W[s, :n] @ x[i])
            e[int(y[i])] += 1.0
            W[s, :n] += torch.outer(e, k / denom)
            P[r] -= torch.outer(k, k) / denom
    return W, P


def support_step_ref(x, y, priority, slots, state_rows, supports, support_priority, W, n_classes, capacity,
                     temperature):
    """Capped per-class supports (T3A-style), head = scaled unit sum of a class's supports.

    supports [R, C, K, d] hold unit feature rows, support_priority [R, C, K] their priorities
    (lower is better: an entropy; +inf marks an empty entry). k_s = min(int(capacity_s), K).
    For every row i of slot s (state row r, class c = y_i, priority h_i = priority[i]), in
    arrival order:
        E = support_priority[r, c, :k_s]
        j = the first index of max(E)                       (an empty entry if there is one)
        if h_i < E[j]:  supports[r, c, j] = x_i / max(||x_i||, eps);  support_priority[r, c, j] = h_i
    A row never displaces an entry of equal priority (older entries win ties). Then every
    (slot s, class c) that received rows (state row r) is rewritten when c < n_s:
        m = sum of supports[r, c, k] over k < k_s with finite support_priority[r, c, k]
        W[s, c] = temperature_s * m / max(||m||, eps)           (0 when the class has no support)
    Other classes, masked classes and the bias are not touched. Returns (supports,
    support_priority, W) as new float64 tensors.
    """
    x, supports, support_priority, W = _f64(x), _f64(supports), _f64(support_priority), _f64(W)
    priority = _f64(priority)
    capacity, temperature = per_slot(capacity, W.shape[0]), per_slot(temperature, W.shape[0])
    K = supports.shape[2]
    touched: set[tuple[int, int, int]] = set()
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        r, c, k = int(state_rows[i]), int(y[i]), min(int(capacity[s]), K)
        touched.add((s, r, c))
        if k == 0:
            continue
        E = support_priority[r, c, :k]
        j = int(torch.argmax(E))  # first index of the maximum
        if priority[i] < E[j]:
            supports[r, c, j] = _unit(x[i])
            support_priority[r, c, j] = priority[i]
    for s, r, c in touched:
        if c >= int(n_classes[s]):
            continue
        m = torch.zeros(W.shape[2], dtype=torch.float64)
        for j in range(min(int(capacity[s]), K)):
            if torch.isfinite(support_priority[r, c, j]):
                m += supports[r, c, j]
        W[s, c] = temperature[s] * _unit(m)
    return supports, support_priority, W


def entropy_step_ref(x, y, slots, W, b, n_classes, lr, min_confidence):
    """One step of entropy minimisation on unlabelled rows (TENT on the head), cross-entropy on
    labelled ones; mini-batch mean per slot over the rows that count.

    For every slot s, using the heads as they were before the call, for each of its rows i:
        z_i = W_s[:n_s] x_i + b_s[:n_s];  p_i = softmax(z_i);  log p_i = log_softmax(z_i)
        H_i = -sum_c p_ic log p_ic
        y_i >= 0 (labelled):              g_i = p_i - onehot(y_i)            (d CE / d z)
        y_i = -1 and max_c p_ic >= conf_s: g_i = -p_i * (log p_i + H_i)      (d H_i / d z)
        otherwise:                        the row does not count
    With m_s rows counting (nothing happens when m_s = 0):
        W_s[:n_s] <- W_s[:n_s] - lr_s * sum_i g_i x_i^T / m_s
        b_s[:n_s] <- b_s[:n_s] - lr_s * sum_i g_i       / m_s
    Masked classes and slots without rows are untouched. Returns (W, b) as new float64 tensors.
    """
    x, W, b = _f64(x), _f64(W), _f64(b)
    lr, conf = per_slot(lr, W.shape[0]), per_slot(min_confidence, W.shape[0])
    for s, rows in _rows_by_slot(slots).items():
        n = int(n_classes[s])
        grad_W = torch.zeros(n, W.shape[2], dtype=torch.float64)
        grad_b = torch.zeros(n, dtype=torch.float64)
        m = 0
        for i in rows:
            z = W[s, :n] @ x[i] + b[s, :n]
            p, logp = torch.softmax(z, 0), torch.log_softmax(z, 0)
            if int(y[i]) >= 0:
                g = p.clone()
                g[int(y[i])] -= 1.0
            elif p.max() >= conf[s]:
                H = -(p * logp).sum()
                g = -p * (logp + H)
            else:
                continue
            grad_W += torch.outer(g, x[i])
            grad_b += g
            m += 1
        if m:
            W[s, :n] -= lr[s] * grad_W / m
            b[s, :n] -= lr[s] * grad_b / m
    return W, b

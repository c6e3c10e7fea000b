"""class_mean_head_step: heads generated from running class means through a learned metric.

The op behind the `hyper` rule (server/rules/hyper.py): a set encoder that pools a session's
support features per class (running sums and counts) and maps each class mean to the weights
of a linear head in one pass:

    sums[r, y] += x;  counts[r, y] += 1                                  every row (r its state row)
    for every (slot s, class c) that received rows, c live, m = sums[r, c] / counts[r, c]:
        W[s, c] = scale_s * M m
        b[s, c] = -scale_s / 2 * m^T M m

so that W x + b = -scale/2 (x - m)^T M (x - m) + (a term that is the same for every class):
nearest class mean under the learned metric M (symmetric [d, d]), as a plain linear head that
head_forward scores like any other. Classes without rows keep their weights, so a call costs
O(rows x d + touched classes x d^2) whatever the class count.

Implementations: Triton (kernels/triton/class_mean_head.py: one program per touched (slot,
class) cell, no atomics, so the same bits on every run and no host synchronisation) for CUDA
tensors; the batched torch path (a scatter-add, one [touched, d] x [d, d] GEMM, one scatter)
for CPU tensors; the float64 reference `class_mean_head_step_ref` below.
"""

from __future__ import annotations

import torch

from .dispatch import check_batch, check_bias, check_indices, check_state, checks_enabled, per_slot, resolve_impl
from .ops import _batch_for, _triton
from .reference import accumulate_class_sums_ref
from .slot_batch import SlotBatch
from .torch_ops import accumulate_class_means


def class_mean_head_step(x, y, slots, state_rows, sums, counts, W, b, n_classes, metric, scale, impl="auto", *,
                         batch: SlotBatch | None = None) -> None:
    """In place; see the module docstring. sums [R, C, d], counts [R, C] float32 state pools;
    metric float32 [d, d] (symmetric); scale a float or float32 [S]. W, b may be bfloat16."""
    check_batch(x, slots, W, y)
    S, C, d = W.shape
    check_bias(b, (S, C))
    check_state("sums", sums, (sums.shape[0], C, d))
    check_state("counts", counts, (sums.shape[0], C))
    if metric.shape != (d, d) or metric.dtype != torch.float32 or metric.device != W.device:
        raise ValueError(f"metric must be float32 [{d}, {d}] on {W.device}, got {metric.dtype} "
                         f"{list(metric.shape)} on {metric.device}")
    scale = per_slot(scale, S, W.device)
    checks = checks_enabled()
    if checks:
        check_indices("class_mean_head_step", slots, S, y=y, n_classes=n_classes, state_rows=state_rows,
                      num_state_rows=sums.shape[0])
    seg = _batch_for(slots, batch)  # like every op: a batch must be a SlotBatch built for these rows
    if resolve_impl(impl, x, "class_mean_head_step") == "triton":
        _triton("class_mean_head").class_mean_head_step_triton(x, y, slots, state_rows, sums, counts, W, b, n_classes,
                                                               metric, scale, batch=seg, checks=checks)
        return
    if seg.num_rows == 0:
        return
    # the running class statistics as prototype_step keeps them (same bits on the CPU; see there for CUDA)
    means, slot_of, cls = accumulate_class_means(x, y, slots, state_rows, sums, counts, n_classes, seg)
    mapped = means @ metric.T  # [T, d]: M m per touched class
    s = scale.index_select(0, slot_of)
    heads = mapped * s[:, None]
    bias = -0.5 * s * (mapped * means).sum(1)
    cell = slot_of * C + cls
    W.view(-1, d).index_copy_(0, cell, heads.to(W.dtype))
    b.view(-1).index_copy_(0, cell, bias.to(b.dtype))


def class_mean_head_step_ref(x, y, slots, state_rows, sums, counts, W, b, n_classes, metric, scale):
    """Float64 definition, one row and one class at a time:
        sums[r_i, y_i] += x_i; counts[r_i, y_i] += 1                 for every row i with s_i >= 0
        for every touched (s, c) with c < n_s, m = sums[r, c] / counts[r, c]:
            W[s, c] = scale_s M m;   b[s, c] = -scale_s / 2 m^T M m
    Returns (sums, counts, W, b) as new float64 tensors."""
    f64 = lambda t: t.detach().to("cpu", torch.float64).clone()  # noqa: E731
    x, sums, counts, W, b, M = f64(x), f64(sums), f64(counts), f64(W), f64(b), f64(metric)
    scale = per_slot(scale, W.shape[0], torch.device("cpu")).double()
    for s, r, c in accumulate_class_sums_ref(x, y, slots, state_rows, sums, counts):
        if c < int(n_classes[s]):
            m = sums[r, c] / counts[r, c]
            W[s, c] = scale[s] * (M @ m)
            b[s, c] = -0.5 * scale[s] * (m @ M @ m)
    return sums, counts, W, b

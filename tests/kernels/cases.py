"""Random head-op problems and comparisons shared by the kernel tests.

Every problem is drawn fresh (the seed is in every failure message). Memory a call must not
read or write is poisoned with NaN: masked classes of every head, whole heads of slots without
rows, state rows no slot uses. A kernel that reads such memory spreads NaN into live values; one
that writes it replaces the NaN — both fail the comparison, which requires NaN exactly where the
reference (which never touches that memory) keeps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

IMPLS = ["torch", "triton"]

# (max error / max |expected|) allowed against the float64 reference. The ops compute in fp32;
# bf16 inputs are exact in fp32, but bf16 rows are coarser and sums over them cancel more.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 5e-5}
SEQUENCE_RMSE = {torch.float32: 1e-4, torch.bfloat16: 2e-4}
# bf16 head storage: every stored weight is rounded to 8 significant bits (half an ulp is
# 2^-9 of the value); the sequential rules round after every row on the Triton path.
HEAD_BF16_TOLERANCE = 1e-2

# Small shapes on purpose: under the Triton interpreter every program costs about a millisecond.
# Together the cases cover C in {10, 37}, d in {100, 192}, both dtypes, both row layouts.
CASES = [
    pytest.param(dict(C=10, d=100, dtype=torch.float32, layout="mixed"), id="C10-d100-fp32-mixed"),
    pytest.param(dict(C=37, d=192, dtype=torch.float32, layout="one_session"), id="C37-d192-fp32-one_session"),
    pytest.param(dict(C=37, d=100, dtype=torch.bfloat16, layout="mixed", index_dtype=torch.int32),
                 id="C37-d100-bf16-mixed-int32"),
    pytest.param(dict(C=10, d=192, dtype=torch.bfloat16, layout="one_session"), id="C10-d192-bf16-one_session"),
    pytest.param(dict(C=37, d=100, dtype=torch.float32, layout="mixed", head_dtype=torch.bfloat16),
                 id="C37-d100-fp32-mixed-bf16heads"),
]


def stored_bf16(t: torch.Tensor) -> torch.Tensor:
    """t as a Triton kernel stores it into a bf16 tensor: rounded to nearest on a GPU; the
    interpreter (CPU) truncates instead (its fp32 -> bf16 cast drops the low 16 bits)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if t.is_cuda or not interpreted:
        return t.to(torch.bfloat16)
    bits = t.detach().cpu().float().contiguous().view(torch.int32) & -65536  # keep the high 16 bits
    return bits.view(torch.float32).to(torch.bfloat16).to(t.device)


def tolerance(case: dict) -> float:
    """Allowed error of one call against the float64 reference for a CASES entry."""
    if case.get("head_dtype", torch.float32) == torch.bfloat16:
        return HEAD_BF16_TOLERANCE
    return TOLERANCE[case["dtype"]]


@dataclass
class Problem:
    seed: int
    x: torch.Tensor  # [B, d]
    y: torch.Tensor  # [B]
    slots: torch.Tensor  # [B], -1 rows included in "mixed"
    state_rows: torch.Tensor  # [B]
    n_classes: torch.Tensor  # [S]
    W: torch.Tensor  # [S, C, d]
    b: torch.Tensor  # [S, C]
    sums: torch.Tensor  # [R, C, d]
    counts: torch.Tensor  # [R, C]
    P: torch.Tensor  # [R, d, d]
    per_slot: torch.Tensor  # [S] float32 in [0.2, 1]: a per-slot hyper-parameter
    generator: torch.Generator | None = None
    state_of_slot: torch.Tensor | None = None

    def next_batch(self, layout: str = "mixed") -> "Batch":
        """A fresh batch for the same heads and state (multi-step sequences)."""
        device = self.x.device
        with torch.device("cpu"):
            batch = draw_batch(self.generator, self.n_classes.cpu(), self.state_of_slot, self.x.shape[1],
                               max(self.x.shape[0], 1), self.x.dtype, layout)
        return Batch(*(getattr(batch, f).to(device) for f in ("x", "y", "slots", "state_rows")))

    def to(self, device) -> "Problem":
        for name in ("x", "y", "slots", "state_rows", "n_classes", "W", "b", "sums", "counts", "P", "per_slot"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def clone_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in ("W", "b", "sums", "counts", "P")}


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def make_problem(C: int, d: int, dtype=torch.float32, layout: str = "mixed", B: int = 12, S: int = 6,
                 seed: int | None = None, index_dtype=torch.int64, poison: bool = True,
                 head_dtype=torch.float32) -> Problem:
    """Drawn on the CPU (seeded generator), then moved to the default device (CUDA when the
    kernel tests run on a GPU). head_dtype: storage of W and b (bf16 heads); state stays fp32."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        p = _make_problem_on_cpu(C, d, dtype, layout, B, S, fresh_seed() if seed is None else seed, index_dtype, poison)
    p.W, p.b = p.W.to(head_dtype), p.b.to(head_dtype)
    return p.to(device)


def _make_problem_on_cpu(C, d, dtype, layout, B, S, seed, index_dtype, poison) -> Problem:
    g = torch.Generator().manual_seed(seed)
    R = S + 1  # one state row more than slots: it belongs to nobody

    n_classes = torch.randint(2, C + 1, (S,), generator=g)
    n_classes[0] = C  # one slot uses every class
    state_of_slot = torch.randperm(R, generator=g)[:S]
    batch = draw_batch(g, n_classes, state_of_slot, d, B, dtype, layout)
    slots = batch.slots
    W = 0.1 * torch.randn(S, C, d, generator=g)
    b = 0.1 * torch.randn(S, C, generator=g)
    counts = torch.randint(0, 3, (R, C), generator=g).float()
    sums = torch.randn(R, C, d, generator=g) * counts.unsqueeze(2)
    ridge = 0.5 + 1.5 * torch.rand(R, generator=g)
    P = torch.eye(d).expand(R, d, d) / ridge.view(R, 1, 1)
    P = P.contiguous()

    # Masked classes are always poisoned; `poison` also poisons slots and state rows without rows.
    masked = torch.arange(C) >= n_classes.unsqueeze(1)  # [S, C]
    W[masked] = float("nan")
    b[masked] = float("nan")
    if poison:
        untouched = torch.ones(S, dtype=torch.bool)
        untouched[slots[slots >= 0]] = False
        W[untouched] = float("nan")
        b[untouched] = float("nan")
        unused_state = torch.ones(R, dtype=torch.bool)
        unused_state[state_of_slot[~untouched]] = False
        sums[unused_state] = float("nan")
        counts[unused_state] = float("nan")
        P[unused_state] = float("nan")

    per_slot = 0.2 + 0.8 * torch.rand(S, generator=g)
    return Problem(seed, batch.x, batch.y.to(index_dtype), slots.to(index_dtype),
                   batch.state_rows.to(index_dtype), n_classes, W, b, sums, counts, P, per_slot,
                   generator=g, state_of_slot=state_of_slot)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    slots: torch.Tensor
    state_rows: torch.Tensor


def draw_batch(g: torch.Generator, n_classes: torch.Tensor, state_of_slot: torch.Tensor, d: int, B: int,
               dtype=torch.float32, layout: str = "mixed") -> Batch:
    S = n_classes.numel()
    if layout == "mixed":
        # Slot S-1 never gets a row; slot 0 gets three; at least one row has no session.
        slots = torch.randint(-1, S - 1, (B,), generator=g)
        slots[:3] = 0
        slots[3] = -1
        slots = slots[torch.randperm(B, generator=g)]
    elif layout == "one_session":
        slots = torch.full((B,), 1, dtype=torch.int64)
    elif layout == "empty":
        slots = torch.zeros((0,), dtype=torch.int64)
    else:
        raise ValueError(layout)
    live_slot = slots.clamp_min(0)
    # Rows without a session point at a live state row: the op must ignore them anyway.
    state_rows = state_of_slot[live_slot]
    y = (torch.rand(slots.numel(), generator=g) * n_classes[live_slot]).long()
    y = torch.minimum(y, n_classes[live_slot] - 1)
    x = torch.randn(slots.numel(), d, generator=g).to(dtype)
    return Batch(x, y, slots, state_rows)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, seed: int) -> None:
    """Same NaN/inf pattern, and finite entries within tol * max |expected|."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN pattern differs ({int(actual.isnan().sum())} vs {int(expected.isnan().sum())}), seed={seed}")
    finite = expected.isfinite()
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()]), (
        f"{what}: infinities differ, seed={seed}")
    assert actual[finite].isfinite().all(), f"{what}: non-finite values where finite expected, seed={seed}"
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(1e-6)
        err = (actual[finite] - expected[finite]).abs().max() / scale
        assert err <= tol, f"{what}: max error {err:.3g} x max|expected| > {tol:g}, seed={seed}"


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the entries the reference keeps finite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = expected.isfinite()
    diff = (actual[finite] - expected[finite]).norm()
    return float(diff / expected[finite].norm().clamp_min(1e-12))

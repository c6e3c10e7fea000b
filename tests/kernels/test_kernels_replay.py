"""The shape -> code path contract of kernels/slot_batch.py, which exact log replay relies on.

A live call mixes several sessions with different row counts (rows interleaved, skipped rows
among them). Replaying one session alone — its rows at slot 0, zero stand-in sessions with the
other sessions' row counts (kernels.replay_slots), starting from the session's state before
the call — must give bit for bit what the live call wrote for that session, on the torch path
for every op with state the server logs. Inputs are drawn fresh (the seed is in every message).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import SlotBatch, replay_slots
from tests.kernels.cases import fresh_seed

SMALL = (37, 100, 4)  # (C, d, K); d not a multiple of 16: heads of different slots sit at different alignments
LARGE = (10, 768, 32)  # server-like widths: updates above the sizes where CPU ops go multi-threaded
CPU = torch.device("cpu")

# Row counts of the sessions of one live call, the torch grouping that profile picks, widths.
PROFILES = {
    "one_slot": ([5], "one_slot", SMALL),
    "padded": ([3, 1, 4, 2, 2], "padded", SMALL),
    "rectangular": ([3, 3, 3], "padded", SMALL),
    "per_row": ([40] + [1] * 6, "per_row", SMALL),
    "large_padded": ([8] * 30, "padded", LARGE),
    "large_per_row": ([60] + [2] * 15, "per_row", LARGE),
}
MAX_REPLAYS = 4  # sessions replayed per live call (the busiest one among them)
OPS = ["sgd", "delta", "prototype", "rls", "support", "entropy", "feature_stats", "standardized_head", "affinity"]
SLOT_STATE = {"W", "b"}  # indexed by slot; every other state tensor by state row
STATE = {
    "sgd": ["W", "b"], "delta": ["W"], "prototype": ["W", "sums", "counts"], "rls": ["W", "P"],
    "support": ["W", "supports", "support_priority"], "entropy": ["W", "b"],
    "feature_stats": ["mean", "var", "count"], "standardized_head": ["W", "b"], "affinity": ["W", "b", "M"],
}
# state an op reads but does not write (replayed like its state)
READ = {"standardized_head": ["mean", "var", "src_mean", "src_var", "V", "c0"], "affinity": ["mean", "var"]}
HYPER = {
    "sgd": ["lr", "weight_decay"], "delta": ["beta"], "prototype": ["temperature"], "rls": [],
    "support": ["capacity", "temperature"], "entropy": ["lr", "min_confidence"],
    "feature_stats": ["window"], "standardized_head": ["power"], "affinity": ["lam", "memory"],
}


def run_op(op: str, t: dict, impl: str = "torch") -> None:
    """One call of the op on the tensors in t (state updated in place)."""
    x, y, slots, rows, h = t["x"], t["y"], t["slots"], t["state_rows"], t["hyper"]
    if op == "sgd":
        kernels.sgd_step(x, y, slots, t["W"], t["b"], t["n_classes"], h["lr"], h["weight_decay"], impl=impl)
    elif op == "delta":
        kernels.delta_step(x, y, slots, t["W"], t["n_classes"], h["beta"], impl=impl)
    elif op == "prototype":
        kernels.prototype_step(x, y, slots, rows, t["sums"], t["counts"], t["W"], t["n_classes"], h["temperature"],
                               impl=impl)
    elif op == "rls":
        kernels.rls_step(x, y, slots, rows, t["W"], t["P"], t["n_classes"], impl=impl)
    elif op == "support":
        kernels.support_step(x, y, t["priority"], slots, rows, t["supports"], t["support_priority"], t["W"],
                             t["n_classes"], h["capacity"], h["temperature"], impl=impl)
    elif op == "entropy":
        kernels.entropy_step(x, y, slots, t["W"], t["b"], t["n_classes"], h["lr"], h["min_confidence"], impl=impl)
    elif op == "feature_stats":
        kernels.feature_stats_step(x, slots, rows, t["count"], t["mean"], t["var"], h["window"], impl=impl)
    elif op == "standardized_head":
        kernels.standardized_head(slots, rows, t["mean"], t["var"], t["src_mean"], t["src_var"], t["V"], t["c0"],
                                  t["W"], t["b"], t["n_classes"], h["power"], impl=impl)
    elif op == "affinity":
        kernels.affinity_step(x, slots, rows, t["M"], t["mean"], t["var"], t["W"], t["b"], t["n_classes"], h["lam"],
                              h["memory"], impl=impl)
    else:
        raise ValueError(op)


def _hyper(op: str, n: int, g: torch.Generator, K: int) -> dict[str, torch.Tensor]:
    u = torch.rand(n, generator=g)
    values = {"lr": 0.05 + 0.5 * u, "weight_decay": 0.02 * u, "beta": 0.2 + 0.8 * u, "temperature": 5.0 + 10 * u,
              "capacity": torch.randint(1, K + 1, (n,), generator=g).float(), "min_confidence": 0.02 + 0.1 * u,
              "window": 5.0 + 100 * u, "power": u, "lam": 3.0 * u, "memory": 1.0 + 30 * u}
    return {k: values[k] for k in HYPER[op]}


def _state(op: str, S: int, R: int, g: torch.Generator, dims: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    C, D, K = dims
    full = {
        "W": 0.1 * torch.randn(S, C, D, generator=g), "b": 0.1 * torch.randn(S, C, generator=g),
        "sums": torch.randn(R, C, D, generator=g), "counts": torch.randint(0, 3, (R, C), generator=g).float(),
        "P": torch.eye(D).repeat(R, 1, 1) / (0.5 + torch.rand(R, 1, 1, generator=g)),
        "supports": torch.nn.functional.normalize(torch.randn(R, C, K, D, generator=g), dim=3),
        "support_priority": torch.rand(R, C, K, generator=g),
        "count": torch.randint(0, 40, (R, 1), generator=g).float(), "mean": torch.randn(R, D, generator=g),
        "var": 0.1 + torch.rand(R, D, generator=g), "src_mean": torch.randn(R, D, generator=g),
        "src_var": 0.1 + torch.rand(R, D, generator=g), "V": torch.randn(R, C, D, generator=g),
        "c0": torch.randn(R, C, generator=g), "M": 0.3 * torch.randn(R, C, D, generator=g),
    }
    full["support_priority"][torch.rand(R, C, K, generator=g) < 0.4] = float("inf")
    return {k: full[k] for k in STATE[op] + READ.get(op, [])}


def live_call(op: str, counts: list[int], g: torch.Generator, skipped: int = 3,
              dims: tuple[int, int, int] = SMALL) -> tuple[dict, list[int]]:
    """A call mixing sessions with these row counts at random distinct slots, rows shuffled."""
    C, D, K = dims
    S = len(counts) + 3  # some slots without rows
    R = S + 1
    session_slots = torch.randperm(S, generator=g)[: len(counts)].tolist()
    slots = torch.tensor([s for s, c in zip(session_slots, counts) for _ in range(c)] + [-1] * skipped)
    slots = slots[torch.randperm(slots.numel(), generator=g)]
    B = slots.numel()
    n_classes = torch.randint(2, C + 1, (S,), generator=g)
    state_of_slot = torch.randperm(R, generator=g)[:S]
    live = slots.clamp_min(0)
    y = torch.minimum((torch.rand(B, generator=g) * n_classes[live]).long(), n_classes[live] - 1)
    if op == "entropy":  # unlabelled rows, except each session's first (so that every session moves)
        unlabelled = torch.rand(B, generator=g) < 0.5
        unlabelled[[int((slots == s).nonzero()[0]) for s in session_slots]] = False
        y = torch.where(unlabelled, -1, y)
    t = dict(x=torch.randn(B, D, generator=g), y=y, slots=slots, state_rows=state_of_slot[live],
             priority=torch.rand(B, generator=g), n_classes=n_classes, hyper=_hyper(op, S, g, K),
             state_of_slot=state_of_slot, dims=dims, **_state(op, S, R, g, dims))
    return t, session_slots


def replay_call(op: str, before: dict, slot: int, others: list[int], g: torch.Generator) -> dict:
    """The replay of `slot`'s rows of the live call: slot 0 starts from the session's state before
    the call, stand-ins 1.. are zero rows and zero state with arbitrary hyper-parameters."""
    C, D, K = before["dims"]
    mine = (before["slots"] == slot).nonzero().squeeze(1)
    slots = torch.tensor(replay_slots(mine.numel(), others), dtype=torch.int64)
    U, extra = 1 + len(others), slots.numel() - mine.numel()
    state_row = int(before["state_of_slot"][slot])
    t = dict(slots=slots, state_rows=slots.clone(),
             x=torch.cat([before["x"][mine], torch.zeros(extra, D)]),
             y=torch.cat([before["y"][mine], torch.zeros(extra, dtype=torch.int64)]),
             priority=torch.cat([before["priority"][mine], torch.zeros(extra)]),
             n_classes=torch.cat([before["n_classes"][slot:slot + 1], torch.randint(1, C + 1, (U - 1,), generator=g)]))
    stand_in_hyper = _hyper(op, U, g, K)
    t["hyper"] = {k: torch.cat([v[slot:slot + 1], stand_in_hyper[k][1:]]) for k, v in before["hyper"].items()}
    for name in STATE[op] + READ.get(op, []):
        src = before[name][slot if name in SLOT_STATE else state_row]
        t[name] = torch.zeros((U,) + tuple(src.shape))
        t[name][0] = src
    return t


def _clone(t: dict) -> dict:
    out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    out["hyper"] = {k: v.clone() for k, v in t["hyper"].items()}
    return out


def _assert_replay_matches(op: str, before: dict, after: dict, slot: int, replayed: dict, seed: int) -> None:
    state_row = int(before["state_of_slot"][slot])
    first = STATE[op][0]
    where = slot if first in SLOT_STATE else state_row
    assert not torch.equal(after[first][where], before[first][where]), f"{op}: slot {slot} was not updated, seed={seed}"
    for name in STATE[op]:
        live = after[name][slot if name in SLOT_STATE else state_row]
        assert torch.equal(replayed[name][0], live), (
            f"{op}: replay of slot {slot} differs in {name} by up to "
            f"{(replayed[name][0] - live).abs().nan_to_num(0.0).max():.3g}, seed={seed}")


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("op", OPS)
def test_replay_with_stand_ins_is_bit_exact_on_the_torch_path(op, profile):
    counts, path, dims = PROFILES[profile]
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    with torch.device(CPU):
        before, session_slots = live_call(op, counts, g, dims=dims)
        live_batch = SlotBatch(before["slots"])
        assert live_batch.torch_path == path, f"profile {profile} picks {live_batch.torch_path}"
        after = _clone(before)
        run_op(op, after)
        for slot in session_slots[:MAX_REPLAYS]:
            others = live_batch.other_counts(slot)
            replayed = replay_call(op, before, slot, others, g)
            assert SlotBatch(replayed["slots"]).profile == live_batch.profile
            run_op(op, replayed)
            _assert_replay_matches(op, before, after, slot, replayed, seed)


@pytest.mark.parametrize("seed", [fresh_seed() for _ in range(4)])
def test_replay_layout_has_the_live_profile(seed):
    """For random mixes of sessions, replay_slots(own, other_counts) rebuilds the live profile and
    therefore the live torch grouping; replaying a session alone would not in general."""
    g = torch.Generator().manual_seed(seed)
    with torch.device(CPU):  # the generator is a CPU one (the default device may be CUDA)
        paths = set()
        for _ in range(25):
            sessions = int(torch.randint(2, 12, (1,), generator=g))
            counts = torch.randint(1, 6, (sessions,), generator=g)
            if bool(torch.rand(1, generator=g) < 0.3):
                counts[0] = int(torch.randint(20, 80, (1,), generator=g))  # one busy session: per-row grouping
            slots = torch.randperm(3 * sessions, generator=g)[:sessions].repeat_interleave(counts)
            slots = torch.cat([slots, torch.full((3,), -1)])[torch.randperm(slots.numel() + 3, generator=g)]
            live = SlotBatch(slots)
            assert sorted(live.profile, reverse=True) == sorted(counts.tolist(), reverse=True) == list(live.profile)
            paths.add(live.torch_path)
            for slot, own in zip(live.slot.tolist(), live.counts_list):
                layout = SlotBatch(torch.tensor(replay_slots(own, live.other_counts(slot))))
                assert layout.profile == live.profile, f"seed={seed}"
                assert layout.torch_path == live.torch_path, f"seed={seed}"
                assert layout.slot.tolist() == list(range(sessions)) and layout.counts_list[0] == own
                alone = SlotBatch(torch.zeros(own, dtype=torch.int64))
                assert alone.torch_path == "one_slot" != live.torch_path
        assert "padded" in paths, f"seed={seed}: the draws never exercised the padded grouping"


@pytest.mark.parametrize("op", OPS)
def test_triton_path_needs_no_stand_ins(op):
    """Triton programs read one slot's rows and state only: replaying a session alone gives what
    the mixed call wrote for it, bit for bit (under the interpreter when there is no GPU)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    device = torch.get_default_device()
    with torch.device(CPU):
        before, session_slots = live_call(op, [3, 1, 2], g, skipped=2)
        alone = {slot: replay_call(op, before, slot, [], g) for slot in session_slots[:2]}
    after = _to(_clone(before), device)
    run_op(op, after, impl="triton")
    for slot, replayed in alone.items():
        replayed = _to(replayed, device)
        run_op(op, replayed, impl="triton")
        _assert_replay_matches(op, before, _to(after, CPU), slot, _to(replayed, CPU), seed)


def _to(t: dict, device) -> dict:
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    out["hyper"] = {k: v.to(device) for k, v in t["hyper"].items()}
    return out


def test_prototype_sums_add_in_arrival_order_at_any_size():
    """Above 32768 updated elements index_put_(accumulate=True) adds on CPU threads in a race;
    the class sums must still be the rows added one after another, every time."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    with torch.device(CPU):
        R, C_, d, B = 3, 4, 768, 64  # 64 x 768 elements, a handful of (state row, class) cells
        x, y = torch.randn(B, d, generator=g), torch.randint(0, 2, (B,), generator=g)
        slots = torch.randint(0, 2, (B,), generator=g)
        sums0, counts0 = torch.randn(R, C_, d, generator=g), torch.zeros(R, C_)
        expected = sums0.clone()
        for i in range(B):
            expected[int(slots[i]), int(y[i])] += x[i]
        for _ in range(5):
            sums, counts, W = sums0.clone(), counts0.clone(), torch.zeros(2, C_, d)
            kernels.prototype_step(x, y, slots, slots, sums, counts, W, torch.tensor([C_, C_]), 1.0, impl="torch")
            assert torch.equal(sums, expected), f"seed={seed}"

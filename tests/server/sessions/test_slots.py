"""The slot pools: heads and rule state go in and come out bit for bit, a head takes a slot of
its own width, slots are reused and zeroed, pools grow without losing rows, the base head's
slot is never handed out, and bfloat16 storage rounds once."""

from __future__ import annotations

import math

import pytest
import torch

from server.errors import Unavailable
from server.rules import get_rule, per_slot_hyper
from server.sessions.slots import MIN_ROWS, SlotPools, width_for

S, C, D = 3, 40, 8


def pools(slots: int = S, head_dtype=torch.float32) -> SlotPools:
    g = torch.Generator().manual_seed(0)
    return SlotPools(slots, C, D, "cpu", torch.randn(2, D, generator=g), torch.randn(2, generator=g),
                     head_dtype=head_dtype)


def special(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    flat = t.view(-1)
    for i, v in enumerate((math.inf, -math.inf, math.nan, -0.0, 1e-45, 3.4e38)):
        flat[i % flat.numel()] = v
    return t


def test_widths_are_buckets_that_waste_at_most_a_third():
    assert [width_for(n) for n in (1, 4, 5, 6, 7, 8, 9, 10, 12, 13, 16, 17, 33, 64, 65, 1000)] == \
        [4, 4, 6, 6, 8, 8, 12, 12, 12, 16, 16, 24, 48, 64, 96, 1024]
    for n in range(4, 2000):
        assert n <= width_for(n) <= math.ceil(n * 1.5)


@pytest.mark.parametrize("name", ["sgd", "rls", "prototype", "t3a"])
@pytest.mark.parametrize("n", [3, 10, 37])
def test_write_then_read_is_bit_exact(name, n):
    p, rule = pools(), get_rule(name)
    tensors = {"W": special((n, D), 1), "b": special((n,), 2),
               **{k: special(s, 3 + i) for i, (k, s) in enumerate(rule.state_shapes(n, D).items())}}
    width, slot, row = p.alloc(rule, n)
    assert width == width_for(n) and p.pool(width).W.shape[1:] == (width, D)
    p.write(width, slot, row, rule, rule.validate({}), tensors)
    got = p.read(width, slot, row, rule, n)
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].view(torch.int32).equal(tensors[k].view(torch.int32)), k
    h = p.heads(width)
    assert int(h.n_classes[slot]) == n and bool(h.normalize[slot]) == rule.normalize
    for name, shape in rule.state_shapes(width, D).items():  # state rows are as wide as the pool
        assert h.pools[rule.name][name].shape[1:] == shape


def test_the_limit_counts_sessions_over_every_width_and_slots_are_reused_zeroed():
    p, rule = pools(), get_rule("sgd")
    base = p.heads(p.base_width).W[p.base_slot].clone()
    taken = [p.alloc(rule, 2), p.alloc(rule, 10), p.alloc(rule, 30)]
    assert {w for w, _, _ in taken} == {4, 12, 32} and p.n_free == 0
    assert (p.base_width, p.base_slot) not in {(w, s) for w, s, _ in taken}
    with pytest.raises(Unavailable):
        p.alloc(rule, 2)
    width, slot, _ = taken[1]
    p.write(width, slot, None, rule, rule.validate({"lr": 0.5}), {"W": torch.ones(10, D), "b": torch.ones(10)})
    assert float(p.heads(width).hyper["lr"][slot]) == 0.5
    p.release(width, slot, None, rule)
    assert p.n_free == 1
    h = p.heads(width)
    assert h.W[slot].abs().sum() == 0 and int(h.n_classes[slot]) == 0
    assert p.alloc(rule, 9)[:2] == (width, slot)
    assert p.heads(p.base_width).W[p.base_slot].equal(base)


def test_pools_grow_on_demand_without_losing_rows():
    n_sessions = 3 * MIN_ROWS + 1
    p, rule = pools(slots=1000), get_rule("prototype")
    placed = []
    for i in range(n_sessions):
        width, slot, row = p.alloc(rule, 5)
        p.write(width, slot, row, rule, rule.validate({}), {"W": torch.full((5, D), float(i)), "b": torch.zeros(5),
                                                            "sums": torch.full((5, D), float(i + 1)),
                                                            "counts": torch.full((5,), float(i + 1))})
        placed.append((width, slot, row))
    assert n_sessions <= p.pool(6).capacity <= 1.5 * n_sessions  # grown on demand, not preallocated for the limit
    for i, (width, slot, row) in enumerate(placed):
        got = p.read(width, slot, row, rule, 5)
        assert got["W"].eq(i).all() and got["sums"].eq(i + 1).all()


def test_memory_follows_the_sessions_not_the_limits():
    small = pools(slots=100_000)
    empty = small.nbytes()
    rule = get_rule("sgd")
    for _ in range(100):
        small.alloc(rule, 10)
    per_session = (small.nbytes() - empty) / small.pool(12).capacity
    # one 12-wide head (W, b) and its per-slot scalars: classes (int64), normalize (bool), and one
    # float32 per registered per-slot hyper-parameter
    assert per_session <= 12 * D * 4 + 12 * 4 + 8 + 1 + 4 * len(per_slot_hyper())


def test_bfloat16_storage_rounds_once_and_reads_back_as_float32():
    p, rule = pools(head_dtype=torch.bfloat16), get_rule("sgd")
    W = torch.randn(10, D)
    width, slot, _ = p.alloc(rule, 10)
    assert p.pool(width).W.dtype == torch.bfloat16
    p.write(width, slot, None, rule, rule.validate({}), {"W": W, "b": torch.zeros(10)})
    got = p.read(width, slot, None, rule, 10)["W"]
    assert got.dtype == torch.float32 and got.equal(W.to(torch.bfloat16).float())
    p.write(width, slot, None, rule, rule.validate({}), {"W": got, "b": torch.zeros(10)})
    assert p.read(width, slot, None, rule, 10)["W"].equal(got)  # a second trip changes nothing

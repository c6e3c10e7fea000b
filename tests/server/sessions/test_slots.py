"""The slot pool: heads and rule state go in and come out bit for bit, slots are reused and
zeroed, the base head's slot is never handed out, state pools grow without losing rows."""

from __future__ import annotations

import math

import pytest
import torch

from server.errors import Unavailable
from server.rules import get_rule
from server.sessions.slots import SlotPool

S, C, D = 3, 5, 8


def pool() -> SlotPool:
    g = torch.Generator().manual_seed(0)
    return SlotPool(S, C, D, "cpu", torch.randn(2, D, generator=g), torch.randn(2, generator=g))


def special(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    flat = t.view(-1)
    for i, v in enumerate((math.inf, -math.inf, math.nan, -0.0, 1e-45, 3.4e38)):
        flat[i % flat.numel()] = v
    return t


@pytest.mark.parametrize("name", ["sgd", "rls", "prototype", "t3a"])
def test_write_then_read_is_bit_exact(name):
    p, rule = pool(), get_rule(name)
    n = 3
    tensors = {"W": special((n, D), 1), "b": special((n,), 2),
               **{k: special(s, 3 + i) for i, (k, s) in enumerate(rule.state_shapes(n, D).items())}}
    slot, row = p.alloc(rule)
    p.write(slot, row, rule, rule.validate({}), tensors)
    got = p.read(slot, row, rule, n)
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert got[k].view(torch.int32).equal(tensors[k].view(torch.int32)), k
    assert int(p.n_classes[slot]) == n and bool(p.normalize[slot]) == rule.normalize


def test_slots_are_reused_zeroed_and_the_base_slot_is_never_given_out():
    p, rule = pool(), get_rule("sgd")
    base = p.W[p.base_slot].clone()
    taken = [p.alloc(rule) for _ in range(S)]
    assert sorted(s for s, _ in taken) == list(range(S)) and p.base_slot not in {s for s, _ in taken}
    with pytest.raises(Unavailable):
        p.alloc(rule)
    slot = taken[0][0]
    p.write(slot, None, rule, rule.validate({"lr": 0.5}), {"W": torch.ones(2, D), "b": torch.ones(2)})
    assert float(p.hyper["lr"][slot]) == 0.5
    p.release(slot, None, rule)
    assert p.W[slot].abs().sum() == 0 and int(p.n_classes[slot]) == 0
    assert p.alloc(rule)[0] == slot
    assert p.W[p.base_slot].equal(base)


def test_state_pool_grows_without_losing_rows():
    p, rule = pool(), get_rule("prototype")
    rows = []
    for i in range(S):
        slot, row = p.alloc(rule)
        p.write(slot, row, rule, rule.validate({}), {"W": torch.zeros(2, D), "b": torch.zeros(2),
                                                     "sums": torch.full((2, D), float(i + 1)),
                                                     "counts": torch.full((2,), float(i + 1))})
        rows.append((slot, row))
    for i, (slot, row) in enumerate(rows):
        assert p.read(slot, row, rule, 2)["sums"].eq(i + 1).all()

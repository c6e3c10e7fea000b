"""Tier moves on their own (a fake disk tier): least-recently-used eviction from device to host
to disk, bit-exact returns, and moves that stay consistent when the disk tier fails."""

from __future__ import annotations

import pytest
import torch

from server.rules import get_rule
from server.sessions.session import Held, Session
from server.sessions.slots import SlotPools
from server.sessions.tiers import Tiers

D = 4


class FakeDisk:
    def __init__(self) -> None:
        self.copies: dict[str, dict] = {}
        self.fail_save = self.fail_load = False
        self.stale: set[str] = set()

    def save(self, held, tensors) -> bool:
        if self.fail_save:
            raise OSError("disk full")
        if held.key in self.stale:
            return False
        self.copies[held.key] = {k: v.clone() for k, v in tensors.items()}
        return True

    def load(self, held):
        if self.fail_load:
            raise OSError("disk gone")
        return {k: v.clone() for k, v in self.copies[held.key].items()}

    def discard(self, held) -> None:
        self.copies.pop(held.key, None)


def setup(slots=2, host=1):
    disk = FakeDisk()
    tiers = Tiers(SlotPools(slots, 3, D, "cpu", torch.zeros(1, D), torch.zeros(1)), host, disk)
    return tiers, disk


def new(tiers, key: str, value: float) -> Held:
    rule = get_rule("sgd")
    held = Held(Session(key, rule, rule.validate({}), ["a", "b"]))
    tiers.place(held, {"W": torch.full((2, D), value), "b": torch.full((2,), value)})
    return held


def test_lru_eviction_chain_and_exact_return():
    tiers, disk = setup()
    a, b, c, d = (new(tiers, k, v) for k, v in zip("abcd", (1.0, 2.0, 3.0, 4.0)))
    assert (a.tier, b.tier, c.tier, d.tier) == ("disk", "host", "device", "device")
    assert tiers.counts() == {"device": 2, "host": 1, "disk": 1}
    tiers.to_device(a, pinned={"a"})  # back from disk; c (least recent on device) goes to host, b to disk
    assert (a.tier, b.tier, c.tier, d.tier) == ("device", "disk", "host", "device")
    assert tiers.tensors_of(a)["W"].eq(1.0).all() and "a" not in disk.copies
    assert tiers.tensors_of(b)["W"].eq(2.0).all()


def test_pinned_sessions_are_not_evicted():
    tiers, _ = setup(slots=2, host=4)
    a, b, c = new(tiers, "a", 1.0), new(tiers, "b", 2.0), new(tiers, "c", 3.0)  # a to host
    tiers.to_device(a, pinned={"a", "b"})  # c must go, though b is least recently used
    assert (a.tier, b.tier, c.tier) == ("device", "device", "host")


def test_a_failing_disk_leaves_every_session_where_it_was():
    tiers, disk = setup()
    a, b, c = new(tiers, "a", 1.0), new(tiers, "b", 2.0), new(tiers, "c", 3.0)  # a: host
    disk.fail_save = True
    with pytest.raises(OSError):
        new(tiers, "d", 4.0)  # b must go to host, a to disk: the disk fails
    assert a.tier == "host" and tiers.tensors_of(a)["W"].eq(1.0).all()
    disk.fail_save = False
    d, e = new(tiers, "d", 4.0), new(tiers, "e", 5.0)  # the store recovered: the next moves work
    assert (a.tier, b.tier, c.tier, d.tier, e.tier) == ("disk", "disk", "host", "device", "device")
    disk.fail_load = True
    with pytest.raises(OSError):
        tiers.to_device(a, pinned={"a"})
    assert a.tier == "disk" and tiers.pool.n_free + len(tiers.device) == 2  # no slot leaked
    disk.fail_load = False
    tiers.to_device(a, pinned={"a"})
    assert a.tier == "device" and tiers.tensors_of(a)["W"].eq(1.0).all()


def test_a_stale_disk_copy_is_forgotten():
    tiers, disk = setup(slots=1, host=0)
    a = new(tiers, "a", 1.0)
    disk.stale.add("a")
    new(tiers, "b", 2.0)  # a: device -> host -> disk, which says the copy is stale
    assert a.tier == "none" and tiers.counts() == {"device": 1, "host": 0, "disk": 0}

"""The device tier's memory: preallocated slot tensors holding many sessions' heads.

``W [S+1, C, d]``, ``b [S+1, C]``, ``n_classes [S+1]``, ``normalize [S+1]`` and one ``[S+1]``
tensor per per-slot hyper-parameter; slot S is the backbone's base head, never freed. Rule state
that only some sessions need (RLS ``P``, prototype sums, t3a supports) lives in one pool per
rule (``[R, ...]`` rows, grown by doubling). A session's tensors go in and come out as CPU float32
copies of its own size (``n`` classes), bit for bit.
"""

from __future__ import annotations

import torch

from server.errors import overloaded
from server.rules import RULES, Heads, Rule, per_slot_hyper


class StatePool:
    """Rows of one rule's state ([R, ...] tensors), grown by doubling up to max_rows."""

    def __init__(self, rule: Rule, C: int, d: int, device: torch.device, max_rows: int) -> None:
        self.shapes = rule.state_shapes(C, d)
        self.device, self.max_rows = device, max_rows
        self.tensors = {n: torch.zeros((0, *s), device=device) for n, s in self.shapes.items()}
        self.free: list[int] = []

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def alloc(self) -> int:
        if not self.free:
            cap = self.capacity
            new = min(max(2 * cap, 8), self.max_rows)
            if new <= cap:  # pragma: no cover - a pool never needs more rows than slots
                raise RuntimeError("state pool exhausted")
            for n, s in self.shapes.items():
                t = torch.zeros((new, *s), device=self.device)
                t[:cap] = self.tensors[n]
                self.tensors[n] = t
            self.free.extend(range(new - 1, cap - 1, -1))
        return self.free.pop()

    def release(self, row: int) -> None:
        for t in self.tensors.values():
            t[row].zero_()
        self.free.append(row)


def _region(shape) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


class SlotPool:
    def __init__(self, slots: int, C: int, d: int, device, base_W: torch.Tensor, base_b: torch.Tensor) -> None:
        self.S, self.C, self.d = slots, C, d
        self.device = dev = torch.device(device)
        S1 = slots + 1
        self.W = torch.zeros(S1, C, d, device=dev)
        self.b = torch.zeros(S1, C, device=dev)
        self.n_classes = torch.zeros(S1, dtype=torch.int64, device=dev)
        self.normalize = torch.zeros(S1, dtype=torch.bool, device=dev)
        self.hyper_defaults = per_slot_hyper()
        self.hyper = {n: torch.full((S1,), v, device=dev) for n, v in self.hyper_defaults.items()}
        self.pools = {r.name: StatePool(r, C, d, dev, slots) for r in RULES.values() if r.state}
        self.base_slot = slots
        nb = base_W.shape[0]
        self.W[slots, :nb] = base_W.to(dev)
        self.b[slots, :nb] = base_b.to(dev)
        self.n_classes[slots] = nb
        self.free = list(range(slots - 1, -1, -1))

    @property
    def heads(self) -> Heads:
        return Heads(self.W, self.b, self.n_classes, self.normalize, self.hyper,
                     {r: p.tensors for r, p in self.pools.items()})

    @property
    def n_free(self) -> int:
        return len(self.free)

    def alloc(self, rule: Rule) -> tuple[int, int | None]:
        """A free slot (and a state row when the rule has state). Raises Unavailable when none is
        free: the caller evicts first."""
        if not self.free:
            raise overloaded(1.0, "no device slot is free")
        row = self.pools[rule.name].alloc() if rule.state else None
        return self.free.pop(), row

    def write(self, slot: int, row: int | None, rule: Rule, hyper: dict, tensors: dict[str, torch.Tensor]) -> None:
        n = tensors["W"].shape[0]
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.W[slot, :n] = tensors["W"].to(self.device)
        self.b[slot, :n] = tensors["b"].to(self.device)
        self.n_classes[slot] = n
        self.normalize[slot] = rule.normalize
        for name, t in self.hyper.items():
            t[slot] = float(hyper.get(name, self.hyper_defaults[name]))
        if rule.state:
            for name, t in self.pools[rule.name].tensors.items():
                src = tensors[name]
                t[row].zero_()
                t[row][_region(src.shape)] = src.to(self.device)

    def read(self, slot: int, row: int | None, rule: Rule, n: int) -> dict[str, torch.Tensor]:
        """The session's head and state as CPU float32 copies of its own size."""
        out = {"W": self.W[slot, :n].cpu().clone(), "b": self.b[slot, :n].cpu().clone()}
        if rule.state:
            pool = self.pools[rule.name]
            for name, shape in rule.state_shapes(n, self.d).items():
                out[name] = pool.tensors[name][row][_region(shape)].cpu().clone()
        return out

    def release(self, slot: int, row: int | None, rule: Rule) -> None:
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.n_classes[slot] = 0
        self.normalize[slot] = False
        if row is not None:
            self.pools[rule.name].release(row)
        self.free.append(slot)

"""The device tier's memory: slot tensors holding many sessions' heads, sized by the sessions.

Heads live in one pool per *width* (a class count bucket: 4, 6, 8, 12, 16, 24, 32, 48, 64, ...,
each step x1.5 or x4/3), so a 10-class head takes a 12-wide slot, not one as wide as the widest
head the server allows. A width's pool holds ``W [R, w, d]`` and ``b [R, w]`` (``head_dtype``:
float32, or bfloat16 storage with float32 arithmetic in the kernels), ``n_classes [R]``,
``normalize [R]`` and one ``[R]`` tensor per per-slot hyper-parameter, and per rule with state
(RLS ``P``, prototype sums, t3a supports) a ``StatePool`` of ``[rows, ...]`` tensors. Every pool
starts small and grows by half when it runs out (rows not yet used are not touched, so host
memory follows the sessions); together they hold at most ``S`` sessions
(``--max-device-sessions``). The base head (the backbone's own) has a slot of its own in its
width's pool, outside the ``S``.

A slot is ``(width, index)``. A kernel call works on one width's tensors (``heads(width)``), so
a micro-batch makes one call per op per width in use (usually one). A session's tensors go in
and come out as CPU float32 copies of its own size (``n`` classes): bit for bit in float32, and
rounded once to bfloat16 when it enters a bfloat16 pool.
"""

from __future__ import annotations

from typing import Optional

import torch

from server.errors import overloaded
from server.rules import RULES, Heads, Rule, device_learned, per_slot_hyper

MIN_ROWS = 16  # a pool's first allocation


def width_for(n: int) -> int:
    """The pool width of an n-class head: the smallest of 4, 6, 8, 12, 16, 24, 32, ... >= n."""
    w, half = 4, False
    while w < n:
        w = w * 3 // 2 if not half else w * 4 // 3
        half = not half
    return w


def _grown(t: torch.Tensor, rows: int, zeroed: bool = True) -> torch.Tensor:
    """t with `rows` rows: its own first, then zeros, or (zeroed False: rows every user writes
    before it reads them) memory that is not touched, so on the host it costs nothing until used."""
    make = torch.zeros if zeroed else torch.empty
    out = make((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def _next_capacity(cap: int, limit: int) -> int:
    # x1.5: a pool's unused tail stays under a third of it (on a GPU that memory is held)
    return min(max(cap + cap // 2, MIN_ROWS), limit)


class StatePool:
    """Rows of one rule's state ([R, ...] float32 tensors), grown by half up to max_rows."""

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
            new = _next_capacity(cap, self.max_rows)
            if new <= cap:  # pragma: no cover - a pool never needs more rows than slots
                raise RuntimeError("state pool exhausted")
            self.tensors = {n: _grown(t, new, zeroed=False) for n, t in self.tensors.items()}
            self.free.extend(range(new - 1, cap - 1, -1))
        return self.free.pop()

    def release(self, row: int) -> None:
        for t in self.tensors.values():
            t[row].zero_()
        self.free.append(row)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _region(shape) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


class WidthPool:
    """The slots of one width: heads of up to `width` classes, grown by half up to max_rows."""

    def __init__(self, width: int, d: int, device: torch.device, head_dtype: torch.dtype, max_rows: int,
                 learned: Optional[dict] = None) -> None:
        self.width, self.d, self.device, self.max_rows = width, d, device, max_rows
        self.learned = learned or {}  # learned rules' parameters on the device, shared by every pool
        self.hyper_defaults = per_slot_hyper()
        self.W = torch.zeros(0, width, d, dtype=head_dtype, device=device)
        self.b = torch.zeros(0, width, dtype=head_dtype, device=device)
        self.n_classes = torch.zeros(0, dtype=torch.int64, device=device)
        self.normalize = torch.zeros(0, dtype=torch.bool, device=device)
        self.hyper = {n: torch.zeros(0, device=device) for n in self.hyper_defaults}
        self.states = {r.name: StatePool(r, width, d, device, max_rows) for r in RULES.values() if r.state}
        self.free: list[int] = []
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.W.shape[0]

    @property
    def heads(self) -> Heads:
        return Heads(self.W, self.b, self.n_classes, self.normalize, self.hyper,
                     {r: p.tensors for r, p in self.states.items()}, self.learned)

    def _grow(self) -> None:
        cap = self.capacity
        new = _next_capacity(cap, self.max_rows)
        if new <= cap:  # pragma: no cover - SlotPools counts sessions before it asks
            raise RuntimeError("width pool exhausted")
        # heads and state rows are zeroed by write() before a session uses its slot
        self.W, self.b = _grown(self.W, new, zeroed=False), _grown(self.b, new, zeroed=False)
        self.n_classes, self.normalize = _grown(self.n_classes, new), _grown(self.normalize, new)
        self.hyper = {n: _grown(t, new) for n, t in self.hyper.items()}
        self.free.extend(range(new - 1, cap - 1, -1))

    def alloc(self, rule: Rule) -> tuple[int, int | None]:
        if not self.free:
            self._grow()
        row = self.states[rule.name].alloc() if rule.state else None
        self.used += 1
        return self.free.pop(), row

    def write(self, slot: int, row: int | None, rule: Rule, hyper: dict, tensors: dict[str, torch.Tensor]) -> None:
        n = tensors["W"].shape[0]
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.W[slot, :n] = tensors["W"].to(self.device, self.W.dtype)
        self.b[slot, :n] = tensors["b"].to(self.device, self.b.dtype)
        self.n_classes[slot] = n
        self.normalize[slot] = rule.normalize
        for name, t in self.hyper.items():
            t[slot] = float(hyper.get(name, self.hyper_defaults[name]))
        if rule.state:
            for name, t in self.states[rule.name].tensors.items():
                src = tensors[name]
                t[row].zero_()
                t[row][_region(src.shape)] = src.to(self.device)

    def read(self, slot: int, row: int | None, rule: Rule, n: int) -> dict[str, torch.Tensor]:
        out = {"W": self.W[slot, :n].float().cpu().clone(), "b": self.b[slot, :n].float().cpu().clone()}
        if rule.state:
            pool = self.states[rule.name]
            for name, shape in rule.state_shapes(n, self.d).items():
                out[name] = pool.tensors[name][row][_region(shape)].cpu().clone()
        return out

    def release(self, slot: int, row: int | None, rule: Rule) -> None:
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.n_classes[slot] = 0
        self.normalize[slot] = False
        if row is not None:
            self.states[rule.name].release(row)
        self.free.append(slot)
        self.used -= 1

    def nbytes(self) -> int:
        tensors = [self.W, self.b, self.n_classes, self.normalize, *self.hyper.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(p.nbytes() for p in self.states.values())


class SlotPools:
    """Every width's pool, and the base head's slot. At most `slots` sessions hold a slot."""

    def __init__(self, slots: int, C: int, d: int, device, base_W: torch.Tensor, base_b: torch.Tensor,
                 head_dtype: torch.dtype = torch.float32, learned: Optional[dict] = None) -> None:
        self.S, self.C, self.d = slots, C, d
        self.device = torch.device(device)
        self.learned = device_learned(learned, self.device)
        self.head_dtype = head_dtype
        self.widths: dict[int, WidthPool] = {}
        nb = base_W.shape[0]
        self.base_width = width_for(nb)
        base = self._pool(self.base_width)
        self.base_slot, _ = base.alloc(_NO_STATE)
        base.used -= 1  # the base head is not one of the S sessions
        base.write(self.base_slot, None, _NO_STATE, {}, {"W": base_W, "b": base_b})
        self.used = 0

    def _pool(self, width: int) -> WidthPool:
        pool = self.widths.get(width)
        if pool is None:
            # +1: the base head's slot lives in one of them
            pool = self.widths[width] = WidthPool(width, self.d, self.device, self.head_dtype, self.S + 1,
                                                  self.learned)
        return pool

    def heads(self, width: int) -> Heads:
        return self.widths[width].heads

    def pool(self, width: int) -> WidthPool:
        return self.widths[width]

    @property
    def n_free(self) -> int:
        return self.S - self.used

    def alloc(self, rule: Rule, n: int) -> tuple[int, int, int | None]:
        """A free slot for an n-class head of `rule` -> (width, slot, state row or None). Raises
        Unavailable when the S slots are taken: the caller evicts first."""
        if self.used >= self.S:
            raise overloaded(1.0, "no device slot is free")
        width = width_for(n)
        slot, row = self._pool(width).alloc(rule)
        self.used += 1
        return width, slot, row

    def write(self, width: int, slot: int, row: int | None, rule: Rule, hyper: dict,
              tensors: dict[str, torch.Tensor]) -> None:
        self.widths[width].write(slot, row, rule, hyper, tensors)

    def read(self, width: int, slot: int, row: int | None, rule: Rule, n: int) -> dict[str, torch.Tensor]:
        """The session's head and state as CPU float32 copies of its own size."""
        return self.widths[width].read(slot, row, rule, n)

    def release(self, width: int, slot: int, row: int | None, rule: Rule) -> None:
        self.widths[width].release(slot, row, rule)
        self.used -= 1

    def nbytes(self) -> int:
        """Bytes of device memory the pools hold (allocated, used or not)."""
        return sum(p.nbytes() for p in self.widths.values())


class _NoState:
    name, state, normalize = "base", {}, False


_NO_STATE = _NoState()

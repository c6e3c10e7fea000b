"""Where a held session's tensors live: a device slot, host memory, or the disk tier (the store).

At most ``S`` sessions hold a slot; taking a slot when none is free moves the least recently
used device session (not pinned by the current batch) to host memory, and beyond
``max_host`` host sessions the least recently used one goes to the disk tier. Touching a
session brings it back bit for bit (float32 copies, no arithmetic).

Moves are exception-safe: a destination is secured before a source is dropped, so a failing
store (disk full, Redis blip) leaves every session where it was, and a slot taken for a move
that fails is given back.

The disk tier is the store's (``Disk``): what saving, loading and discarding a disk copy means
depends on the durability mode, so the store implements it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Protocol

import torch

from server.errors import overloaded
from server.sessions.session import Held
from server.sessions.slots import SlotPools

log = logging.getLogger("fwserve.store")
Tensors = dict[str, torch.Tensor]


class Disk(Protocol):
    def save(self, held: Held, tensors: Tensors) -> bool:
        """Make `tensors` the session's disk copy. False: the copy was stale and has been forgotten."""

    def load(self, held: Held) -> Tensors:
        """The session's tensors from its disk copy (CPU float32)."""

    def discard(self, held: Held) -> None:
        """The session left the disk tier: drop its disk copy if it is only a spill copy."""


class Tiers:
    def __init__(self, pool: SlotPools, max_host: int, disk: Disk,
                 on_move: Optional[Callable[[str, str], None]] = None) -> None:
        self.pool, self.max_host, self.disk = pool, max_host, disk
        self.on_move = on_move or (lambda kind, tier: None)  # ("evict", to_tier) | ("restore", from_tier)
        self.device: OrderedDict[str, Held] = OrderedDict()
        self.host: OrderedDict[str, Held] = OrderedDict()
        self.n_disk = 0

    def counts(self) -> dict[str, int]:
        return {"device": len(self.device), "host": len(self.host), "disk": self.n_disk}

    # ---- reading ----------------------------------------------------------------------------

    def tensors_of(self, held: Held) -> Tensors:
        """The session's head and state as CPU copies, from whichever tier holds it."""
        if held.tier == "host":
            return {k: v.clone() for k, v in held.host.items()}
        if held.tier == "disk":
            return self.disk.load(held)
        if held.tier == "device":
            s = held.session
            return self.pool.read(held.width, held.slot, held.state_row, s.rule, len(s.classes))
        raise RuntimeError(f"session {held.key} holds no tensors")

    # ---- moves ------------------------------------------------------------------------------

    def place(self, held: Held, tensors: Tensors, pinned: Iterable[str] = ()) -> None:
        """Put a session that holds no tensors (new, reset, imported) into a device slot."""
        assert held.tier == "none", held.tier
        place = self._take_slot(held, set(pinned) | {held.key})
        self._fill(held, place, tensors)

    def admit_host(self, held: Held, tensors: Tensors) -> None:
        """A session loaded from the store enters host memory (the next use moves it up)."""
        assert held.tier == "none", held.tier
        held.host, held.tier = tensors, "host"
        self.host[held.key] = held
        self._spill_host(keep={held.key})

    def to_device(self, held: Held, pinned: Iterable[str]) -> None:
        if held.tier == "device":
            self.device.move_to_end(held.key)
            return
        came_from = held.tier
        place = self._take_slot(held, set(pinned) | {held.key})
        try:
            tensors = self.tensors_of(held)
        except BaseException:
            self.pool.release(*place, held.session.rule)
            raise
        if came_from == "host":
            del self.host[held.key]
        else:
            self.n_disk -= 1
            try:
                self.disk.discard(held)
            except Exception as e:  # a leftover spill copy is overwritten on the next spill
                log.warning("session %s: dropping its disk copy failed: %s", held.key, e)
        held.host = None
        self._fill(held, place, tensors)
        self.on_move("restore", came_from)

    def drop(self, held: Held) -> None:
        """Release the session's tensors from whichever tier holds them (tier becomes none)."""
        if held.tier == "device":
            self._release(held)
        elif held.tier == "host":
            self.host.pop(held.key, None)
            held.host = None
        elif held.tier == "disk":
            self.n_disk -= 1
            self.disk.discard(held)
        held.tier = "none"

    # ---- internals --------------------------------------------------------------------------

    def _fill(self, held: Held, place: tuple[int, int, Optional[int]], tensors: Tensors) -> None:
        s = held.session
        self.pool.write(*place, s.rule, s.hyper, tensors)
        (held.width, held.slot, held.state_row), held.tier = place, "device"
        self.device[held.key] = held
        self.device.move_to_end(held.key)

    def _take_slot(self, held: Held, pinned: set[str]) -> tuple[int, int, Optional[int]]:
        """(width, slot, state row) for the session, evicting the least recently used one first
        when every slot is taken."""
        if not self.pool.n_free:
            victim = next((h for k, h in self.device.items() if k not in pinned), None)
            if victim is None:
                raise overloaded(1.0, "no device slot is free")
            self._evict_to_host(victim, keep=pinned)
        return self.pool.alloc(held.session.rule, len(held.session.classes))

    def _release(self, held: Held) -> None:
        self.pool.release(held.width, held.slot, held.state_row, held.session.rule)
        self.device.pop(held.key, None)
        held.width = held.slot = held.state_row = None

    def _evict_to_host(self, held: Held, keep: set[str]) -> None:
        tensors = self.tensors_of(held)
        self._release(held)
        held.host, held.tier = tensors, "host"
        self.host[held.key] = held
        self.on_move("evict", "host")
        self._spill_host(keep)

    def _spill_host(self, keep: set[str]) -> None:
        """Move the least recently used host sessions to disk, down to max_host; sessions in
        `keep` (the ones the current call is moving up) stay."""
        while len(self.host) > self.max_host:
            oldest = next((h for k, h in self.host.items() if k not in keep), None)
            if oldest is None:
                return
            self._evict_to_disk(oldest)

    def _evict_to_disk(self, held: Held) -> None:
        saved = self.disk.save(held, held.host)  # raises: the session stays in host memory
        del self.host[held.key]
        held.host = None
        if not saved:  # stale: the store has forgotten it
            held.tier = "none"
            return
        held.tier = "disk"
        self.n_disk += 1
        self.on_move("evict", "disk")

"""Idempotency-Keys: what a retry with the same key gets back, and which request a key belongs to.

Two records, both kept for ``--idempotency-ttl-s`` (24 h by default, as payment APIs do):

- per session (``IdempotencyRecords``): the first response of each adapt made with a key, and the
  key of the request that created the session. They travel with the session — in its snapshots
  and, for adapts, in the log record of the adapt they answer — so a retry after a restart or on
  another replica gets the same answer. Bounded by ``--idempotency-max-bytes`` per session; past
  it the oldest answers are dropped, counted and logged, never silently.
- per tenant (claims, kept by the store backend): key -> the session and request fingerprint it
  was first used with. A key is the tenant's: reused on another session, or with another body
  (compared as parsed content), it is refused (422) whatever session it is sent to.

An entry is ``{"fp", "expires", "response"}``; a claim is ``{"owner", "fp", "expires"}``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from typing import Callable, Optional

from server.errors import idempotency_reused

Idem = tuple[str, str]  # (Idempotency-Key, request fingerprint)


def _size(entry: dict) -> int:
    return len(json.dumps(entry["response"], separators=(",", ":"))) + 128


class IdempotencyRecords:
    def __init__(self, max_bytes: int = 1 << 20, on_evict: Optional[Callable[[int], None]] = None) -> None:
        self.max_bytes, self.on_evict = max_bytes, on_evict
        self.adapts: OrderedDict[str, dict] = OrderedDict()
        self.create: Optional[dict] = None
        self.bytes = 0

    def lookup(self, idem: Optional[Idem], now: Optional[float] = None) -> Optional[dict]:
        """The stored response of an earlier request with this key, or None; InvalidInput when
        the key was used with a different request."""
        if not idem:
            return None
        entry = self.adapts.get(idem[0])
        if entry is None:
            return None
        if entry["expires"] <= (time.time() if now is None else now):
            self._drop(idem[0])
            return None
        if entry["fp"] != idem[1]:
            raise idempotency_reused()
        return copy.deepcopy(entry["response"])

    def remember(self, idem: Idem, response: dict, ttl: float) -> dict:
        """Keep a response under its key; returns the entry (logged with its adapt in wal mode)."""
        entry = {"fp": idem[1], "expires": time.time() + ttl, "response": copy.deepcopy(response)}
        self.put(idem[0], entry)
        return entry

    def put(self, key: str, entry: dict) -> None:
        self._drop(key)
        self.adapts[key] = entry
        self.bytes += _size(entry)
        now, evicted = time.time(), 0
        while self.bytes > self.max_bytes and len(self.adapts) > 1:
            oldest = next(iter(self.adapts))
            if self.adapts[oldest]["expires"] > now:
                evicted += 1
            self._drop(oldest)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)

    def _drop(self, key: str) -> None:
        entry = self.adapts.pop(key, None)
        if entry is not None:
            self.bytes -= _size(entry)

    def keys(self) -> list[str]:
        """Every key this session holds (its adapts' and its creating request's)."""
        out = list(self.adapts)
        if self.create:
            out.append(self.create["key"])
        return out

    def created_by(self, idem: Optional[Idem]) -> Optional[bool]:
        """For a create with this key: True if it made this session (same request), None if the
        key is not this session's creator; InvalidInput when the same key came with another body."""
        c = self.create
        if not idem or not c or c["key"] != idem[0] or c["expires"] <= time.time():
            return None
        if c["fp"] != idem[1]:
            raise idempotency_reused()
        return True

    def to_meta(self) -> dict:
        now = time.time()
        return {"create_idempotency": self.create,
                "idempotency": [{"key": k, **e} for k, e in self.adapts.items() if e["expires"] > now]}

    @classmethod
    def from_meta(cls, meta: dict, max_bytes: int, on_evict=None) -> "IdempotencyRecords":
        out = cls(max_bytes, on_evict)
        out.create = meta.get("create_idempotency")
        now = time.time()
        for e in meta.get("idempotency", ()):
            if e["expires"] > now:
                out.put(e["key"], {"fp": e["fp"], "expires": e["expires"], "response": e["response"]})
        return out


def claim_conflicts(wanted: dict[str, dict], held: dict[str, dict]) -> set[str]:
    """Keys whose earlier claim (`held`, as a backend returns it) names another session or another
    request than the one `wanted` now."""
    return {k for k, prev in held.items() if (prev.get("owner"), prev.get("fp")) != (wanted[k]["owner"], wanted[k]["fp"])}

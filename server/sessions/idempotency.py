"""Idempotency records of one session: what a retry with the same Idempotency-Key gets back.

An entry is ``{"fp", "expires", "response"}``: the request's fingerprint, when the entry may be
forgotten, and the first response (plain JSON data). The creating request's key is kept apart
(``create``: ``{"key", "fp", "expires"}``). Records travel with the session: in its snapshots
and, for adapts, in the log record of the adapt they answer.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from typing import Optional

from server.errors import idempotency_reused

Idem = tuple[str, str]  # (Idempotency-Key, request fingerprint)


class IdempotencyRecords:
    def __init__(self, max_keys: int = 128) -> None:
        self.max_keys = max_keys
        self.adapts: OrderedDict[str, dict] = OrderedDict()
        self.create: Optional[dict] = None

    def lookup(self, idem: Optional[Idem], now: Optional[float] = None) -> Optional[dict]:
        """The stored response of an earlier request with this key, or None; InvalidInput when
        the key was used with a different request."""
        if not idem:
            return None
        entry = self.adapts.get(idem[0])
        if entry is None:
            return None
        if entry["expires"] <= (time.time() if now is None else now):
            del self.adapts[idem[0]]
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
        self.adapts.pop(key, None)
        self.adapts[key] = entry
        while len(self.adapts) > self.max_keys:
            self.adapts.popitem(last=False)

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
    def from_meta(cls, meta: dict, max_keys: int) -> "IdempotencyRecords":
        out = cls(max_keys)
        out.create = meta.get("create_idempotency")
        now = time.time()
        for e in meta.get("idempotency", ()):
            if e["expires"] > now:
                out.put(e["key"], {"fp": e["fp"], "expires": e["expires"], "response": e["response"]})
        return out

"""A session's history: one entry per version, what retention keeps, and where a retained
version's state comes from.

A version number names one state for the whole life of a session id (create is 0; every adapt,
reset, import and rollback appends one). Each version has an entry (``Version``): when, what
kind of change, how many examples (labelled or not), the id of the API key that applied it (or
the guard), the statistics so far, and what a guard did there. Entries travel in the log record
of their version (``Record.info``) and, for the versions no record holds (a session's first
version, a snapshot's own), in the snapshot's metadata (``history``); exports carry all of them.

Retention (``Retention``: --history-versions, --history-max-age-s, --history-max-bytes) sets
the oldest version a client may address (``floor``). A retained version's state is materialised
from the nearest *anchor* at or before it (a snapshot, an archived snapshot, a state record)
plus the log records after the anchor, replayed (server/sessions/wal.py). Where the anchors
live depends on the durability mode:

- ``wal``: in the store. Compaction writes the current state as the snapshot and asks the
  backend to keep the history from the newest anchor at or before the floor (``keep_from``):
  the snapshot it replaces is archived, older anchors and records are dropped. Nothing is
  replayed to keep history; a materialisation reads the store.
- ``none`` / ``snapshot``: in memory (``Ring``): the log records of the retained versions (their
  update inputs) and a copy of the state every few versions, bounded by --history-max-bytes per
  session. A restart keeps only the current version.

``VersionCache`` keeps recently materialised states for a short while: a version's state never
changes, so an entry is valid for as long as the session's incarnation is.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from server.sessions.codec import Record

KINDS = ("create", "adapt", "reset", "import", "rollback", "fork")


@dataclass
class Version:
    """One version's history entry."""

    version: int
    t: float
    kind: str = "adapt"
    examples: int = 0
    labelled: int = 0
    key_id: Optional[str] = None  # the API key id that applied it (never the key); None: auth off
    by: str = "client"  # client | guard
    source: Optional[dict] = None  # rollback: {"version"}; fork: {"session", "version"}; import: the export's
    seen: int = 0  # statistics after this version
    correct: int = 0
    total: int = 0
    guard: Optional[dict] = None  # what the session's guard did at this version
    bytes: int = 0  # size of its log record (retention by bytes)
    logged: bool = False  # a kept log record (wal) or ring record holds it

    def info(self) -> dict:
        """As a log record carries it."""
        out = {"kind": self.kind, "key_id": self.key_id, "by": self.by, "cum": [self.seen, self.correct, self.total]}
        if self.source:
            out["source"] = self.source
        if self.guard:
            out["guard"] = self.guard
        return out

    @classmethod
    def of_record(cls, rec: Record, nbytes: int = 0) -> "Version":
        info = rec.info or {}
        cum = info.get("cum") or [0, 0, 0]
        return cls(rec.version, rec.t, str(info.get("kind") or ("reset" if rec.state is not None else "adapt")),
                   rec.n, rec.labelled, info.get("key_id"), str(info.get("by") or "client"), info.get("source"),
                   int(cum[0]), int(cum[1]), int(cum[2]), info.get("guard"), nbytes, True)

    def to_meta(self) -> dict:
        out = asdict(self)
        out.pop("logged")
        return out

    @classmethod
    def from_meta(cls, m: dict) -> "Version":
        known = {k: m[k] for k in cls.__dataclass_fields__ if k in m and k != "logged"}
        return cls(**known)

    def public(self) -> dict:
        """What GET /v1/sessions/{id}/versions shows of it."""
        return {"version": self.version, "time": self.t, "kind": self.kind, "examples": self.examples,
                "labelled": self.labelled, "key_id": self.key_id, "by": self.by, "source": self.source,
                "prequential": {"correct": self.correct, "total": self.total,
                                "accuracy": self.correct / self.total if self.total else None},
                "guard": self.guard}


@dataclass(frozen=True)
class Retention:
    versions: int = 64  # the current version and the ones before it
    max_age_s: float = 0.0  # 0: no age limit
    max_bytes: int = 1 << 20  # log records of the retained versions (ring: all it holds)

    def floor(self, entries: list[Version], now: float) -> int:
        """The oldest version clients may address (entries: ascending, the last is current)."""
        if not entries:
            return 0
        top = entries[-1].version
        f = max(top - self.versions + 1, entries[0].version)
        if self.max_age_s:
            young = [e.version for e in entries if e.t >= now - self.max_age_s]
            f = max(f, young[0] if young else top)
        if self.max_bytes:
            total = 0
            for e in reversed(entries):
                if e.version <= f:
                    break
                total += e.bytes
                if total > self.max_bytes:
                    f = e.version
                    break
        return min(f, top)


class History:
    """A held session's entries (ascending) and the versions it can be materialised from."""

    def __init__(self, retention: Retention, ring: bool = False) -> None:
        self.retention = retention
        self.entries: list[Version] = []
        self.anchors: set[int] = set()  # wal: versions of stored snapshots, archives and state records
        self.ring: Optional[Ring] = Ring() if ring else None

    def add(self, entry: Version) -> None:
        while self.entries and self.entries[-1].version >= entry.version:  # a version rewritten (never acknowledged)
            self.entries.pop()
        self.entries.append(entry)

    @property
    def current(self) -> Optional[Version]:
        return self.entries[-1] if self.entries else None

    def entry(self, version: int) -> Optional[Version]:
        for e in reversed(self.entries):
            if e.version == version:
                return e
            if e.version < version:
                return None
        return None

    def floor(self, now: Optional[float] = None) -> int:
        """The oldest addressable version: retention's floor, and nothing older than what can be
        materialised."""
        f = self.retention.floor(self.entries, time.time() if now is None else now)
        sources = self.ring.anchors if self.ring is not None else self.anchors
        if sources:
            f = max(f, min(sources))
        elif self.entries:
            f = self.entries[-1].version
        return f

    def keep_from(self, also: int, now: Optional[float] = None) -> int:
        """The newest anchor at or before the floor (`also`: an anchor about to be written)."""
        f = self.retention.floor(self.entries, time.time() if now is None else now)
        below = [v for v in (self.anchors | {also}) if v <= f]
        return max(below) if below else min(self.anchors | {also})

    def trim(self, keep_from: int) -> None:
        """Forget what the store no longer keeps (versions before `keep_from`, the record at it)."""
        self.entries = [e for e in self.entries if e.version >= keep_from] or self.entries[-1:]
        self.anchors = {v for v in self.anchors if v >= keep_from}
        for e in self.entries:
            if e.version <= keep_from:
                e.logged = False

    def unlogged(self, keep_from: int) -> list[dict]:
        """Entries from `keep_from` on that no kept record holds (records up to `keep_from` are
        dropped): a snapshot carries them."""
        return [e.to_meta() for e in self.entries
                if e.version >= keep_from and (not e.logged or e.version <= keep_from)]


class Ring:
    """Without a log: the retained versions' records and a state copy every few versions, in memory."""

    def __init__(self) -> None:
        self.anchors: dict[int, dict[str, torch.Tensor]] = {}
        self.records: dict[int, Record] = {}
        self.bytes = 0

    def add_anchor(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        self.anchors[version] = tensors
        self.bytes += _size(tensors)

    def add_record(self, rec: Record) -> None:
        self.records[rec.version] = rec
        self.bytes += _record_size(rec)
        if rec.state is not None:
            self.anchors[rec.version] = rec.state

    def last_anchor(self) -> int:
        return max(self.anchors) if self.anchors else -1

    def drop_before(self, version: int) -> None:
        for v in [v for v in self.anchors if v < version]:
            t = self.anchors.pop(v)
            if v not in self.records:
                self.bytes -= _size(t)
        for v in [v for v in self.records if v < version]:
            self.bytes -= _record_size(self.records.pop(v))

    def chunk_starts(self) -> list[int]:
        return sorted(self.anchors)


def anchor_interval(retention: Retention) -> int:
    """Versions between state copies in the ring: a quarter of the retained count, at most 16."""
    return max(1, min(16, retention.versions // 4))


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _record_size(rec: Record) -> int:
    if rec.state is not None:
        return _size(rec.state)
    return sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y, _ in rec.steps) + 256


@dataclass
class VersionCache:
    """Materialised states of recent versions, (key, incarnation, version) -> tensors; bounded in
    entries and kept `ttl_s` seconds."""

    max_entries: int = 64
    ttl_s: float = 60.0
    _items: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: tuple) -> Optional[dict[str, torch.Tensor]]:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if hit[0] < time.monotonic() - self.ttl_s:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: tuple, tensors: dict[str, torch.Tensor]) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._items[key] = (time.monotonic(), tensors)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def forget(self, session_key: str) -> None:
        with self._lock:
            for k in [k for k in self._items if k[0] == session_key]:
                del self._items[k]

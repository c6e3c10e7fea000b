"""The store below the device and host tiers: one interface, two backends (``--store``).

Per session key (``id``, or ``tenant/id`` when API keys are on) a backend holds:

- a **head** ``(incarnation, version)``. The incarnation is a random id given at create and at
  an import that starts a session afresh; the version numbers the session's states (+1 for
  every adapt, reset, import and rollback). The pair is the compare-and-set token of the
  multi-replica protocol: a replica's copy of a session is current exactly when the store's
  head equals the copy's ``(incarnation, synced version)``.
- a **snapshot**: the session's encoded state at version ``snap_version``
  (server/sessions/codec.py).
- a **write-ahead log** (``--durability wal``): one record per version, in order, up to
  ``version``. Those after the snapshot make the current state; those before it are history,
  kept for retained versions (``put``'s ``keep_from``). Records are opaque bytes here, except for
  their (incarnation, version) header, read with the codec.
- **archived snapshots**: earlier snapshots kept as history anchors (a retained version is
  materialised from the nearest snapshot or state record at or before it, plus the log).

Backends raise ``StoreError`` for anything the medium does wrong (disk full, Redis unreachable).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Iterable, Optional


@dataclass(frozen=True)
class Head:
    inc: str
    version: int


@dataclass
class Stored:
    """What the store holds for one session."""

    inc: str
    version: int
    snap_version: int
    snapshot: bytes
    records: list[bytes] = field(default_factory=list)  # raw log records (history, then those after the snapshot)
    archives: list[int] = field(default_factory=list)  # versions of the archived snapshots
    anchors: dict[int, bytes] = field(default_factory=dict)  # history(): every snapshot blob by version


class StoreError(Exception):
    """The store could not be read or written (disk full, Redis unreachable, ...)."""


class Backend:
    """The interface; see the module docstring."""

    shared = False  # may other processes write the same sessions (do reads need a version check)?
    url = ""

    def heads(self, keys: Iterable[str]) -> dict[str, "Optional[Head] | StoreError"]:
        """The current head of each key (None: no such session). A key whose head cannot be read
        maps to its StoreError, so the other keys are still served; raises StoreError when the
        call as a whole fails."""
        raise NotImplementedError

    def load(self, key: str) -> Optional[Stored]:
        raise NotImplementedError

    def create(self, key: str, inc: str, snapshot: bytes, max_tenant: int = 0, max_total: int = 0) -> str:
        """Write a new session at version 0 unless it exists or a quota is full:
        -> 'ok' | 'exists' | 'tenant_quota' | 'limit'."""
        raise NotImplementedError

    def put(self, key: str, inc: str, version: int, snapshot: bytes, expect=None,
            keep_from: Optional[int] = None) -> bool:
        """Snapshot at `version` becomes the session's state (created if absent). `expect`: None
        (unconditional), a Head (only if the session's head equals it) or "absent" (only if there
        is no such session). `keep_from` None: log records up to `version` and every archived
        snapshot are dropped. `keep_from` = v (same incarnation, an anchor: a snapshot or state
        record at v): history from version v on is kept: the snapshot this replaces is archived
        when its version is >= v (and differs from `version`), archived snapshots before v and log
        records up to v are dropped, the rest stay. Another incarnation drops the whole log and
        every archive. The head's version is never lowered by a put of the same incarnation.
        -> written?"""
        raise NotImplementedError

    def history(self, key: str) -> Optional[Stored]:
        """Everything kept of one session: its snapshot and archived snapshots (`anchors`,
        by version) and its whole log (None: no such session)."""
        raise NotImplementedError

    def append(self, batch: dict[str, tuple[Head, list[bytes]]]) -> dict[str, str]:
        """Append log records per key, each key only if its head equals the given one; the head's
        version advances by the number of records. Keys are independent: one key's failure
        does not stop the others. -> {key: "conflict" (the head moved) or "error: <why>"} for
        the keys not appended. Raises StoreError only when the outcome is unknown (the medium
        failed mid-call; some keys may have been appended)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def count(self, tenant: Optional[str] = None) -> int:
        """Sessions stored, of one tenant or in all."""
        raise NotImplementedError

    def claims(self, tenant: Optional[str], keys: Iterable[str]) -> dict[str, dict]:
        """The unexpired claims on these Idempotency-Keys of one tenant: key -> {"owner", "fp", "expires"}."""
        raise NotImplementedError

    def claim(self, tenant: Optional[str], claims: dict[str, dict]) -> None:
        """Record claims (key -> {"owner", "fp", "expires"}); a key with an unexpired claim keeps it."""
        raise NotImplementedError

    def unclaim(self, tenant: Optional[str], keys: Iterable[str]) -> None:
        """Forget claims (the session that owned them was deleted)."""
        raise NotImplementedError

    def touch(self, keys: Iterable[str]) -> None:
        """Note that these sessions were used now (idle expiry counts from a session's last use)."""
        raise NotImplementedError

    def expire_idle(self, before: float, keep: set[str]) -> list[str]:
        """Delete the sessions neither used nor written since `before` (seconds since 1970), except
        the keys in `keep`, with their logs and Idempotency-Key claims. -> the keys deleted."""
        raise NotImplementedError

    def keys(self, tenant: Optional[str]) -> list[str]:
        """The keys of one tenant's stored sessions (None: the sessions made with auth off)."""
        raise NotImplementedError

    def snapshot_meta(self, keys: Iterable[str]) -> dict[str, Optional[bytes]]:
        """Per key, the head of its snapshot blob (its safetensors header, enough for
        codec.read_meta; no tensor is read), or None for a key not stored."""
        raise NotImplementedError

    def durability_warning(self) -> Optional[str]:
        """A warning when the medium's own settings do not make acknowledged writes durable."""
        return None

    def close(self) -> None:
        """Release what the backend holds (locks, connections)."""


def new_incarnation() -> str:
    return uuid.uuid4().hex

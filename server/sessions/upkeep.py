"""The session store's upkeep: snapshots and log compaction, idle expiry, and shutdown.

``Upkeep`` is a part of ``SessionStore`` (server/sessions/store.py) kept in its own module: it
works on the store's own attributes and is never used alone. The engine's maintenance thread
calls ``checkpoint`` and ``expire``; requests only ever reach ``_used``.
"""

from __future__ import annotations

import logging
import time

from server.errors import DomainError
from server.sessions.backends import StoreError
from server.sessions.session import Held


log = logging.getLogger("fwserve.store")


class Upkeep:
    def checkpoint(self, final: bool = False) -> int:
        """snapshot: write sessions changed since their last write; wal: compact logs of
        --wal-compact-records or more records (all non-empty ones when `final`). One session per
        lock hold, so micro-batches interleave. -> sessions written."""
        if not self.persistent:
            return 0
        with self.lock:
            todo = [h for h in self.held.values() if h.tier in ("device", "host") and self._dirty(h, final)]
        written = 0
        for held in todo:
            with self.lock:
                if self.held.get(held.key) is not held or held.tier not in ("device", "host") \
                        or not self._dirty(held, final):
                    continue
                try:
                    if not self._write_snapshot(held, self.tiers.tensors_of(held)):
                        self.tiers.drop(held)
                    written += 1
                except DomainError as e:
                    log.error("writing session %s to the store failed: %s", held.key, e.message)
        return written

    def _dirty(self, held: Held, final: bool) -> bool:
        if self.durability == "snapshot":
            return held.session.version != held.synced
        behind = held.session.version - held.snap_version
        return behind > 0 and (final or behind >= self.settings.wal_compact_records
                               or held.log_bytes >= self.settings.wal_compact_bytes)

    def expire(self, ttl_s: float) -> int:
        """Delete the sessions neither used nor changed for `ttl_s` seconds -> how many. With a
        shared store the store's record of each session's last use decides (every replica writes
        its uses there), so a session busy on another replica is never taken for idle."""
        cutoff = time.time() - ttl_s
        gone = 0
        if not self.check_heads:
            with self.lock:
                idle = [h.key for h in self.held.values() if max(h.used_at, h.session.updated_at) < cutoff]
            for key in idle:
                with self.lock:
                    h = self.held.get(key)
                    if h is None or max(h.used_at, h.session.updated_at) >= cutoff:
                        continue
                    try:
                        self.delete(key)
                        gone += 1
                    except DomainError as e:
                        log.warning("expiring session %s failed: %s", key, e.message)
        if self.persistent:
            with self.lock:
                keys = self._store_call(self.backend.expire_idle, cutoff, set() if self.check_heads else set(self.held))
                for key in keys:
                    if key in self.held:  # a shared store expired a session this replica still holds
                        self._forget(self.held[key])
                gone += len(keys)
        if gone:
            log.info("expired %d sessions idle for %g s", gone, ttl_s)
            self.events.expired(gone)
        return gone

    def _used(self, helds) -> None:
        """Sessions used now; a shared store hears of it now and then (idle expiry reads it)."""
        now = time.time()
        stale, every = [], self.settings.session_ttl_s / 20
        for h in helds:
            h.used_at = now
            if self.check_heads and every and now - h.use_stored_at > every:
                h.use_stored_at = now
                stale.append(h.key)
        if stale:
            try:
                self.backend.touch(stale)
            except StoreError as e:
                log.warning("recording the use of %d sessions failed: %s", len(stale), e)

    def close(self) -> None:
        """none: remove this store's spilled heads (sessions do not outlive the process);
        snapshot/wal: write every changed session, compact every log."""
        with self.lock:
            try:
                if self.persistent:
                    self.checkpoint(final=True)
                else:
                    for held in list(self.held.values()):
                        if held.tier == "disk":
                            self.backend.delete(held.key)
            finally:
                self.backend.close()

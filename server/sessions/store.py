"""The session store: the one owner of sessions and of all their mutable state.

Management calls (create, get, reset, delete, export, import) and micro-batch transactions
(``batch``) go through here; both take ``lock``, so they never interleave. Below it:

- ``slots.SlotPools`` and ``tiers.Tiers``: device slots, host memory and the disk tier;
- ``backends``: the store (a directory or Redis) — with ``--durability none`` only the spill
  tier (a private namespace, emptied at exit); with ``snapshot`` or ``wal`` the source of truth,
  the device and host tiers caching it: a session this process does not hold is loaded on first
  use (snapshot, then its log replayed, ``wal.replay``);
- ``codec``: the byte formats; ``idempotency``: Idempotency-Key records and claims;
- ``store_io`` (backend reads and writes) and ``upkeep`` (checkpoints, idle expiry, shutdown):
  parts of this class in modules of their own.

Multi-replica protocol (shared store, ``snapshot``/``wal``): a local copy is current exactly
when the store's head equals ``(session.inc, synced version)``. Every transaction and
management call checks the heads of the sessions it touches (one pipelined round trip) and
reloads stale copies; log appends and snapshot writes are compare-and-set on the head, so of two
replicas racing on one session exactly one wins and the other drops its copy and reports a
``version_conflict`` (retried by the engine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from typing import Iterable, Optional

import torch

from server.errors import (
    DomainError, conflict, idempotency_reused, invalid, overloaded, quota_exceeded, session_not_found,
    store_unavailable, version_conflict,
)
from server.keys import make_key, split_key
from server.rules import RULES, get_rule
from server.sessions import listing
from server.sessions.backends import Backend, Head, StoreError, new_incarnation, open_backend
from server.sessions.idempotency import Idem, IdempotencyRecords
from server.sessions.session import Held, Session, SessionInfo, check_classes
from server.sessions.slots import SlotPools
from server.sessions.tiers import Tiers
from server.sessions.store_io import StoreIO
from server.sessions.upkeep import Upkeep
from server.sessions.transaction import Transaction

log = logging.getLogger("fwserve.store")


class StoreEvents:
    """What the store reports (the engine's metrics implement it)."""

    def tier_counts(self, counts: dict[str, int]) -> None:
        """Sessions held per tier, after any change."""

    def moved(self, kind: str, tier: str) -> None:
        """A session moved: ("evict", to_tier) or ("restore", from_tier)."""

    def idempotency_evicted(self, n: int) -> None:
        """Idempotency-Key answers dropped before their time (a session over its byte budget)."""

    def expired(self, n: int) -> None:
        """Sessions deleted after --session-ttl-s without use."""


class SessionStore(StoreIO, Upkeep):
    def __init__(self, settings, embed_dim: int, base_W: torch.Tensor, base_b: torch.Tensor,
                 base_classes: list[str], device, backbone_name: str, events: Optional[StoreEvents] = None,
                 backend: Optional[Backend] = None, fingerprint: Optional[str] = None) -> None:
        self.settings, self.backbone_name = settings, backbone_name
        self.fingerprint = fingerprint  # sha256 of the backbone weights: recorded in everything stored
        self.events = events or StoreEvents()
        self.d = embed_dim
        self.S = settings.max_device_sessions
        self.C = max(settings.max_classes, len(base_classes))
        self.base_classes = list(base_classes)
        self.base_W = base_W.detach().float().cpu().clone()
        self.base_b = base_b.detach().float().cpu().clone()
        self.pool = SlotPools(self.S, self.C, self.d, device, self.base_W, self.base_b,
                              head_dtype=getattr(torch, settings.head_dtype))
        self.device = self.pool.device
        self.tiers = Tiers(self.pool, settings.max_host_sessions, self, on_move=self.events.moved)
        self.lock = threading.RLock()
        self.held: dict[str, Held] = {}
        self.durability = settings.durability
        self.persistent = self.durability != "none"
        if backend is None:
            # none: a private spill namespace; snapshot/wal: the shared, exclusive (directory) store
            ns = "fwserve" if self.persistent else f"fwserve:tmp:{uuid.uuid4().hex}"
            backend = open_backend(settings.store_url(), fsync=settings.fsync, exclusive=self.persistent,
                                   namespace=ns, max_bytes=settings.store_max_bytes)
        self.backend = backend
        self.check_heads = self.persistent and backend.shared  # version check on every use
        self.idem_ttl = float(settings.idempotency_ttl_s)
        self.idem_max = int(settings.idempotency_max_bytes)

    @property
    def base_slot(self) -> int:
        return self.pool.base_slot

    # ---- management -------------------------------------------------------------------------

    def create(self, rule_name: str, classes: Optional[list[str]], hyper: dict, init: str = "zeros",
               session_id: Optional[str] = None, tenant: Optional[str] = None, quota: int = 0,
               idem: Optional[Idem] = None) -> tuple[SessionInfo, bool]:
        """A new session -> (its info, replayed). `quota`: the tenant's session quota (0: none).
        `idem`: a retry of the creating request answers the same session (replayed) and creates
        nothing."""
        rule = get_rule(rule_name)
        hyper = rule.validate(hyper)
        classes = check_classes(self.base_classes if classes is None else classes, self.C)
        if init == "base":
            if not rule.base_init:
                raise invalid("invalid_init", f"rule {rule.name!r} cannot start from the base head "
                              f"(only {', '.join(r.name for r in RULES.values() if r.base_init)})")
            if classes != self.base_classes:
                raise invalid("invalid_init", "init='base' needs classes equal to the base head's "
                              f"classes {self.base_classes}")
        with self.lock:
            if session_id is None:
                # with an Idempotency-Key the id derives from it, so a retry finds its session
                session_id = ("k" + hashlib.sha256(f"{tenant or ''}\0{idem[0]}".encode()).hexdigest()[:32]
                              if idem else uuid.uuid4().hex)
            key = make_key(tenant, session_id)
            self._refresh([key])
            old = self.held.get(key)
            if idem and self._reused([(key, idem)]):  # the tenant used this key for another request
                raise idempotency_reused()
            if old is not None:
                if old.idem.created_by(idem):
                    return self._info(old), True
                raise conflict("session_exists", f"session {session_id!r} already exists")
            self._check_room(tenant, quota)
            sess = Session(key, rule, hyper, classes, init, inc=new_incarnation())
            held = Held(sess, idem=self._records())
            if idem:
                held.idem.create = {"key": idem[0], "fp": idem[1], "expires": time.time() + self.idem_ttl}
            tensors = self._initial_tensors(sess)
            if self.persistent:
                res = self._store_call(self.backend.create, key, sess.inc, self._encode(held, tensors, True),
                                       quota, self.settings.max_sessions)
                if res == "exists":  # created meanwhile by another replica
                    raise conflict("session_exists", f"session {session_id!r} already exists")
                if res == "tenant_quota":
                    raise quota_exceeded(quota, self.settings.retry_after_s)
                if res == "limit":
                    raise self._full()
            self.tiers.place(held, tensors)
            self.held[key] = held
            self._gauges()
            if idem:
                self._record_claims([(key, idem)])
            return self._info(held), False

    def info(self, key: str) -> SessionInfo:
        with self.lock:
            return self._info(self._get(key))

    def reset(self, key: str) -> SessionInfo:
        """Back to the initial head and state; version and statistics back to 0. The store is
        written first (compare-and-set on the head this process holds): a reset never revives a
        session another replica deleted or moved on."""
        with self.lock:
            held = self._get(key)
            fresh = dataclasses.replace(held.session, version=0, seen=0, correct=0, total=0,
                                        updated_at=time.time(), inc=new_incarnation())
            tensors = self._initial_tensors(fresh)
            if self.persistent:
                data = self._encode(Held(fresh, idem=held.idem), tensors, True)
                expect = Head(held.session.inc, held.synced)
                if not self._store_call(self.backend.put, key, fresh.inc, 0, data, expect):
                    self._lost_race(held)
            self.tiers.drop(held)
            held.session, held.synced, held.snap_version = fresh, 0, 0
            self.tiers.place(held, tensors)
            self._gauges()
            return self._info(held)

    def delete(self, key: str) -> None:
        """Remove the session with everything the store holds of it: snapshot, log, and the
        Idempotency-Keys it owned."""
        with self.lock:
            held = self._get(key)
            if held.tier == "disk":  # its answers were spilled with it: their keys are needed
                self._reload_answers(held)
            if self.persistent:
                self._store_call(self.backend.delete, key)
            self._store_call(self.backend.unclaim, held.session.tenant, held.idem.keys())
            self.tiers.drop(held)
            self._unhold(held)
            self._gauges()

    def export(self, key: str) -> bytes:
        with self.lock:
            held = self._get(key)
            return self._encode(held, self.tiers.tensors_of(held))

    def import_(self, key: str, data: bytes, quota: int = 0) -> tuple[SessionInfo, bool]:
        """Create or replace a session from an export; -> (its info, created)."""
        meta, tensors = self._decode(data)
        sess = Session.from_meta(key, meta, self.C)
        sess.check_tensors(tensors, self.d)
        sess.updated_at = time.time()
        sess.inc = new_incarnation()
        held = Held(sess, idem=self._records())
        with self.lock:
            self._refresh([key])
            old = self.held.get(key)
            if old is None:
                self._check_room(sess.tenant, quota)
            if self.persistent:
                if old is None and self.backend.count() >= self.settings.max_sessions:
                    raise self._full()
                expect = "absent" if old is None else Head(old.session.inc, old.synced)
                if not self._store_call(self.backend.put, key, sess.inc, sess.version,
                                        self._encode(held, tensors, True), expect):
                    if old is None:  # created meanwhile by another replica
                        raise version_conflict(split_key(key)[1])
                    self._lost_race(old)
                held.synced = held.snap_version = sess.version
            if old is not None:
                self.tiers.drop(old)
            self.held[key] = held
            self.tiers.place(held, tensors)
            self._gauges()
            return self._info(held), old is None

    def tenant_count(self, tenant: Optional[str]) -> int:
        if self.persistent:
            return self._store_call(self.backend.count, tenant)
        with self.lock:
            return sum(1 for h in self.held.values() if h.session.tenant == tenant)

    def list_sessions(self, tenant: Optional[str], after: Optional[str] = None, limit: int = 100,
                      rule: Optional[str] = None, tier: Optional[str] = None) -> tuple[list[SessionInfo], bool]:
        """One tenant's sessions in id order after the id `after`, at most `limit`, filtered by
        rule and tier -> (the page, whether more follow). See server/sessions/listing.py."""
        with self.lock:
            return listing.list_sessions(self, tenant, after, limit, rule, tier)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return self.tiers.counts()

    def sync_state(self, key: str) -> dict[str, int]:
        """The session's version, the version the store holds and its snapshot's version."""
        with self.lock:
            h = self._get(key)
            return {"version": h.session.version, "synced": h.synced, "snapshot": h.snap_version}

    def batch(self, keys: Iterable[str]) -> Transaction:
        """A micro-batch's transaction over these sessions (see server/sessions/transaction.py)."""
        return Transaction(self, keys)

    # ---- the transaction's side (under the lock) --------------------------------------------

    def _acquire(self, keys: list[str]) -> tuple[dict[str, Held], dict[str, DomainError]]:
        """Bring these sessions to the device together (none evicts another) -> (held, the keys
        that cannot be served now and why). One session's trouble is its own."""
        unavailable: dict[str, DomainError] = {}
        self._refresh(keys, unavailable)
        found: dict[str, Held] = {}
        for k in keys:
            if k in self.held and k not in unavailable:
                if len(found) < self.S:
                    found[k] = self.held[k]
                else:
                    unavailable[k] = overloaded(1.0, "more sessions in one batch than device slots")
        self._used(found.values())
        moved = False
        for key, held in list(found.items()):
            moved |= held.tier != "device"
            try:
                self.tiers.to_device(held, found)
            except (DomainError, StoreError, OSError) as e:
                log.error("session %s: bringing it to the device failed: %s", key, e)
                unavailable[key] = e if isinstance(e, DomainError) else store_unavailable(e)
                del found[key]
        if moved:
            self._gauges()
        return found, unavailable

    # ---- the disk tier (tiers.Disk) ---------------------------------------------------------

    def save(self, held: Held, tensors) -> bool:
        if self.persistent:
            ok = self._write_snapshot(held, tensors)
        else:
            sess = held.session
            self._store_call(self.backend.put, held.key, sess.inc, sess.version, self._encode(held, tensors, True))
            ok = True
        if ok:  # the answers travel with the disk copy; memory keeps only what finds the session
            held.idem.adapts.clear()
            held.idem.bytes = 0
        return ok

    def load(self, held: Held):
        stored = self._store_call(self.backend.load, held.key)
        if stored is None:
            raise store_unavailable(f"session {held.key} is missing from the store")
        if not self.persistent:
            meta, tensors = self._decode(stored.snapshot)
            held.idem = IdempotencyRecords.from_meta(meta, self.idem_max, self._idem_evicted)
            return tensors
        try:
            fresh, tensors = self._materialize(held.key, stored)
        except StoreError as e:
            raise store_unavailable(e) from None
        mine, theirs = held.session, fresh.session
        if (theirs.inc, theirs.version) != (mine.inc, mine.version):
            log.warning("session %s: the store holds version %d, this replica had %d; using the store's",
                        held.key, theirs.version, mine.version)
            for attr in ("inc", "version", "seen", "correct", "total", "updated_at"):
                setattr(mine, attr, getattr(theirs, attr))
            held.synced, held.snap_version = fresh.synced, fresh.snap_version
        held.idem, held.log_bytes = fresh.idem, fresh.log_bytes
        return tensors

    def discard(self, held: Held) -> None:
        if not self.persistent:  # the spill copy; with snapshot/wal the store keeps the session
            self._store_call(self.backend.delete, held.key)

    # ---- internals --------------------------------------------------------------------------

    def _get(self, key: str) -> Held:
        self._refresh([key])
        held = self.held.get(key)
        if held is None:
            raise session_not_found(split_key(key)[1])
        self._used([held])
        return held

    def _info(self, held: Held) -> SessionInfo:
        return held.session.info(held.tier)

    def _check_room(self, tenant: Optional[str], quota: int) -> None:
        if quota and self.tenant_count(tenant) >= quota:
            raise quota_exceeded(quota, self.settings.retry_after_s)
        if not self.persistent and len(self.held) >= self.settings.max_sessions:
            raise self._full()

    def _full(self):
        return conflict("session_limit", f"the server holds its maximum of {self.settings.max_sessions} sessions")

    def _initial_tensors(self, sess: Session) -> dict[str, torch.Tensor]:
        n, d = len(sess.classes), self.d
        t = {"W": torch.zeros(n, d), "b": torch.zeros(n)}
        if sess.init == "base":
            t["W"], t["b"] = self.base_W.clone(), self.base_b.clone()
        t.update(sess.rule.init_state(n, d, sess.hyper, head=dict(t)))
        return t

    def _gauges(self) -> None:
        self.events.tier_counts(self.tiers.counts())

    def _unhold(self, held: Held) -> None:
        if self.held.get(held.key) is held:
            del self.held[held.key]

    def _forget(self, held: Held) -> None:
        """Drop the local copy (the store keeps the session; a later use reloads it)."""
        self.tiers.drop(held)
        self._unhold(held)
        self._gauges()

    def _reload_answers(self, held: Held) -> None:
        stored = self._store_call(self.backend.load, held.key)
        if stored is not None:
            held.idem = IdempotencyRecords.from_meta(self._decode(stored.snapshot)[0], self.idem_max)

    def _lost_race(self, held: Held) -> None:
        """A compare-and-set on this session failed: another replica changed or deleted it.
        Drop the local copy and say which (404, or a conflict to retry)."""
        self._forget(held)
        self._refresh([held.key])
        if held.key not in self.held:
            raise session_not_found(held.session.id)
        raise version_conflict(held.session.id)

    def _refresh(self, keys: list[str], errors: Optional[dict] = None) -> None:
        """snapshot/wal: load sessions this process does not hold; with a shared store also drop
        and reload copies whose head moved (one round trip for all keys). With `errors`, a key
        the store fails for is recorded there (key -> error) and the others go on; without, the
        first failure raises."""
        if not self.persistent:
            return
        keys = [k for k in keys if k]

        def fail(key, e):
            if errors is None:
                raise e
            errors[key] = e

        if self.check_heads:
            try:
                heads = self._store_call(self.backend.heads, keys)
            except DomainError as e:
                for key in keys:
                    fail(key, e)
                return
            for key in keys:
                local, head = self.held.get(key), heads.get(key)
                if isinstance(head, StoreError):
                    fail(key, store_unavailable(head))
                    continue
                if local is not None and (head is None or head != Head(local.session.inc, local.synced)):
                    if head is not None and local.session.version != local.synced:
                        log.warning("session %s: dropping %d adapts not yet written (another replica moved on)",
                                    key, local.session.version - local.synced)
                    self._forget(local)
                    local = None
                if local is None and head is not None:
                    try:
                        self._load(key)
                    except DomainError as e:
                        fail(key, e)
        else:
            for key in keys:
                if key not in self.held:
                    try:
                        self._load(key)
                    except DomainError as e:
                        fail(key, e)

    def _load(self, key: str) -> Optional[Held]:
        stored = self._store_call(self.backend.load, key)
        if stored is None:
            return None
        try:
            held, tensors = self._materialize(key, stored)
        except StoreError as e:
            raise store_unavailable(e) from None
        self.held[key] = held
        self.tiers.admit_host(held, tensors)
        self.events.moved("restore", "disk")
        self._gauges()
        return held


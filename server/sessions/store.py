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
from server.rules import RULES, get_rule, source_head
from server.sessions import listing
from server.sessions.backends import Backend, Head, StoreError, new_incarnation, open_backend
from server.sessions.idempotency import Idem, IdempotencyRecords
from server.sessions.session import Held, Session, SessionInfo, check_classes
from server.sessions.slots import SlotPools
from server.sessions.tiers import Tiers
from server.sessions.store_io import StoreIO
from server.sessions.upkeep import Upkeep
from server.sessions.transaction import Transaction
from server.sessions import guard as guards
from server.sessions.history import History, Retention, Version, VersionCache
from server.sessions.references import ReferencePool
from server.sessions.versions import Versions, pop_reference

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

    def guard_tripped(self, rule: str, action: str, trigger: str, session_key: str, version: int) -> None:
        """A session's guard acted (rollback, freeze, alert; reset: the rule's own collapse reset)."""


def _same_kind(a: Session, b: Session) -> bool:
    """May an import of b be a new version of a (the same tensors' shapes and meaning)?"""
    return (a.rule.name, a.classes, a.hyper, a.init) == (b.rule.name, b.classes, b.hyper, b.init)


class SessionStore(StoreIO, Upkeep, Versions):
    def __init__(self, settings, embed_dim: int, base_W: torch.Tensor, base_b: torch.Tensor,
                 base_classes: list[str], device, backbone_name: str, events: Optional[StoreEvents] = None,
                 backend: Optional[Backend] = None, fingerprint: Optional[str] = None,
                 source_stats: Optional[dict[str, torch.Tensor]] = None, learned: Optional[dict] = None,
                 learned_refused: Optional[dict[str, str]] = None) -> None:
        self.settings, self.backbone_name = settings, backbone_name
        self.fingerprint = fingerprint  # sha256 of the backbone weights: recorded in everything stored
        # the backbone's source feature statistics for init_state: head["feature_mean"/"feature_var"]
        # with the base head (init="base"), head["feature_within_cov"] to rules naming it in source_keys
        self.source_stats = {f"feature_{k}": v.detach().float().cpu().clone()
                             for k, v in (source_stats or {}).items() if k in ("mean", "var", "within_cov")}
        self.events = events or StoreEvents()
        self.d = embed_dim
        self.S = settings.max_device_sessions
        self.C = max(settings.max_classes, len(base_classes))
        self.base_classes = list(base_classes)
        self.base_W = base_W.detach().float().cpu().clone()
        self.base_b = base_b.detach().float().cpu().clone()
        self.pool = SlotPools(self.S, self.C, self.d, device, self.base_W, self.base_b,
                              head_dtype=getattr(torch, settings.head_dtype), learned=learned)
        self.learned_refused = dict(learned_refused or {})  # learned rules whose files were refused: why
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
        self.retention = Retention(settings.history_versions, settings.history_max_age_s, settings.history_max_bytes)
        self.version_cache = VersionCache(settings.version_cache_entries, settings.version_cache_ttl_s)
        self.refs = ReferencePool(self.C, self.d, self.device, self.base_W, self.base_b, self.S + 1)

    @property
    def base_slot(self) -> int:
        return self.pool.base_slot

    # ---- management -------------------------------------------------------------------------

    def create(self, rule_name: str, classes: Optional[list[str]], hyper: dict, init: str = "zeros",
               session_id: Optional[str] = None, tenant: Optional[str] = None, quota: int = 0,
               idem: Optional[Idem] = None, guard: Optional[dict] = None,
               actor: Optional[str] = None) -> tuple[SessionInfo, bool]:
        """A new session -> (its info, replayed). `quota`: the tenant's session quota (0: none).
        `idem`: a retry of the creating request answers the same session (replayed) and creates
        nothing. `guard`: its guard's settings (server/sessions/guard.py); `actor`: the API key
        id that made it (its version 0's history entry)."""
        rule = self.check_trained(get_rule(rule_name))
        given = dict(hyper)
        hyper = rule.validate(given)
        classes = check_classes(self.base_classes if classes is None else classes, self.C)
        if init == "base":
            if not rule.base_init:
                raise invalid("invalid_init", f"rule {rule.name!r} cannot start from the base head "
                              f"(only {', '.join(r.name for r in RULES.values() if r.base_init)})")
            if classes != self.base_classes:
                raise invalid("invalid_init", "init='base' needs classes equal to the base head's "
                              f"classes {self.base_classes}")
        cfg = None
        if guard is not None:
            cfg = guards.parse(guard, classes=classes, base_classes=self.base_classes, version=0, hyper=hyper)
            if "collapse_reset" in hyper and "collapse_reset" not in given:
                hyper["collapse_reset"] = 0.0  # the guard, not the rule's own reset, handles collapse
        sess = Session("", rule, hyper, classes, init, guard=cfg)
        tensors = self._initial_tensors(sess)
        ref = {"W": tensors["W"].clone(), "b": tensors["b"].clone()} if cfg and cfg["reference"] != "base" else None
        entry = Version(0, time.time(), "create", key_id=actor)
        return self._admit(sess, tensors, session_id, tenant, quota, idem, entry, ref)

    def _admit(self, sess: Session, tensors, session_id: Optional[str], tenant: Optional[str], quota: int,
               idem: Optional[Idem], entry: Version, ref: Optional[dict]) -> tuple[SessionInfo, bool]:
        """Store and place a new session (create, fork) at version 0 under a new incarnation."""
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
            sess.key, sess.inc = key, new_incarnation()
            sess.created_at = sess.updated_at = entry.t
            sess.version = 0
            held = Held(sess, idem=self._records(), history=self._new_history())
            held.watch = self._watch_of(sess, ref)
            held.history.add(entry)
            if idem:
                held.idem.create = {"key": idem[0], "fp": idem[1], "expires": time.time() + self.idem_ttl}
            if self.persistent:
                res = self._store_call(self.backend.create, key, sess.inc, self._encode(held, tensors, True),
                                       quota, self.settings.max_sessions)
                if res == "exists":  # created meanwhile by another replica
                    raise conflict("session_exists", f"session {session_id!r} already exists")
                if res == "tenant_quota":
                    raise quota_exceeded(quota, self.settings.retry_after_s)
                if res == "limit":
                    raise self._full()
            self._start_history(held, tensors)
            self.tiers.place(held, tensors)
            self.held[key] = held
            self._gauges()
            if idem:
                self._record_claims([(key, idem)])
            return self._info(held), False

    def _new_history(self) -> History:
        return History(self.retention, ring=self.durability != "wal" and self.retention.versions > 1)

    def _start_history(self, held: Held, tensors) -> None:
        """A session's first anchor: its stored snapshot, or (no log) a copy in the ring."""
        v = held.session.version
        held.history.anchors = {v}
        if held.history.ring is not None:
            held.history.ring.add_anchor(v, {k: t.clone() for k, t in tensors.items()})

    def info(self, key: str) -> SessionInfo:
        with self.lock:
            return self._info(self._get(key))

    def reset(self, key: str, actor: Optional[str] = None) -> SessionInfo:
        """Back to the initial head and state, statistics to 0, as a new version (history is kept).
        Durable first (a state record, or a snapshot, compare-and-set on the head this process
        holds): a reset never revives a session another replica deleted or moved on."""
        with self.lock:
            held = self._get(key)
            sess = held.session
            entry = Version(sess.version + 1, time.time(), "reset", key_id=actor)
            self._append_version(held, self._initial_tensors(sess), (0, 0, 0), entry)
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
            self.refs.drop(key)
            self.version_cache.forget(key)
            self._gauges()

    def export(self, key: str) -> bytes:
        with self.lock:
            held = self._get(key)
            return self._encode(held, self.tiers.tensors_of(held))

    def import_(self, key: str, data: bytes, quota: int = 0, actor: Optional[str] = None) -> tuple[SessionInfo, bool]:
        """Create or replace a session from an export; -> (its info, created). Replacing a session
        of the same rule, classes, hyper-parameters and init is a new version of it (its history
        stays); otherwise, or for a new session, the session starts afresh (a new incarnation; a
        replaced session's versions go on from where they were)."""
        meta, tensors = self._decode(data)
        ref = pop_reference(tensors)
        sess = Session.from_meta(key, meta, self.C)
        self.check_trained(sess.rule)
        sess.check_tensors(tensors, self.d)
        source = {"session": meta.get("id"), "version": sess.version}
        stats = (sess.seen, sess.correct, sess.total)
        with self.lock:
            self._refresh([key])
            old = self.held.get(key)
            if old is not None and _same_kind(old.session, sess):
                o = old.session
                entry = Version(o.version + 1, time.time(), "import", key_id=actor, source=source,
                                seen=stats[0], correct=stats[1], total=stats[2])
                self._append_version(old, tensors, stats, entry)
                return self._info(old), False
            if old is None:
                self._check_room(sess.tenant, quota)
            sess.version = 0 if old is None else old.session.version + 1
            sess.frozen = False
            self._check_guard(sess, ref)
            sess.updated_at = time.time()
            sess.inc = new_incarnation()
            held = Held(sess, idem=self._records(), history=self._new_history())
            held.watch = self._watch_of(sess, ref)
            held.history.add(Version(sess.version, sess.updated_at, "import", key_id=actor, source=source,
                                     seen=stats[0], correct=stats[1], total=stats[2]))
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
                self.refs.drop(key)
                self.version_cache.forget(key)
            self._start_history(held, tensors)
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
            pop_reference(tensors)
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
            for attr in ("inc", "version", "seen", "correct", "total", "updated_at", "frozen", "guard"):
                setattr(mine, attr, getattr(theirs, attr))
            held.synced, held.snap_version = fresh.synced, fresh.snap_version
            held.history, held.watch = fresh.history, fresh.watch
        elif held.history.ring is None:
            held.history = fresh.history
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
        head = dict(t)
        if sess.init == "base":
            t["W"], t["b"] = self.base_W.clone(), self.base_b.clone()
            head = {**t, **self.source_stats}
        t.update(sess.rule.init_state(n, d, sess.hyper, head=source_head(sess.rule, n, d, self.source_stats, head)))
        return t

    def _gauges(self) -> None:
        self.events.tier_counts(self.tiers.counts())

    def _guard_tripped(self, sess: Session, action: str, trigger: str) -> None:
        self.events.guard_tripped(sess.rule.name, action, trigger, sess.key, sess.version)

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


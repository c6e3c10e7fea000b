"""The session store: the one owner of sessions and of all their mutable state.

Management calls (create, get, reset, delete, export, import) and micro-batch transactions
(``batch``) go through here; both take ``lock``, so they never interleave. Below it:

- ``slots.SlotPool`` and ``tiers.Tiers``: device slots, host memory and the disk tier;
- ``backends``: the store (a directory or Redis) — with ``--durability none`` only the spill
  tier (a private namespace, emptied at exit); with ``snapshot`` or ``wal`` the source of truth,
  the device and host tiers caching it: a session this process does not hold is loaded on first
  use (snapshot, then its log replayed, ``wal.replay``);
- ``codec``: the byte formats; ``idempotency``: per-session Idempotency-Key records.

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
    DomainError, Unavailable, conflict, invalid, overloaded, quota_exceeded, session_not_found, store_unavailable,
    version_conflict,
)
from server.keys import make_key, split_key
from server.rules import RULES, get_rule
from server.sessions import codec
from server.sessions.backends import Backend, Head, StoreError, new_incarnation, open_backend
from server.sessions.idempotency import Idem, IdempotencyRecords
from server.sessions.session import Held, Session, SessionInfo, check_classes
from server.sessions.slots import SlotPool
from server.sessions.tiers import Tiers
from server.sessions.transaction import Transaction
from server.sessions.wal import WalBuffer, replay

log = logging.getLogger("fwserve.store")


class StoreEvents:
    """What the store reports (the engine's metrics implement it)."""

    def tier_counts(self, counts: dict[str, int]) -> None:
        """Sessions held per tier, after any change."""

    def moved(self, kind: str, tier: str) -> None:
        """A session moved: ("evict", to_tier) or ("restore", from_tier)."""


class SessionStore:
    def __init__(self, settings, embed_dim: int, base_W: torch.Tensor, base_b: torch.Tensor,
                 base_classes: list[str], device, backbone_name: str, events: Optional[StoreEvents] = None,
                 backend: Optional[Backend] = None, source_stats: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.settings, self.backbone_name = settings, backbone_name
        # the backbone's source feature statistics ({"mean", "var"} [d]) or None: handed to a rule's
        # init_state with the base head as head["feature_mean"], head["feature_var"] (init="base")
        self.source_stats = ({"feature_mean": source_stats["mean"].detach().float().cpu().clone(),
                              "feature_var": source_stats["var"].detach().float().cpu().clone()}
                             if source_stats is not None else {})
        self.events = events or StoreEvents()
        self.d = embed_dim
        self.S = settings.max_device_sessions
        self.C = max(settings.max_classes, len(base_classes))
        self.base_classes = list(base_classes)
        self.base_W = base_W.detach().float().cpu().clone()
        self.base_b = base_b.detach().float().cpu().clone()
        self.pool = SlotPool(self.S, self.C, self.d, device, self.base_W, self.base_b)
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
                                   namespace=ns)
        self.backend = backend
        self.check_heads = self.persistent and backend.shared  # version check on every use
        self.idem_ttl = float(settings.idempotency_ttl_s)
        self.idem_max = int(settings.idempotency_max_keys)

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
            if old is not None:
                if old.idem.created_by(idem):
                    return self._info(old), True
                raise conflict("session_exists", f"session {session_id!r} already exists")
            self._check_room(tenant, quota)
            sess = Session(key, rule, hyper, classes, init, inc=new_incarnation())
            held = Held(sess, idem=IdempotencyRecords(self.idem_max))
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
            return self._info(held), False

    def info(self, key: str) -> SessionInfo:
        with self.lock:
            return self._info(self._get(key))

    def reset(self, key: str) -> SessionInfo:
        """Back to the initial head and state; version and statistics back to 0."""
        with self.lock:
            held = self._get(key)
            sess = held.session
            self.tiers.drop(held)
            sess.version = sess.seen = sess.correct = sess.total = 0
            sess.updated_at = time.time()
            sess.inc = new_incarnation()
            tensors = self._initial_tensors(sess)
            if self.persistent:
                try:
                    self._store_call(self.backend.put, key, sess.inc, 0, self._encode(held, tensors, True))
                except DomainError:
                    self._unhold(held)
                    raise
                held.synced = held.snap_version = 0
            self.tiers.place(held, tensors)
            self._gauges()
            return self._info(held)

    def delete(self, key: str) -> None:
        with self.lock:
            held = self._get(key)
            if self.persistent:
                self._store_call(self.backend.delete, key)
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
        held = Held(sess, idem=IdempotencyRecords(self.idem_max))
        with self.lock:
            self._refresh([key])
            old = self.held.get(key)
            if old is None:
                self._check_room(sess.tenant, quota)
            if self.persistent:
                if old is None and self.backend.count() >= self.settings.max_sessions:
                    raise self._full()
                self._store_call(self.backend.put, key, sess.inc, sess.version, self._encode(held, tensors, True))
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

    # ---- background work and shutdown -------------------------------------------------------

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

    # ---- the transaction's side (under the lock) --------------------------------------------

    def _acquire(self, keys: list[str]) -> dict[str, Held]:
        """Bring these sessions to the device together (none evicts another)."""
        self._refresh(keys)
        found = {k: self.held[k] for k in keys if k in self.held}
        if len(found) > self.S:
            raise overloaded(1.0, "more sessions in one batch than device slots")
        moved = False
        for held in found.values():
            moved |= held.tier != "device"
            self.tiers.to_device(held, found)
        if moved:
            self._gauges()
        return found

    def _flush(self, wal: Optional[WalBuffer]) -> dict[str, DomainError]:
        """wal: append the transaction's records (one backend call). Sessions whose append failed
        are dropped from memory (their update was not logged) -> {key: the error}."""
        if wal is None or not wal.pending:
            return {}
        batch = {}
        for key, recs in wal.pending.items():
            sess = self.held[key].session
            batch[key] = (Head(sess.inc, recs[0].version - 1), [r.encode(sess.inc) for r in recs])
        try:
            failed = self.backend.append(batch)
            errors = {k: version_conflict(split_key(k)[1]) for k in failed}
        except StoreError as e:
            log.error("log append failed: %s", e)
            errors = {k: store_unavailable(e) for k in batch}
        for key in batch:
            held = self.held[key]
            if key in errors:
                self._forget(held)
            else:
                held.synced = held.session.version
        return errors

    def _abort(self, wal: Optional[WalBuffer]) -> None:
        """The micro-batch failed half-way: drop the sessions it changed but did not log."""
        for key in wal.touched() if wal is not None else ():
            if key in self.held:
                self._forget(self.held[key])

    # ---- the disk tier (tiers.Disk) ---------------------------------------------------------

    def save(self, held: Held, tensors) -> bool:
        if self.persistent:
            return self._write_snapshot(held, tensors)
        sess = held.session
        self._store_call(self.backend.put, held.key, sess.inc, sess.version, self._encode(held, tensors, True))
        return True

    def load(self, held: Held):
        stored = self._store_call(self.backend.load, held.key)
        if stored is None:
            raise store_unavailable(f"session {held.key} is missing from the store")
        if not self.persistent:
            return self._decode(stored.snapshot)[1]
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
            held.synced, held.snap_version, held.idem = fresh.synced, fresh.snap_version, fresh.idem
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
        head_extra = {}
        if sess.init == "base":
            t["W"], t["b"] = self.base_W.clone(), self.base_b.clone()
            head_extra = self.source_stats
        t.update(sess.rule.init_state(n, d, sess.hyper, head={**t, **head_extra}))
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

    def _store_call(self, fn, *args):
        try:
            return fn(*args)
        except StoreError as e:
            log.error("store: %s", e)
            raise store_unavailable(e) from None

    def _encode(self, held: Held, tensors, internal: bool = False) -> bytes:
        """An export; `internal` (store snapshots) adds the key, incarnation and idempotency records."""
        sess = held.session
        meta = {"format": codec.EXPORT_FORMAT, "backbone": self.backbone_name, "embed_dim": self.d, **sess.meta()}
        if internal:
            meta.update(key=sess.key, incarnation=sess.inc, **held.idem.to_meta())
        return codec.encode(tensors, meta)

    def _decode(self, data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
        try:
            meta, tensors = codec.decode(data)
        except codec.CodecError:
            raise invalid("invalid_snapshot", "body is not a fwserve session export (safetensors)") from None
        if meta.get("format") != codec.EXPORT_FORMAT:
            raise invalid("invalid_snapshot", f"snapshot format must be {codec.EXPORT_FORMAT!r}")
        if meta.get("backbone") != self.backbone_name:
            raise invalid("invalid_snapshot", f"snapshot was made on backbone {meta.get('backbone')!r}; "
                          f"this server serves {self.backbone_name!r}")
        if meta.get("embed_dim") != self.d:
            raise invalid("invalid_snapshot", f"snapshot embed_dim {meta.get('embed_dim')} != backbone's {self.d}")
        return meta, tensors

    def _dirty(self, held: Held, final: bool) -> bool:
        if self.durability == "snapshot":
            return held.session.version != held.synced
        behind = held.session.version - held.snap_version
        return behind > 0 and (final or behind >= self.settings.wal_compact_records)

    def _write_snapshot(self, held: Held, tensors) -> bool:
        """Snapshot the session at its version into the store (compare-and-set on its head); a
        stale copy (another replica moved on) is let go: the caller drops its tensors. -> written?"""
        sess = held.session
        data = self._encode(held, tensors, True)
        ok = self._store_call(self.backend.put, held.key, sess.inc, sess.version, data, Head(sess.inc, held.synced))
        if ok:
            held.synced = held.snap_version = sess.version
        else:
            log.warning("session %s changed in the store since this replica loaded it; dropping the local copy "
                        "(%d unsaved adapts lost)", held.key, sess.version - held.synced)
            self._unhold(held)
        return ok

    def _refresh(self, keys: list[str]) -> None:
        """snapshot/wal: load sessions this process does not hold; with a shared store also drop
        and reload copies whose head moved (one round trip for all keys)."""
        if not self.persistent:
            return
        keys = [k for k in keys if k]
        if self.check_heads:
            heads = self._store_call(self.backend.heads, keys)
            for key in keys:
                local, head = self.held.get(key), heads.get(key)
                if local is not None and (head is None or head != Head(local.session.inc, local.synced)):
                    if head is not None and local.session.version != local.synced:
                        log.warning("session %s: dropping %d adapts not yet written (another replica moved on)",
                                    key, local.session.version - local.synced)
                    self._forget(local)
                    local = None
                if local is None and head is not None:
                    self._load(key)
        else:
            for key in keys:
                if key not in self.held:
                    self._load(key)

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

    def _materialize(self, key: str, stored) -> tuple[Held, dict[str, torch.Tensor]]:
        """Snapshot + the log records that follow it (same incarnation, in version order)."""
        try:
            meta, tensors = self._decode(stored.snapshot)
            sess = Session.from_meta(key, meta, self.C)
            sess.inc = str(meta["incarnation"])
            n = len(sess.classes)
            want = {"W": (n, self.d), "b": (n,), **sess.rule.state_shapes(n, self.d)}
            if {k: tuple(v.shape) for k, v in tensors.items()} != want:
                raise invalid("invalid_snapshot", f"stored tensors do not match the rule {sess.rule.name!r}")
        except (DomainError, KeyError) as e:
            raise StoreError(f"session {key}: unreadable snapshot in the store: {getattr(e, 'message', e)}") from None
        held = Held(sess, idem=IdempotencyRecords.from_meta(meta, self.idem_max))
        held.synced = held.snap_version = sess.version
        recs = []
        try:
            for raw in stored.records:
                inc, rec = codec.Record.decode(raw)
                if inc == sess.inc and rec.version == sess.version + len(recs) + 1:
                    recs.append(rec)
        except codec.CodecError as e:
            raise StoreError(f"session {key}: unreadable log record: {e}") from None
        if recs:
            tensors = replay(sess, tensors, recs, self.C, self.d, self.device)
            now = time.time()
            for rec in recs:
                if rec.idem and rec.idem["expires"] > now:
                    held.idem.put(rec.idem["key"], {k: rec.idem[k] for k in ("fp", "expires", "response")})
        held.synced = sess.version
        return held, tensors

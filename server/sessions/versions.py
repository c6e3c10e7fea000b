"""Versions of a session: listing them, materialising a retained one, and the calls that make a
new version from a whole state (reset, import, rollback) or a new session from one (fork); guard
settings (PATCH).

``Versions`` is a part of ``SessionStore`` (server/sessions/store.py) kept in its own module, like
``StoreIO`` and ``Upkeep``. A new version made from a whole state is durable before it is
answered: with the log it is a state record appended compare-and-set on the head (like an
adapt, so replicas see it and races are lost, not merged); with ``snapshot`` a snapshot written
compare-and-set; with ``none`` it lives in memory. Materialising reads the history (the store's
anchors and log in wal mode, the in-memory ring otherwise; server/sessions/history.py), replays
from the nearest anchor, and keeps the result in a small cache (a version's state never changes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from server.errors import DomainError, NotFound, idempotency_reused, invalid, store_unavailable, version_conflict
from server.sessions import codec, guard as guards
from server.sessions.backends import Head
from server.sessions.codec import Record
from server.sessions.history import History, Version
from server.sessions.idempotency import Idem
from server.sessions.session import Held, Session, SessionInfo
from server.sessions.slots import width_for
from server.sessions.wal import Replay

log = logging.getLogger("fwserve.store")
UNSET = object()  # patch: a setting not given
REFERENCE = ("guard.W", "guard.b")  # a pinned reference head, kept in snapshots and exports


@dataclass
class VersionHead:
    """A retained version's head, materialised, for predictions (plain tensors, CPU)."""

    session_id: str
    version: int
    classes: list[str]
    normalize: bool
    W: torch.Tensor
    b: torch.Tensor


def version_not_found(session_id: str, version: int, current: int) -> NotFound:
    return NotFound("version_not_found", f"session {session_id!r} has no version {version} (it is at {current})")


def version_not_retained(session_id: str, version: int, floor: int) -> NotFound:
    return NotFound("version_not_retained", f"version {version} of session {session_id!r} is no longer retained "
                    f"(the oldest retained is {floor}; see --history-versions, --history-max-age-s, "
                    "--history-max-bytes)")


def pop_reference(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """A guard's pinned reference head carried with a snapshot or export (removed from `tensors`)."""
    if not any(k in tensors for k in REFERENCE):
        return None
    if not all(k in tensors for k in REFERENCE):
        raise invalid("invalid_snapshot", "a guard reference needs both guard.W and guard.b")
    return {"W": tensors.pop("guard.W"), "b": tensors.pop("guard.b")}


class Versions:
    # ---- reading ----------------------------------------------------------------------------

    def versions(self, key: str, limit: int = 100, before: Optional[int] = None) -> tuple[list[dict], int, int]:
        """Retained versions, newest first (those before `before`, at most `limit`) ->
        (entries, the oldest retained version, the current version)."""
        with self.lock:
            held = self._get(key)
            h = held.history
            floor = h.floor()
            out = [e.public() for e in reversed(h.entries)
                   if e.version >= floor and (before is None or e.version < before)]
            return out[:limit], floor, held.session.version

    def version_head(self, key: str, version: int) -> VersionHead:
        """Version `version`'s head (NotFound when it never existed or is not retained)."""
        with self.lock:
            held = self._get(key)
            sess = held.session
            tensors = self._state_at(held, version)
            return VersionHead(sess.id, version, list(sess.classes), sess.rule.normalize, tensors["W"], tensors["b"])

    def _check_version(self, held: Held, version: int) -> None:
        sess = held.session
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= sess.version:
            raise version_not_found(sess.id, version, sess.version)
        floor = held.history.floor()
        if version < floor:
            raise version_not_retained(sess.id, version, floor)

    def _state_at(self, held: Held, version: int) -> dict[str, torch.Tensor]:
        """The session's whole state at a retained version (CPU tensors, a copy of the cached one)."""
        self._check_version(held, version)
        sess = held.session
        if version == sess.version:
            return self.tiers.tensors_of(held)
        ck = (held.key, sess.inc, version)
        hit = self.version_cache.get(ck)
        if hit is None:
            anchors, records = self._history_sources(held)
            hit = self._replay_to(held, version, anchors, records)
            self.version_cache.put(ck, hit)
        return {k: v.clone() for k, v in hit.items()}

    def _history_sources(self, held: Held, pending: Optional[list[Record]] = None):
        """(anchor version -> a function giving its tensors, version -> log record) of a session,
        with this transaction's records not yet written (`pending`)."""
        sess = held.session
        anchors, records = {}, {}
        ring = held.history.ring
        if ring is not None:
            anchors = {v: (lambda t=t: t) for v, t in ring.anchors.items()}
            records = dict(ring.records)
        elif self.durability == "wal":
            stored = self._store_call(self.backend.history, held.key)
            if stored is None or stored.inc != sess.inc:
                raise version_conflict(sess.id)
            for v, blob in stored.anchors.items():
                anchors[v] = lambda blob=blob: self._anchor_tensors(blob)
            try:
                for raw in stored.records:
                    inc, rec = codec.Record.decode(raw)
                    if inc == sess.inc:
                        records[rec.version] = rec
            except codec.CodecError as e:
                raise store_unavailable(f"session {held.key}: unreadable log record: {e}") from None
        for rec in pending or ():
            records[rec.version] = rec
        for v, rec in records.items():
            if rec.state is not None:
                anchors[v] = lambda s=rec.state: s
        return anchors, records

    def _anchor_tensors(self, blob: bytes) -> dict[str, torch.Tensor]:
        try:
            _, tensors = codec.decode(blob)
        except codec.CodecError as e:
            raise store_unavailable(f"unreadable snapshot in the store: {e}") from None
        pop_reference(tensors)
        return tensors

    def _replay_to(self, held: Held, version: int, anchors, records) -> dict[str, torch.Tensor]:
        below = [v for v in anchors if v <= version]
        if not below:
            raise version_not_retained(held.session.id, version, held.history.floor())
        a = max(below)
        try:
            todo = [records[v] for v in range(a + 1, version + 1)]
        except KeyError:
            raise version_not_retained(held.session.id, version, held.history.floor()) from None
        run = Replay(dataclasses.replace(held.session), anchors[a](), todo, width_for(len(held.session.classes)),
                     self.d, self.device, self.pool.head_dtype, self.pool.learned)
        for _ in run.steps():
            pass
        return run.read()

    def sweep(self, held: Held, pending: list[Record]):
        """Every retained version from the oldest on, in order: yields (version, the Replay holding
        it: its heads hold the session in slot 0, read() copies its state). For the guard's
        judgement; runs under the lock."""
        floor = held.history.floor()
        anchors, records = self._history_sources(held, pending)
        below = [v for v in anchors if v <= floor]
        if not below:
            return
        a = max(below)
        top = max([held.session.version] + list(records))
        todo = []
        for v in range(a + 1, top + 1):
            if v not in records:
                return
            todo.append(records[v])
        run = Replay(dataclasses.replace(held.session), anchors[a](), todo, width_for(len(held.session.classes)),
                     self.d, self.device, self.pool.head_dtype, self.pool.learned)
        if a >= floor:
            yield a, run
        for _ in run.steps():
            if run.sess.version >= floor:
                yield run.sess.version, run

    # ---- new versions from a whole state ----------------------------------------------------

    def rollback(self, key: str, version: int, actor: Optional[str] = None,
                 idem: Optional[Idem] = None) -> tuple[dict, bool]:
        """Make version `version`'s state current as a new version -> (answer, replayed)."""
        with self.lock:
            held = self._get(key)
            if idem:
                hit = held.idem.lookup(idem)
                if hit is not None:
                    return hit, True
                if self._reused([(key, idem)]):
                    raise idempotency_reused()
            tensors = self._state_at(held, version)
            at = held.history.entry(version)
            stats = (at.seen, at.correct, at.total) if at else (0, 0, 0)
            sess = held.session
            entry = Version(sess.version + 1, time.time(), "rollback", key_id=actor, source={"version": version},
                            seen=stats[0], correct=stats[1], total=stats[2])
            answer = {"id": sess.id, "version": entry.version, "rolled_back_to": version}
            self._append_version(held, tensors, stats, entry, idem, answer)
            return answer, False

    def _append_version(self, held: Held, tensors: dict[str, torch.Tensor], stats: tuple[int, int, int],
                        entry: Version, idem: Optional[Idem] = None, answer: Optional[dict] = None) -> None:
        """A new version whose state is `tensors`: made durable (see the module docstring), then
        current. The caller holds the lock."""
        sess = held.session
        assert entry.version == sess.version + 1
        idem_entry = None
        if idem:
            idem_entry = {"key": idem[0], "fp": idem[1], "expires": time.time() + self.idem_ttl, "response": answer}
        rec = Record(entry.version, 0, 0, 0, entry.t, [], idem_entry, self.fingerprint, entry.info(),
                     state={k: v.contiguous() for k, v in tensors.items()}, stats=stats)
        if self.durability == "wal":
            raw = rec.encode(sess.inc)
            failed = self._store_call(self.backend.append, {held.key: (Head(sess.inc, held.synced), [raw])})
            if failed.get(held.key) == "conflict":
                self._lost_race(held)
            elif failed:
                raise store_unavailable(failed[held.key])
            held.synced, entry.bytes, entry.logged = entry.version, len(raw), True
            held.log_bytes += len(raw)
            held.history.anchors.add(entry.version)
        elif self.durability == "snapshot":
            fresh = dataclasses.replace(sess, version=entry.version, seen=stats[0], correct=stats[1], total=stats[2],
                                        updated_at=entry.t)
            history = History(held.history.retention)
            history.entries = [entry]
            data = self._encode(Held(fresh, idem=held.idem, history=history, watch=held.watch), tensors, True)
            if not self._store_call(self.backend.put, held.key, sess.inc, entry.version, data,
                                    Head(sess.inc, held.synced)):
                self._lost_race(held)
            held.synced = held.snap_version = entry.version
        self.tiers.drop(held)
        sess.version, (sess.seen, sess.correct, sess.total), sess.updated_at = entry.version, stats, entry.t
        self.tiers.place(held, tensors)
        held.history.add(entry)
        if held.history.ring is not None:
            held.history.ring.add_record(rec)
            self._ring_retention(held)
        if idem:
            held.idem.put(idem[0], {k: idem_entry[k] for k in ("fp", "expires", "response")})
            self._record_claims([(held.key, idem)])
        if held.watch is not None:
            held.watch.rearm()
        self._gauges()

    # ---- forks --------------------------------------------------------------------------------

    def fork(self, key: str, version: Optional[int], session_id: Optional[str], tenant: Optional[str],
             quota: int = 0, actor: Optional[str] = None, idem: Optional[Idem] = None) -> tuple[SessionInfo, bool]:
        """A new session (in `tenant`) from a retained version of this one -> (its info, replayed)."""
        with self.lock:
            parent = self._get(key)
            p = parent.session
            v = p.version if version is None else version
            tensors = self._state_at(parent, v)
            at = parent.history.entry(v)
            guard = None
            if p.guard:
                guard = dict(p.guard)
                if guard["reference"] != "base":
                    guard["reference"] = 0  # the state it was forked from is the fork's version 0
            child = Session("", p.rule, dict(p.hyper), list(p.classes), p.init, guard=guard)
            if at is not None:
                child.seen, child.correct, child.total = at.seen, at.correct, at.total
            entry = Version(0, time.time(), "fork", key_id=actor, source={"session": p.id, "version": v},
                            seen=child.seen, correct=child.correct, total=child.total)
            ref = {"W": tensors["W"].clone(), "b": tensors["b"].clone()} if guard and guard["reference"] == 0 else None
            return self._admit(child, tensors, session_id, tenant, quota, idem, entry, ref)

    # ---- guard settings -------------------------------------------------------------------------

    def patch(self, key: str, guard=UNSET, frozen: Optional[bool] = None) -> SessionInfo:
        """Set, replace (`guard` a dict) or remove (None) the guard; freeze or unfreeze. Durable
        before it is answered (a snapshot with the new settings, compare-and-set)."""
        with self.lock:
            held = self._get(key)
            sess = held.session
            old = (sess.guard, sess.frozen, held.watch)
            if guard is not UNSET:
                if guard is None:
                    sess.guard, held.watch = None, None
                else:
                    cfg = guards.parse(guard, classes=sess.classes, base_classes=self.base_classes,
                                       version=sess.version, hyper=sess.hyper)
                    ref = None
                    if cfg["reference"] != "base":
                        state = self._state_at(held, cfg["reference"])
                        ref = {"W": state["W"], "b": state["b"]}
                    sess.guard, held.watch = cfg, guards.Watch(cfg, len(sess.classes), ref)
                self.refs.drop(held.key)
            if frozen is not None:
                sess.frozen = bool(frozen)
            if self.persistent:
                try:
                    written = self._write_snapshot(held, self.tiers.tensors_of(held))
                except DomainError:
                    sess.guard, sess.frozen, held.watch = old
                    raise
                if not written:
                    self.tiers.drop(held)
                    self._lost_race(held)
            return self._info(held)

    def _watch_of(self, sess: Session, ref: Optional[dict]) -> Optional[guards.Watch]:
        return guards.Watch(sess.guard, len(sess.classes), ref) if sess.guard else None

    def _check_guard(self, sess: Session, ref: Optional[dict]) -> None:
        """Guard settings that came with an export or a fork, checked as a request's would be."""
        if not sess.guard:
            return
        given = dict(sess.guard)
        pinned = given.get("reference") != "base"
        if pinned:
            given["reference"] = min(int(given.get("reference") or 0), sess.version)
        try:
            sess.guard = guards.parse(given, classes=sess.classes, base_classes=self.base_classes,
                                      version=sess.version, hyper=sess.hyper)
        except DomainError as e:
            raise invalid("invalid_snapshot", f"the export's guard: {e.message}") from None
        if pinned and ref is None:
            raise invalid("invalid_snapshot", "the export's guard pins a version but carries no reference head")

__all__ = ["UNSET", "VersionHead", "Versions", "pop_reference", "version_not_found", "version_not_retained"]

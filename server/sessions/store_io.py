"""What the session store reads and writes in its backend: encoded snapshots and exports (with
their checks), log appends and their outcome, snapshot writes, loading a stored session (snapshot
plus log replay), and Idempotency-Key claims.

``StoreIO`` is a part of ``SessionStore`` (server/sessions/store.py) kept in its own module: it
works on the store's own attributes (backend, fingerprint, held sessions, settings) and is never
used alone.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from server.errors import (
    DomainError, InvalidInput, conflict, invalid, store_in_doubt, store_unavailable, version_conflict,
)
from server.keys import split_key
from server.rules import check_trained
from server.sessions import codec
from server.sessions.backends import Head, StoreError
from server.sessions.idempotency import Idem, IdempotencyRecords, claim_conflicts
from server.sessions.history import Version, anchor_interval
from server.sessions.session import Held, Session
from server.sessions.slots import width_for
from server.sessions.versions import pop_reference
from server.sessions.wal import WalBuffer, replay

log = logging.getLogger("fwserve.store")


class StoreIO:
    # ---- learned rules ----------------------------------------------------------------------

    @property
    def learned(self) -> dict:
        """The learned rules' parameters on the device: rule -> name -> tensor (or float)."""
        return self.pool.learned

    def check_trained(self, rule):
        """`rule`, or InvalidInput when it is a learned rule whose parameters this store lacks."""
        check_trained(rule, self.pool.learned, self.learned_refused)
        return rule

    # ---- the write-ahead log ----------------------------------------------------------------

    def _flush(self, wal: Optional[WalBuffer]) -> dict[str, DomainError]:
        """wal: append the transaction's records (one backend call). Sessions whose append failed
        are dropped from memory (the store keeps their last durable state) -> {key: the error}."""
        if wal is None or not wal.pending or self.durability != "wal":
            return {}
        batch = {}
        for key, recs in wal.pending.items():
            sess = self.held[key].session
            batch[key] = (Head(sess.inc, recs[0].version - 1), [r.encode(sess.inc) for r in recs])
        try:
            failed = self.backend.append(batch)
        except StoreError as e:
            log.error("log append failed: %s", e)
            failed = self._appended_in_doubt(batch, e)
        errors: dict[str, DomainError] = {}
        for key, why in failed.items():
            if isinstance(why, DomainError):
                errors[key] = why
            elif why == "conflict":
                errors[key] = version_conflict(split_key(key)[1])
            else:
                errors[key] = store_unavailable(why)
        for key, (_, records) in batch.items():
            held = self.held[key]
            if key in errors:
                self._forget(held)
            else:
                held.synced = held.session.version
                held.log_bytes += sum(len(r) for r in records)
                for rec, raw in zip(wal.pending[key], records):
                    self._remember_version(held, rec, len(raw), True)
        return errors

    def _keep_history(self, wal: Optional[WalBuffer], errors: dict) -> None:
        """Without the log: the transaction's versions become history entries (and, with the
        in-memory ring, its records and now and then a state copy)."""
        if wal is None or self.durability == "wal":
            return
        for key, recs in wal.pending.items():
            held = self.held.get(key)
            if held is None or key in errors:
                continue
            ring = held.history.ring
            for rec in recs:
                self._remember_version(held, rec, 0, False)
                if ring is not None:
                    ring.add_record(rec)
            if ring is not None:
                if held.session.version - ring.last_anchor() >= anchor_interval(self.retention):
                    ring.add_anchor(held.session.version, self.tiers.tensors_of(held))
                self._ring_retention(held)

    def _remember_version(self, held: Held, rec, nbytes: int, logged: bool) -> None:
        entry = Version.of_record(rec, nbytes or 0)
        entry.logged = logged
        held.history.add(entry)
        if rec.state is not None and logged:
            held.history.anchors.add(rec.version)

    def _ring_retention(self, held: Held) -> None:
        """Keep the ring within retention: drop what is older than the newest anchor at or before
        the floor, then whole chunks (an anchor and its records) while over --history-max-bytes."""
        h, ring = held.history, held.history.ring
        floor = h.retention.floor(h.entries, time.time())
        below = [v for v in ring.anchors if v <= floor]
        if below:
            ring.drop_before(max(below))
        starts = ring.chunk_starts()
        while ring.bytes > h.retention.max_bytes and len(starts) > 1:
            starts.pop(0)
            ring.drop_before(starts[0])
        if ring.bytes > h.retention.max_bytes:  # one chunk alone is too big: keep only the current state
            ring.drop_before(held.session.version + 1)
            ring.add_anchor(held.session.version, self.tiers.tensors_of(held))
        if ring.anchors:
            first = min(ring.anchors)
            h.entries = [e for e in h.entries if e.version >= first] or h.entries[-1:]

    def _appended_in_doubt(self, batch, error: StoreError, tries: int = 3) -> dict:
        """The append call failed as a whole: ask the store which keys it appended (their head
        moved by exactly their records). Keys it still cannot tell about are in doubt."""
        delay = 0.1
        for attempt in range(tries):
            try:
                heads = self.backend.heads(batch)
            except StoreError:
                if attempt + 1 < tries:
                    time.sleep(delay)
                    delay *= 3
                continue
            out = {}
            for key, (expect, records) in batch.items():
                head = heads.get(key)
                if head == Head(expect.inc, expect.version + len(records)):
                    continue  # appended
                out[key] = f"error: {error}" if head == expect else store_in_doubt(error)
            return out
        return {key: store_in_doubt(error) for key in batch}

    # ---- snapshots and exports ----------------------------------------------------------------

    def _encode(self, held: Held, tensors, internal: bool = False, keep_from: Optional[int] = None) -> bytes:
        """An export (with its retained history entries); `internal` (store snapshots) adds the
        key, incarnation, idempotency records, and the entries no kept log record holds (from
        `keep_from`, default the snapshot's own version). A pinned guard reference travels as
        tensors guard.W, guard.b."""
        sess = held.session
        meta = {"format": codec.EXPORT_FORMAT, "backbone": self.backbone_name, "embed_dim": self.d,
                "weights": self.fingerprint, **sess.meta()}
        if internal:
            meta.update(key=sess.key, incarnation=sess.inc, **held.idem.to_meta(),
                        history=held.history.unlogged(sess.version if keep_from is None else keep_from))
        else:
            floor = held.history.floor()
            meta["history"] = [e.to_meta() for e in held.history.entries if e.version >= floor]
        if held.watch is not None and held.watch.ref is not None:
            tensors = {**tensors, "guard.W": held.watch.ref["W"], "guard.b": held.watch.ref["b"]}
        return codec.encode(tensors, meta)

    def _decode(self, data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
        try:
            meta, tensors = codec.decode(data)
        except codec.CodecError:
            raise invalid("invalid_snapshot", "body is not a fwserve session export (safetensors)") from None
        if meta.get("format") not in codec.EXPORT_FORMATS:
            raise invalid("invalid_snapshot", f"snapshot format {meta.get('format')!r} is none of {codec.EXPORT_FORMATS}")
        if meta.get("backbone") != self.backbone_name:
            raise invalid("invalid_snapshot", f"snapshot was made on backbone {meta.get('backbone')!r}; "
                          f"this server serves {self.backbone_name!r}")
        if meta.get("embed_dim") != self.d:
            raise invalid("invalid_snapshot", f"snapshot embed_dim {meta.get('embed_dim')} != backbone's {self.d}")
        self._check_weights(meta.get("weights"))
        return meta, tensors

    def _check_weights(self, weights: Optional[str]) -> None:
        """A head learnt on other backbone weights must not meet these weights' features. Records
        of the first release carry no fingerprint and are taken as they are."""
        if weights and self.fingerprint and weights != self.fingerprint:
            raise invalid("weights_mismatch", f"this session was made for backbone weights {weights[:16]}...; this "
                          f"server's are {self.fingerprint[:16]}... (its head would meet features it never saw): "
                          "recreate it, or serve it with the weights it was made for")

    def _write_snapshot(self, held: Held, tensors) -> bool:
        """Snapshot the session at its version into the store (compare-and-set on its head); a
        stale copy (another replica moved on) is let go: the caller drops its tensors. -> written?"""
        sess = held.session
        keep_from = held.history.keep_from(sess.version) if self.durability == "wal" else None
        data = self._encode(held, tensors, True, keep_from)
        ok = self._store_call(self.backend.put, held.key, sess.inc, sess.version, data, Head(sess.inc, held.synced),
                              keep_from)
        if ok:
            held.synced = held.snap_version = sess.version
            held.log_bytes = 0
            if keep_from is not None:  # the store's history changed; without the log it is in memory
                held.history.anchors.add(sess.version)
                held.history.trim(keep_from)
        else:
            log.warning("session %s changed in the store since this replica loaded it; dropping the local copy "
                        "(%d unsaved adapts lost)", held.key, sess.version - held.synced)
            self._unhold(held)
        return ok

    def _materialize(self, key: str, stored) -> tuple[Held, dict[str, torch.Tensor]]:
        """Snapshot + the log records that follow it (same incarnation, in version order); the
        history entries and anchors of what the store keeps."""
        try:
            meta, tensors = self._decode(stored.snapshot)
            ref = pop_reference(tensors)
            sess = Session.from_meta(key, meta, self.C)
            sess.inc = str(meta["incarnation"])
            self.check_trained(sess.rule)
            n = len(sess.classes)
            want = {"W": (n, self.d), "b": (n,), **sess.rule.state_shapes(n, self.d)}
            if {k: tuple(v.shape) for k, v in tensors.items()} != want:
                raise invalid("invalid_snapshot", f"stored tensors do not match the rule {sess.rule.name!r}")
            entries = [Version.from_meta(e) for e in meta.get("history") or ()]
        except InvalidInput as e:
            if e.code in ("weights_mismatch", "rule_not_trained"):  # readable, not here: say so, do not retry
                raise conflict("weights_mismatch", e.message) from None
            raise StoreError(f"session {key}: unreadable snapshot in the store: {e.message}") from None
        except (DomainError, KeyError, TypeError) as e:
            raise StoreError(f"session {key}: unreadable snapshot in the store: {getattr(e, 'message', e)}") from None
        held = Held(sess, idem=IdempotencyRecords.from_meta(meta, self.idem_max, self._idem_evicted),
                    history=self._new_history())
        held.synced = held.snap_version = sess.version
        recs, after = [], 0  # the records after the snapshot, and their bytes (compaction counts them)
        anchors = {sess.version, *stored.archives}
        try:
            for raw in stored.records:
                m = codec.read_meta(raw)
                if str(m.get("inc")) != sess.inc:
                    continue
                v = m.get("v")
                if isinstance(v, int) and v <= sess.version:  # history before the snapshot: its entry only
                    entries.append(_entry_of_meta(m, len(raw)))
                    if m.get("format") == codec.STATE_FORMAT:
                        anchors.add(v)
                    continue
                if v != sess.version + len(recs) + 1:  # a leftover past a gap: never current
                    continue
                inc, rec = codec.Record.decode(raw)
                if rec.weights and self.fingerprint and rec.weights != self.fingerprint:
                    raise conflict("weights_mismatch", f"session {split_key(key)[1]!r}: its log was written "
                                   "with other backbone weights")
                recs.append(rec)
                after += len(raw)
                entries.append(Version.of_record(rec, len(raw)))
                if rec.state is not None:
                    anchors.add(rec.version)
        except codec.CodecError as e:
            raise StoreError(f"session {key}: unreadable log record: {e}") from None
        held.log_bytes = after
        if recs:
            tensors = replay(sess, tensors, recs, width_for(len(sess.classes)), self.d, self.device,
                             self.pool.head_dtype, self.pool.learned)
            now = time.time()
            for rec in recs:
                if rec.idem and rec.idem["expires"] > now:
                    held.idem.put(rec.idem["key"], {k: rec.idem[k] for k in ("fp", "expires", "response")})
                if "frozen" in rec.info:
                    sess.frozen = bool(rec.info["frozen"])
        held.synced = sess.version
        for e in sorted(entries, key=lambda e: e.version):
            held.history.add(e)
        if not held.history.entries or held.history.current.version != sess.version:
            held.history.add(Version(sess.version, sess.updated_at, "create" if sess.version == 0 else "adapt",
                                     seen=sess.seen, correct=sess.correct, total=sess.total))
        held.history.anchors = {v for v in anchors if v <= sess.version}
        if held.history.ring is not None:  # snapshot mode: the history in memory starts here
            held.history.ring.add_anchor(sess.version, {k: t.clone() for k, t in tensors.items()})
        held.watch = self._watch_of(sess, ref)
        return held, tensors

    # ---- Idempotency-Keys ---------------------------------------------------------------------

    def _records(self) -> IdempotencyRecords:
        return IdempotencyRecords(self.idem_max, self._idem_evicted)

    def _idem_evicted(self, n: int) -> None:
        log.warning("%d Idempotency-Key answers dropped before their time: a session's answers exceed "
                    "--idempotency-max-bytes", n)
        self.events.idempotency_evicted(n)

    def _claims_by_tenant(self, pairs: list[tuple[str, Idem]]) -> dict:
        by_tenant: dict = {}
        expires = time.time() + self.idem_ttl
        for session_key, (k, fp) in pairs:
            by_tenant.setdefault(split_key(session_key)[0], {})[k] = {"owner": session_key, "fp": fp,
                                                                      "expires": expires}
        return by_tenant

    def _reused(self, pairs: list[tuple[str, Idem]]) -> set[str]:
        """For (session key, (key, fingerprint)) pairs: the session keys whose Idempotency-Key the
        tenant already used with another session or request (one backend call per tenant)."""
        taken = set()
        for tenant, claims in self._claims_by_tenant(pairs).items():
            held = self._store_call(self.backend.claims, tenant, list(claims))
            taken |= {claims[k]["owner"] for k in claim_conflicts(claims, held)}
        return taken

    def _record_claims(self, pairs: list[tuple[str, Idem]]) -> None:
        """The keys of applied requests become their tenant's (best effort: the answers themselves
        are durable with their sessions; the claims catch reuse on other sessions)."""
        for tenant, claims in self._claims_by_tenant(pairs).items():
            try:
                self.backend.claim(tenant, claims)
            except StoreError as e:
                log.error("recording %d Idempotency-Keys of tenant %s failed: %s", len(claims), tenant, e)

    # ---- calls into the backend --------------------------------------------------------------

    def _store_call(self, fn, *args):
        try:
            return fn(*args)
        except StoreError as e:
            log.error("store: %s", e)
            raise store_unavailable(e) from None


def _entry_of_meta(m: dict, nbytes: int) -> Version:
    """A history record's entry from its metadata alone (no tensor read)."""
    info = m.get("info") or {}
    cum = info.get("cum") or [0, 0, 0]
    kind = info.get("kind") or ("reset" if m.get("format") == codec.STATE_FORMAT else "adapt")
    return Version(int(m["v"]), float(m["t"]), str(kind), int(m.get("n", 0)), int(m.get("labelled", m.get("n", 0))),
                   info.get("key_id"), str(info.get("by") or "client"), info.get("source"), int(cum[0]), int(cum[1]),
                   int(cum[2]), info.get("guard"), nbytes, True)

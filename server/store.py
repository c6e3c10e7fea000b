"""Session store: the only place that mutates session heads.

Heads live in preallocated slot tensors on the device (``W [S+1, C, d]``, ``b [S+1, C]``, ...;
slot S is the backbone's base head, never evicted). Rule state that only some sessions need
(RLS ``P``, prototype sums/counts) lives in per-rule pools that grow on demand. At most
``max_device_sessions`` sessions hold a slot; the least recently used one moves to host memory
when a slot is needed, and beyond ``max_host_sessions`` host sessions the least recently used
one is written to ``snapshot_dir`` (safetensors, the export format). Touching an evicted
session brings it back bit-for-bit (float32 copies, no arithmetic).

Thread-safety: every public method takes ``self.lock``; the batch worker holds it for a whole
micro-batch's head work, so management calls (create/reset/delete/import/export) happen between
micro-batches and never interleave with an update.

Persistence (``server.persistence``): the disk tier is a store backend (a directory or Redis).
With ``--durability none`` it is only the spill tier. With ``snapshot`` or ``wal`` the store is
the source of truth and the device and host tiers are caches of it: a session this process does
not hold is loaded from the store on first use (snapshot, then its log replayed). In ``wal``
mode ``apply``/``commit`` record each adapt's update inputs (features, labels, statistics) and
``flush`` appends them to the log before the batch worker acknowledges anything; a session
whose append fails is dropped from memory, so its unlogged update is never served.

Keys: a session's key is its id, or ``tenant/id`` when API keys are on; ``Session.id`` is the
id the client sees.

Multi-replica protocol (shared store, ``snapshot``/``wal``): a local copy is current exactly
when the store's head equals ``(session.inc, session.synced)``. ``acquire`` and every
management call check the heads of the sessions they touch (one pipelined round trip) and
reload stale copies; log appends and snapshot writes are compare-and-set on the head, so of
two replicas racing on one session exactly one wins and the other drops its copy and answers
503 ``version_conflict`` (retried by the runtime).
"""

from __future__ import annotations

import copy
import hashlib
import math
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import kernels

from server.errors import (
    ApiError, conflict, idempotency_reused, invalid, quota_exceeded, session_not_found, store_unavailable,
    version_conflict,
)
from server.persistence import Backend, Head, StoreError, new_incarnation, open_backend, split_key
from server.rules import PER_SLOT_HYPER, RULES, Heads, Rule, get_rule

EXPORT_FORMAT = "fwserve-session/1"
RECORD_FORMAT = "fwserve-wal/1"
log = logging.getLogger("fwserve.store")
MAX_LABEL_LEN = 128


@dataclass
class Session:
    id: str
    rule: Rule
    hyper: dict[str, float]
    classes: list[str]
    init: str
    version: int = 0
    seen: int = 0
    correct: int = 0
    total: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    tier: str = "device"
    slot: Optional[int] = None
    state_row: Optional[int] = None
    host: Optional[dict[str, torch.Tensor]] = None
    index: dict[str, int] = field(default_factory=dict)
    key: str = ""  # store key: id, or tenant/id
    tenant: Optional[str] = None
    inc: str = ""  # incarnation: new at create, import and reset
    synced: int = 0  # version the store holds (wal: == version once flushed)
    snap_version: int = 0  # version of the store's snapshot (wal: the log holds the rest)
    idem: dict = field(default_factory=dict)  # Idempotency-Key -> {"fp", "expires", "response"} (adapts)
    create_idem: Optional[dict] = None  # {"key", "fp", "expires"} of the creating request

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.classes)}
        if self.key:
            self.tenant = split_key(self.key)[0]
        self.key = self.key or make_key(self.tenant, self.id)

    def label_index(self, label) -> int:
        if isinstance(label, int):
            if 0 <= label < len(self.classes):
                return label
            raise invalid("unknown_label", f"label index {label} is outside 0..{len(self.classes) - 1}")
        try:
            return self.index[label]
        except KeyError:
            shown = ", ".join(repr(c) for c in self.classes[:20])
            raise invalid("unknown_label", f"unknown label {label!r}; classes: {shown}") from None

    def meta(self) -> dict:
        return {
            "id": self.id, "rule": self.rule.name, "hyperparameters": self.hyper, "classes": self.classes,
            "init": self.init, "version": self.version, "examples_seen": self.seen,
            "prequential_correct": self.correct, "prequential_total": self.total,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }

    def info(self) -> dict:
        acc = self.correct / self.total if self.total else None
        return {
            "id": self.id, "rule": self.rule.name, "hyperparameters": dict(self.hyper),
            "classes": list(self.classes), "init": self.init, "version": self.version,
            "examples_seen": self.seen,
            "prequential": {"correct": self.correct, "total": self.total, "accuracy": acc},
            "tier": self.tier, "created_at": self.created_at, "updated_at": self.updated_at,
        }


class StatePool:
    """Rows of one rule's state ([R, ...] tensors), grown by doubling up to max_rows."""

    def __init__(self, rule: Rule, C: int, d: int, device: torch.device, max_rows: int) -> None:
        self.shapes = {name: shape(C, d) for name, shape in rule.state.items()}
        self.device, self.max_rows = device, max_rows
        self.tensors = {n: torch.zeros((0, *s), device=device) for n, s in self.shapes.items()}
        self.free: list[int] = []

    def alloc(self) -> int:
        if not self.free:
            cap = next(iter(self.tensors.values())).shape[0]
            new = min(max(2 * cap, 8), self.max_rows)
            if new <= cap:  # pragma: no cover - a pool never needs more rows than slots
                raise RuntimeError("state pool exhausted")
            for n, s in self.shapes.items():
                t = torch.zeros((new, *s), device=self.device)
                t[:cap] = self.tensors[n]
                self.tensors[n] = t
            self.free.extend(range(new - 1, cap - 1, -1))
        return self.free.pop()

    def release(self, row: int) -> None:
        for t in self.tensors.values():
            t[row].zero_()
        self.free.append(row)


def snapshot_name(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:40] + ".safetensors"


def make_key(tenant: Optional[str], session_id: str) -> str:
    return f"{tenant}/{session_id}" if tenant else session_id


def _st_meta(data: bytes) -> dict:
    """The fwserve JSON metadata of a safetensors blob (header only, no tensor is read)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["fwserve"])


def snapshot_head(data: bytes) -> tuple[str, int]:
    """(incarnation, version) of a store snapshot."""
    m = _st_meta(data)
    return str(m["incarnation"]), int(m["version"])


def snapshot_key(data: bytes) -> str:
    return str(_st_meta(data)["key"])


def record_head(data: bytes) -> tuple[str, int]:
    """(incarnation, version) of a log record."""
    m = _st_meta(data)
    return str(m["inc"]), int(m["v"])


@dataclass
class Record:
    """One adapt as logged: the update inputs and statistics. A step is one rule.update call:
    this session's rows (x, y) and the row counts of the other sessions that shared the call
    (the torch kernels pick their code path from the call's shape; replay rebuilds it)."""

    version: int
    n: int
    correct: int
    labelled: int
    t: float
    steps: list
    idem: Optional[dict] = None  # {"key", "fp", "expires", "response"}

    def encode(self, inc: str) -> bytes:
        tensors = {}
        for i, (x, y, _) in enumerate(self.steps):
            tensors[f"x{i}"], tensors[f"y{i}"] = x.contiguous(), y.contiguous()
        meta = {"format": RECORD_FORMAT, "inc": inc, "v": self.version, "n": self.n, "correct": self.correct,
                "labelled": self.labelled, "t": self.t, "steps": len(self.steps), "idem": self.idem,
                "others": [o for _, _, o in self.steps]}
        return st_save(tensors, metadata={"fwserve": json.dumps(meta)})

    @classmethod
    def decode(cls, data: bytes) -> tuple[str, "Record"]:
        m = _st_meta(data)
        if m.get("format") != RECORD_FORMAT:
            raise StoreError(f"log record format {m.get('format')!r} != {RECORD_FORMAT!r}")
        t = st_load(data)
        others = m.get("others") or [[]] * int(m["steps"])
        steps = [(t[f"x{i}"], t[f"y{i}"], list(others[i])) for i in range(int(m["steps"]))]
        return str(m["inc"]), cls(int(m["v"]), int(m["n"]), int(m["correct"]), int(m.get("labelled", m["n"])),
                                  float(m["t"]), steps, m.get("idem"))


class SessionStore:
    def __init__(self, settings, embed_dim: int, base_W: torch.Tensor, base_b: torch.Tensor,
                 base_classes: list[str], device, backbone_name: str, metrics=None,
                 backend: Optional[Backend] = None) -> None:
        self.settings, self.metrics, self.backbone_name = settings, metrics, backbone_name
        self.device = torch.device(device)
        self.d = embed_dim
        self.S = settings.max_device_sessions
        self.C = max(settings.max_classes, len(base_classes))
        self.base_slot = self.S
        self.base_classes = list(base_classes)
        self.base_W = base_W.detach().float().cpu().clone()
        self.base_b = base_b.detach().float().cpu().clone()
        S1, C, d, dev = self.S + 1, self.C, self.d, self.device
        self.W = torch.zeros(S1, C, d, device=dev)
        self.b = torch.zeros(S1, C, device=dev)
        self.n_classes = torch.zeros(S1, dtype=torch.int64, device=dev)
        self.normalize = torch.zeros(S1, dtype=torch.bool, device=dev)
        self.hyper = {n: torch.full((S1,), v, device=dev) for n, v in PER_SLOT_HYPER.items()}
        self.pools = {r.name: StatePool(r, C, d, dev, self.S) for r in RULES.values() if r.state}
        nb = len(base_classes)
        self.W[self.base_slot, :nb] = self.base_W.to(dev)
        self.b[self.base_slot, :nb] = self.base_b.to(dev)
        self.n_classes[self.base_slot] = nb

        self.lock = threading.RLock()
        self.sessions: dict[str, Session] = {}
        self.device_lru: OrderedDict[str, None] = OrderedDict()
        self.host_lru: OrderedDict[str, None] = OrderedDict()
        self.n_disk = 0
        self.free_slots = list(range(self.S - 1, -1, -1))
        self.snapshot_dir = Path(settings.snapshot_dir)
        self.durability = getattr(settings, "durability", "none")
        self.persistent = self.durability != "none"
        if backend is None:
            url = settings.store_url() if hasattr(settings, "store_url") else str(self.snapshot_dir)
            # none: a private spill namespace; snapshot/wal: the shared, exclusive (directory) store
            ns = "fwserve" if self.persistent else f"fwserve:tmp:{uuid.uuid4().hex}"
            backend = open_backend(url, fsync=getattr(settings, "fsync", True), exclusive=self.persistent,
                                   namespace=ns)
        self.backend = backend
        self.check_heads = self.persistent and backend.shared  # version check on every use
        self._slot_owner: dict[int, Session] = {}
        self._steps: dict[str, list] = {}  # wal: update inputs applied since the session's last commit
        self._pending: dict[str, list[Record]] = {}  # wal: committed, not yet logged (this micro-batch)
        self.idem_ttl = float(getattr(settings, "idempotency_ttl_s", 3600.0))
        self.idem_max = int(getattr(settings, "idempotency_max_keys", 128))

    # ---- views for kernels --------------------------------------------------------------------

    @property
    def heads(self) -> Heads:
        return Heads(self.W, self.b, self.n_classes, self.normalize, self.hyper,
                     {r: p.tensors for r, p in self.pools.items()})

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Grouped head forward: row i scored by slot slots[i] -> [B, C] float32 logits."""
        with self.lock:
            return kernels.head_forward(x, self.W, self.b, slots, self.n_classes, normalize=self.normalize)

    # ---- session management ---------------------------------------------------------------

    def create(self, rule_name: str, classes: Optional[list[str]], hyper: dict, init: str = "zeros",
               session_id: Optional[str] = None, tenant: Optional[str] = None, quota: int = 0,
               idem: Optional[tuple[str, str]] = None) -> Session:
        return self.create_session(rule_name, classes, hyper, init, session_id, tenant, quota, idem)[0]

    def create_session(self, rule_name: str, classes: Optional[list[str]], hyper: dict, init: str = "zeros",
                       session_id: Optional[str] = None, tenant: Optional[str] = None, quota: int = 0,
                       idem: Optional[tuple[str, str]] = None) -> tuple[Session, bool]:
        """A new session -> (session, replayed). `quota`: the tenant's session quota (0: none).
        `idem` (Idempotency-Key, request fingerprint): a retry of the creating request answers
        the same session (replayed=True) and creates nothing."""
        rule = get_rule(rule_name)
        hyper = rule.validate(hyper)
        classes = self._check_classes(self.base_classes if classes is None else classes)
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
            old = self.sessions.get(key)
            if old is not None:
                if idem and old.create_idem and old.create_idem["key"] == idem[0] \
                        and old.create_idem["expires"] > time.time():
                    if old.create_idem["fp"] != idem[1]:
                        raise idempotency_reused()
                    return old, True
                raise conflict("session_exists", f"session {session_id!r} already exists")
            if quota and self.tenant_count(tenant) >= quota:
                raise quota_exceeded(quota, self.settings.retry_after_s)
            if not self.persistent and len(self.sessions) >= self.settings.max_sessions:
                raise conflict("session_limit", f"the server holds its maximum of {len(self.sessions)} sessions")
            sess = Session(session_id, rule, hyper, classes, init, key=key, inc=new_incarnation())
            if idem:
                sess.create_idem = {"key": idem[0], "fp": idem[1], "expires": time.time() + self.idem_ttl}
            tensors = self._initial_tensors(sess)
            if self.persistent:
                res = self._store_call(self.backend.create, key, sess.inc, self._serialize(sess, tensors, True),
                                       quota, self.settings.max_sessions)
                if res == "exists":  # created meanwhile by another replica
                    raise conflict("session_exists", f"session {session_id!r} already exists")
                if res == "tenant_quota":
                    raise quota_exceeded(quota, self.settings.retry_after_s)
                if res == "limit":
                    raise conflict("session_limit", f"the store holds its maximum of {self.settings.max_sessions} "
                                   "sessions")
            self._place(sess, tensors, pinned=())
            self.sessions[key] = sess
            self._gauges()
            return sess, False

    def get(self, session_id: str) -> Session:
        """The session under this key (loaded from the store if needed, current in shared mode)."""
        with self.lock:
            self._refresh([session_id])
            sess = self.sessions.get(session_id)
            if sess is None:
                raise session_not_found(split_key(session_id)[1])
            return sess

    def info(self, session_id: str) -> dict:
        with self.lock:
            return self.get(session_id).info()

    def reset(self, session_id: str) -> Session:
        """Back to the initial head and state; version and statistics back to 0."""
        with self.lock:
            sess = self.get(session_id)
            self._drop_tensors(sess)
            sess.version = sess.seen = sess.correct = sess.total = 0
            sess.updated_at = time.time()
            sess.inc = new_incarnation()
            tensors = self._initial_tensors(sess)
            if self.persistent:
                try:
                    self._store_call(self.backend.put, sess.key, sess.inc, 0, self._serialize(sess, tensors, True))
                except ApiError:
                    self._forget(sess)
                    raise
                sess.synced = sess.snap_version = 0
            self._place(sess, tensors, pinned=())
            self._gauges()
            return sess

    def delete(self, session_id: str) -> None:
        with self.lock:
            sess = self.get(session_id)
            if self.persistent:
                self._store_call(self.backend.delete, sess.key)
            self._drop_tensors(sess)
            del self.sessions[sess.key]
            self._gauges()

    def export(self, session_id: str) -> bytes:
        with self.lock:
            sess = self.get(session_id)
            return self._serialize(sess, self._tensors_of(sess))

    def import_(self, session_id: str, data: bytes, quota: int = 0) -> tuple[Session, bool]:
        """Create or replace `session_id` (a key) from an export; returns (session, created)."""
        meta, tensors = self._deserialize(data)
        sess = self._session_from(session_id, meta, tensors)
        self._check_tensors(sess, tensors)
        sess.updated_at = time.time()
        sess.inc = new_incarnation()
        with self.lock:
            self._refresh([session_id])
            old = self.sessions.get(session_id)
            if old is None and quota and self.tenant_count(split_key(session_id)[0]) >= quota:
                raise quota_exceeded(quota, self.settings.retry_after_s)
            if old is None and len(self.sessions) >= self.settings.max_sessions and not self.persistent:
                raise conflict("session_limit", f"the server holds its maximum of {len(self.sessions)} sessions")
            if self.persistent:
                if old is None and self.backend.count() >= self.settings.max_sessions:
                    raise conflict("session_limit", f"the store holds its maximum of {self.settings.max_sessions} "
                                   "sessions")
                self._store_call(self.backend.put, session_id, sess.inc, sess.version,
                                 self._serialize(sess, tensors, True))
                sess.synced = sess.snap_version = sess.version
            if old is not None:
                self._drop_tensors(old)
            self.sessions[session_id] = sess
            self._place(sess, tensors, pinned=())
            self._gauges()
            return sess, old is None

    def tenant_count(self, tenant: Optional[str]) -> int:
        if self.persistent:
            return self._store_call(self.backend.count, tenant)
        return sum(1 for s in self.sessions.values() if s.tenant == tenant)

    def _session_from(self, key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> Session:
        """A Session from export/snapshot metadata (validated; tensors checked by the caller)."""
        tenant, sid = split_key(key)
        sess = Session(sid, get_rule(meta["rule"]), {}, self._check_classes(meta["classes"]),
                       str(meta.get("init", "zeros")), key=key, tenant=tenant)
        sess.hyper = sess.rule.validate(meta["hyperparameters"])
        for attr, name in (("version", "version"), ("seen", "examples_seen"),
                           ("correct", "prequential_correct"), ("total", "prequential_total")):
            v = meta.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise invalid("invalid_snapshot", f"metadata {name} must be a non-negative integer")
            setattr(sess, attr, v)
        now = time.time()
        for attr in ("created_at", "updated_at"):
            t = meta.get(attr, now)
            setattr(sess, attr, float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else now)
        return sess

    # ---- batch worker API -----------------------------------------------------------------

    def acquire(self, ids: Iterable[str]) -> tuple[dict[str, Session], set[str]]:
        """Bring these sessions to the device together (none evicts another); -> (found, missing)."""
        with self.lock:
            ids = list(dict.fromkeys(ids))
            self._refresh(ids)
            found = {i: self.sessions[i] for i in ids if i in self.sessions}
            if len(found) > self.S:
                raise ApiError(503, "overloaded", "more sessions in one batch than device slots")
            pinned = set(found)
            for sess in found.values():
                self._to_device(sess, pinned)
            return found, set(ids) - set(found)

    def apply(self, rule: Rule, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
              state_rows: Optional[torch.Tensor]) -> Optional[int]:
        """One grouped kernel update over rows of sessions of `rule` (already acquired); returns
        what the rule reports (label-free rules: sessions reset by their collapse guard)."""
        with self.lock:
            self._log_steps(x, y, slots)
            return rule.update(self.heads, x, y, slots, state_rows)

    def commit(self, sess: Session, n_examples: int, correct: int, labelled: Optional[int] = None) -> int:
        """Book one applied adapt request: version + 1, statistics; returns the new version.
        `labelled`: how many of the examples had a label (prequential total); default all."""
        with self.lock:
            sess.version += 1
            sess.seen += n_examples
            sess.correct += correct
            sess.total += n_examples if labelled is None else labelled
            sess.updated_at = time.time()
            self._log_commit(sess, n_examples, correct, labelled)
            return sess.version

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"device": len(self.device_lru), "host": len(self.host_lru), "disk": self.n_disk}

    # ---- write-ahead log and idempotency (batch worker, under the lock) -------------------

    def _log_steps(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> None:
        """wal: keep each session's rows of this update call (its exact inputs) for its record."""
        if self.durability != "wal":
            return
        sl = slots.tolist()
        counts: dict[int, int] = {}
        for slot in sl:
            if slot >= 0:
                counts[slot] = counts.get(slot, 0) + 1
        for slot in counts:
            sess = self._slot_owner.get(slot)
            if sess is None:
                continue
            mask = slots == slot
            others = [c for s_, c in counts.items() if s_ != slot]
            self._steps.setdefault(sess.key, []).append(
                (x[mask].detach().cpu().clone(), y[mask].detach().cpu().clone(), others))

    def _log_commit(self, sess: Session, n: int, correct: int, labelled: Optional[int]) -> None:
        if self.durability != "wal":
            return
        rec = Record(sess.version, n, correct, n if labelled is None else labelled, sess.updated_at,
                     self._steps.pop(sess.key, []))
        self._pending.setdefault(sess.key, []).append(rec)

    def remember(self, sess: Session, idem: Optional[tuple[str, str]], response: dict) -> None:
        """Keep an adapt's response under its Idempotency-Key (logged with its record in wal mode)."""
        if not idem:
            return
        entry = {"fp": idem[1], "expires": time.time() + self.idem_ttl, "response": copy.deepcopy(response)}
        with self.lock:
            sess.idem.pop(idem[0], None)
            sess.idem[idem[0]] = entry
            while len(sess.idem) > self.idem_max:
                sess.idem.pop(next(iter(sess.idem)))
            recs = self._pending.get(sess.key)
            if recs:
                recs[-1].idem = {"key": idem[0], **entry}

    def idem_lookup(self, sess: Session, idem: Optional[tuple[str, str]]) -> Optional[dict]:
        """The stored response of an earlier request with this Idempotency-Key, or None; 422 when
        the key was used with a different request."""
        if not idem:
            return None
        with self.lock:
            entry = sess.idem.get(idem[0])
            if entry is None:
                return None
            if entry["expires"] <= time.time():
                del sess.idem[idem[0]]
                return None
            if entry["fp"] != idem[1]:
                raise idempotency_reused()
            return copy.deepcopy(entry["response"])

    def flush(self) -> dict[str, ApiError]:
        """wal: append this micro-batch's records to the log (one backend call; fsync or AOF).
        Sessions whose append failed are dropped from memory (their update was not logged) ->
        {key: the error to answer their jobs with}."""
        with self.lock:
            self._steps.clear()
            if not self._pending:
                return {}
            pending, self._pending = self._pending, {}
            batch = {}
            for key, recs in pending.items():
                sess = self.sessions[key]
                batch[key] = (Head(sess.inc, recs[0].version - 1), [r.encode(sess.inc) for r in recs])
            try:
                failed = self.backend.append(batch)
                errors = {k: version_conflict(split_key(k)[1]) for k in failed}
            except StoreError as e:
                log.error("log append failed: %s", e)
                errors = {k: store_unavailable(e) for k in batch}
            for key in batch:
                sess = self.sessions[key]
                if key in errors:
                    self._forget(sess)
                else:
                    sess.synced = sess.version
            return errors

    def abort(self) -> None:
        """The micro-batch failed half-way: drop the sessions it changed but did not log."""
        with self.lock:
            keys = set(self._pending) | set(self._steps)
            self._pending, self._steps = {}, {}
            for key in keys:
                if key in self.sessions:
                    self._forget(self.sessions[key])

    def checkpoint(self, final: bool = False) -> int:
        """snapshot: write sessions changed since their last write; wal: compact logs of
        --wal-compact-records or more records (all non-empty ones when `final`). One session per
        lock hold, so the batch worker interleaves. -> sessions written."""
        if not self.persistent:
            return 0
        with self.lock:
            todo = [s for s in self.sessions.values() if s.tier in ("device", "host") and self._dirty(s, final)]
        written = 0
        for sess in todo:
            with self.lock:
                if self.sessions.get(sess.key) is not sess or sess.tier not in ("device", "host") \
                        or not self._dirty(sess, final):
                    continue
                try:
                    self._write_snapshot(sess)
                    written += 1
                except ApiError as e:
                    log.error("writing session %s to the store failed: %s", sess.key, e.message)
        return written

    def _dirty(self, sess: Session, final: bool) -> bool:
        if self.durability == "snapshot":
            return sess.version != sess.synced
        behind = sess.version - sess.snap_version
        return behind > 0 and (final or behind >= self.settings.wal_compact_records)

    def _write_snapshot(self, sess: Session) -> bool:
        """Snapshot the session at its version into the store (compare-and-set on its head);
        a stale copy (another replica moved on) is dropped. -> written?"""
        data = self._serialize(sess, self._tensors_of(sess), True)
        ok = self._store_call(self.backend.put, sess.key, sess.inc, sess.version, data, Head(sess.inc, sess.synced))
        if ok:
            sess.synced = sess.snap_version = sess.version
        else:
            lost = sess.version - sess.synced
            log.warning("session %s changed in the store since this replica loaded it; dropping the local copy "
                        "(%d unsaved adapts lost)", sess.key, lost)
            self._forget(sess)
        return ok

    def close(self) -> None:
        """none: remove this store's spilled snapshots (sessions do not outlive the process);
        snapshot/wal: write every changed session, compact every log."""
        with self.lock:
            try:
                if self.persistent:
                    self.checkpoint(final=True)
                else:
                    for sess in list(self.sessions.values()):
                        if sess.tier == "disk":
                            self.backend.delete(sess.key)
            finally:
                self.backend.close()

    # ---- loading from the store ---------------------------------------------------------

    def _store_call(self, fn, *args):
        try:
            return fn(*args)
        except StoreError as e:
            log.error("store: %s", e)
            raise store_unavailable(e) from None

    def _refresh(self, keys: list[str]) -> None:
        """snapshot/wal: load sessions this process does not hold; with a shared store also drop
        and reload copies whose head moved (one round trip for all keys)."""
        if not self.persistent:
            return
        keys = [k for k in keys if k]
        if self.check_heads:
            heads = self._store_call(self.backend.heads, keys)
            for key in keys:
                local, head = self.sessions.get(key), heads.get(key)
                if local is not None and (head is None or head != Head(local.inc, local.synced)):
                    if head is not None and local.version != local.synced:
                        log.warning("session %s: dropping %d adapts not yet written (another replica moved on)",
                                    key, local.version - local.synced)
                    self._forget(local)
                    local = None
                if local is None and head is not None:
                    self._load(key)
        else:
            for key in keys:
                if key not in self.sessions:
                    self._load(key)

    def _load(self, key: str) -> Optional[Session]:
        stored = self._store_call(self.backend.load, key)
        if stored is None:
            return None
        sess, tensors = self._materialize(key, stored)
        self.sessions[key] = sess
        self._admit_host(sess, tensors)
        if self.metrics is not None:
            self.metrics.restores.labels(from_tier="disk").inc()
        return sess

    def _materialize(self, key: str, stored) -> tuple[Session, dict[str, torch.Tensor]]:
        """Snapshot + the log records that follow it (same incarnation, in version order)."""
        try:
            meta, tensors = self._deserialize(stored.snapshot)
            sess = self._session_from(key, meta, tensors)
            sess.inc = str(meta["incarnation"])
            want = {"W": (len(sess.classes), self.d), "b": (len(sess.classes),),
                    **{k: s(len(sess.classes), self.d) for k, s in sess.rule.state.items()}}
            if {k: tuple(v.shape) for k, v in tensors.items()} != want:
                raise invalid("invalid_snapshot", f"stored tensors do not match the rule {sess.rule.name!r}")
        except ApiError as e:
            raise StoreError(f"session {key}: unreadable snapshot in the store: {e.message}") from None
        now = time.time()
        sess.create_idem = meta.get("create_idempotency")
        sess.idem = {e["key"]: {"fp": e["fp"], "expires": e["expires"], "response": e["response"]}
                     for e in meta.get("idempotency", ()) if e["expires"] > now}
        sess.synced = sess.snap_version = sess.version
        recs = []
        for raw in stored.records:
            inc, rec = Record.decode(raw)
            if inc == sess.inc and rec.version == sess.version + len(recs) + 1:
                recs.append(rec)
        if recs:
            tensors = self._replay(sess, tensors, recs)
        sess.synced = sess.version
        return sess, tensors

    def _replay(self, sess: Session, tensors: dict[str, torch.Tensor], recs: list[Record]) -> dict[str, torch.Tensor]:
        """Apply logged updates to a copy of the head in slot 0 (same device and width as the slot
        tensors). Each call is rebuilt with the shape it had live: zero-initialised stand-in
        sessions in slots 1.. with the row counts the other sessions had, so the kernels take the
        code path they took live and compute this session's rows bit for bit as they did."""
        dev, n, C, d = self.device, len(sess.classes), self.C, self.d
        U = 1 + max((len(o) for r in recs for _, _, o in r.steps), default=0)
        heads = Heads(
            W=torch.zeros(U, C, d, device=dev), b=torch.zeros(U, C, device=dev),
            n_classes=torch.tensor([n] + [1] * (U - 1), dtype=torch.int64, device=dev),
            normalize=torch.tensor([sess.rule.normalize] * U, dtype=torch.bool, device=dev),
            hyper={k: torch.full((U,), float(sess.hyper.get(k, v)), device=dev) for k, v in PER_SLOT_HYPER.items()},
            pools={},
        )
        heads.W[0, :n] = tensors["W"].to(dev)
        heads.b[0, :n] = tensors["b"].to(dev)
        for rule in RULES.values():
            if rule.state:
                heads.pools[rule.name] = {k: torch.zeros((U, *shape(C, d)), device=dev) for k, shape in rule.state.items()}
        pool = heads.pools.get(sess.rule.name, {})
        for k, t in pool.items():
            src = tensors[k]
            t[0][tuple(slice(0, s) for s in src.shape)] = src.to(dev)
        now = time.time()
        for rec in recs:
            for x, y, others in rec.steps:
                slots = [0] * len(y) + [u + 1 for u, c in enumerate(others) for _ in range(c)]
                k = len(slots) - len(y)
                x = torch.cat([x.to(dev), torch.zeros(k, x.shape[1], dtype=x.dtype, device=dev)])
                y = torch.cat([y.to(dev), torch.zeros(k, dtype=y.dtype, device=dev)])
                z = torch.tensor(slots, dtype=torch.int64, device=dev)
                sess.rule.update(heads, x, y, z, z if sess.rule.state else None)
                for u in range(1, U):  # stand-ins start from zero every call
                    heads.W[u].zero_()
                    heads.b[u].zero_()
                    for t in (pl for p in heads.pools.values() for pl in p.values()):
                        t[u].zero_()
            sess.version = rec.version
            sess.seen += rec.n
            sess.correct += rec.correct
            sess.total += rec.labelled
            sess.updated_at = rec.t
            if rec.idem and rec.idem["expires"] > now:
                sess.idem[rec.idem["key"]] = {k: rec.idem[k] for k in ("fp", "expires", "response")}
        while len(sess.idem) > self.idem_max:
            sess.idem.pop(next(iter(sess.idem)))
        out = {"W": heads.W[0, :n].cpu().clone(), "b": heads.b[0, :n].cpu().clone()}
        for k, shape in sess.rule.state.items():
            out[k] = pool[k][0][tuple(slice(0, s) for s in shape(n, d))].cpu().clone()
        return out

    def _admit_host(self, sess: Session, tensors: dict[str, torch.Tensor]) -> None:
        sess.host, sess.tier, sess.slot, sess.state_row = tensors, "host", None, None
        self.host_lru[sess.key] = None
        while len(self.host_lru) > self.settings.max_host_sessions:
            oldest = next((k for k in self.host_lru if k != sess.key), None)
            if oldest is None:
                break
            self._evict_to_disk(self.sessions[oldest])
        self._gauges()

    def _forget(self, sess: Session) -> None:
        """Drop the local copy (the store keeps the session; a later use reloads it)."""
        self._steps.pop(sess.key, None)
        self._pending.pop(sess.key, None)
        if sess.tier != "none":
            if sess.tier == "disk" and self.persistent:
                self.n_disk -= 1
                sess.tier = "none"
            else:
                self._drop_tensors(sess)
        if self.sessions.get(sess.key) is sess:
            del self.sessions[sess.key]
        self._gauges()

    # ---- tiers ----------------------------------------------------------------------------

    def _initial_tensors(self, sess: Session) -> dict[str, torch.Tensor]:
        n, d = len(sess.classes), self.d
        t = {"W": torch.zeros(n, d), "b": torch.zeros(n)}
        if sess.init == "base":
            t["W"], t["b"] = self.base_W.clone(), self.base_b.clone()
        t.update(sess.rule.init_state(n, d, sess.hyper, head=dict(t)))
        return t

    def _place(self, sess: Session, tensors: dict[str, torch.Tensor], pinned) -> None:
        slot = self._free_slot(pinned)
        n = len(sess.classes)
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.W[slot, :n] = tensors["W"].to(self.device)
        self.b[slot, :n] = tensors["b"].to(self.device)
        self.n_classes[slot] = n
        self.normalize[slot] = sess.rule.normalize
        for name, t in self.hyper.items():
            t[slot] = float(sess.hyper.get(name, PER_SLOT_HYPER[name]))
        if sess.rule.state:
            pool = self.pools[sess.rule.name]
            row = pool.alloc()
            for name, t in pool.tensors.items():
                src = tensors[name]
                t[row].zero_()
                t[row][tuple(slice(0, s) for s in src.shape)] = src.to(self.device)
            sess.state_row = row
        sess.slot, sess.tier, sess.host = slot, "device", None
        self._slot_owner[slot] = sess
        self.device_lru[sess.key] = None
        self.device_lru.move_to_end(sess.key)

    def _tensors_of(self, sess: Session) -> dict[str, torch.Tensor]:
        """The session's head and state as CPU tensors (copies), from whichever tier holds it."""
        if sess.tier == "host":
            return {k: v.clone() for k, v in sess.host.items()}
        if sess.tier == "disk":
            return self._read_disk_tier(sess)
        n, slot = len(sess.classes), sess.slot
        out = {"W": self.W[slot, :n].cpu().clone(), "b": self.b[slot, :n].cpu().clone()}
        if sess.rule.state:
            pool = self.pools[sess.rule.name]
            for name, shape in sess.rule.state.items():
                idx = tuple(slice(0, s) for s in shape(n, self.d))
                out[name] = pool.tensors[name][sess.state_row][idx].cpu().clone()
        return out

    def _release_slot(self, sess: Session) -> None:
        slot = sess.slot
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.n_classes[slot] = 0
        self.normalize[slot] = False
        if sess.state_row is not None:
            self.pools[sess.rule.name].release(sess.state_row)
        self.free_slots.append(slot)
        self._slot_owner.pop(slot, None)
        self.device_lru.pop(sess.key, None)
        sess.slot = sess.state_row = None

    def _drop_tensors(self, sess: Session) -> None:
        if sess.tier == "device":
            self._release_slot(sess)
        elif sess.tier == "host":
            self.host_lru.pop(sess.key, None)
            sess.host = None
        elif sess.tier == "disk":
            if not self.persistent:  # the spill copy; with snapshot/wal the store keeps the session
                self._store_call(self.backend.delete, sess.key)
            self.n_disk -= 1
        sess.tier = "none"

    def _free_slot(self, pinned) -> int:
        if not self.free_slots:
            victim = next((i for i in self.device_lru if i not in pinned), None)
            if victim is None:
                raise ApiError(503, "overloaded", "no device slot is free")
            self._evict_to_host(self.sessions[victim])
        return self.free_slots.pop()

    def _evict_to_host(self, sess: Session) -> None:
        tensors = self._tensors_of(sess)
        self._release_slot(sess)
        sess.host, sess.tier = tensors, "host"
        self.host_lru[sess.key] = None
        self._count_eviction("host")
        while len(self.host_lru) > self.settings.max_host_sessions:
            oldest = next(iter(self.host_lru))
            self._evict_to_disk(self.sessions[oldest])

    def _evict_to_disk(self, sess: Session) -> None:
        if self.persistent:
            if not self._write_snapshot(sess):  # stale: forgotten
                return
        else:
            self._store_call(self.backend.put, sess.key, sess.inc, sess.version, self._serialize(sess, sess.host, True))
        self.host_lru.pop(sess.key)
        sess.host, sess.tier = None, "disk"
        self.n_disk += 1
        self._count_eviction("disk")

    def _to_device(self, sess: Session, pinned) -> None:
        if sess.tier == "device":
            self.device_lru.move_to_end(sess.key)
            return
        came_from = sess.tier
        tensors = self._tensors_of(sess)
        self._drop_tensors(sess)
        self._place(sess, tensors, pinned)
        if self.metrics is not None:
            self.metrics.restores.labels(from_tier=came_from).inc()
        self._gauges()

    def _read_disk_tier(self, sess: Session) -> dict[str, torch.Tensor]:
        stored = self._store_call(self.backend.load, sess.key)
        if stored is None:
            raise store_unavailable(f"session {sess.key} is missing from the store")
        if not self.persistent:
            return self._deserialize(stored.snapshot)[1]
        try:
            fresh, tensors = self._materialize(sess.key, stored)
        except StoreError as e:
            raise store_unavailable(e) from None
        if (fresh.inc, fresh.version) != (sess.inc, sess.version):
            log.warning("session %s: the store holds version %d, this replica had %d; using the store's",
                        sess.key, fresh.version, sess.version)
            for attr in ("inc", "version", "seen", "correct", "total", "updated_at", "synced", "snap_version",
                         "idem", "create_idem"):
                setattr(sess, attr, getattr(fresh, attr))
        return tensors

    def _count_eviction(self, to_tier: str) -> None:
        if self.metrics is not None:
            self.metrics.evictions.labels(to_tier=to_tier).inc()
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            for tier, n in self.counts().items():
                self.metrics.sessions.labels(tier=tier).set(n)

    # ---- validation and (de)serialisation ----------------------------------------------------

    def _check_classes(self, classes) -> list[str]:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise invalid("invalid_classes", "classes must be a list of strings")
        if not 1 <= len(classes) <= self.C:
            raise invalid("invalid_classes", f"a head needs 1..{self.C} classes, got {len(classes)}")
        if any(not c or len(c) > MAX_LABEL_LEN for c in classes):
            raise invalid("invalid_classes", f"class names must be 1..{MAX_LABEL_LEN} characters")
        if len(set(classes)) != len(classes):
            raise invalid("invalid_classes", "class names must be unique")
        return list(classes)

    def _check_tensors(self, sess: Session, tensors: dict[str, torch.Tensor]) -> None:
        n, d = len(sess.classes), self.d
        want = {"W": (n, d), "b": (n,), **{k: s(n, d) for k, s in sess.rule.state.items()}}
        if set(tensors) != set(want):
            raise invalid("invalid_snapshot", f"snapshot tensors {sorted(tensors)} != expected {sorted(want)}")
        for k, shape in want.items():
            t = tensors[k]
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                raise invalid("invalid_snapshot", f"tensor {k} must be float32 {list(shape)}, "
                              f"got {t.dtype} {list(t.shape)} (backbone embed_dim is {d})")
            bad = ~torch.isfinite(t) if k not in sess.rule.inf_state else t.isnan() | (t == -math.inf)
            if bad.any():
                raise invalid("invalid_snapshot", f"tensor {k} has NaN or Inf")

    def _serialize(self, sess: Session, tensors: dict[str, torch.Tensor], internal: bool = False) -> bytes:
        """An export; `internal` (store snapshots) adds the key, incarnation and idempotency entries."""
        meta = {"format": EXPORT_FORMAT, "backbone": self.backbone_name, "embed_dim": self.d, **sess.meta()}
        if internal:
            now = time.time()
            meta.update(key=sess.key, incarnation=sess.inc, create_idempotency=sess.create_idem,
                        idempotency=[{"key": k, **e} for k, e in sess.idem.items() if e["expires"] > now])
        return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fwserve": json.dumps(meta)})

    def _deserialize(self, data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            meta = json.loads(header["__metadata__"]["fwserve"])
        except Exception:
            raise invalid("invalid_snapshot", "body is not a fwserve session export (safetensors)") from None
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            raise invalid("invalid_snapshot", f"snapshot format must be {EXPORT_FORMAT!r}")
        if meta.get("backbone") != self.backbone_name:
            raise invalid("invalid_snapshot", f"snapshot was made on backbone {meta.get('backbone')!r}; "
                          f"this server serves {self.backbone_name!r}")
        if meta.get("embed_dim") != self.d:
            raise invalid("invalid_snapshot", f"snapshot embed_dim {meta.get('embed_dim')} != backbone's {self.d}")
        for key, typ in (("rule", str), ("classes", list), ("hyperparameters", dict)):
            if not isinstance(meta.get(key), typ):
                raise invalid("invalid_snapshot", f"snapshot metadata lacks {key!r}")
        return meta, tensors

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
"""

from __future__ import annotations

import hashlib
import math
import json
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

from server.errors import ApiError, conflict, invalid, session_not_found
from server.rules import PER_SLOT_HYPER, RULES, Heads, Rule, get_rule

EXPORT_FORMAT = "fwserve-session/1"
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

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.classes)}

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


class SessionStore:
    def __init__(self, settings, embed_dim: int, base_W: torch.Tensor, base_b: torch.Tensor,
                 base_classes: list[str], device, backbone_name: str, metrics=None) -> None:
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
               session_id: Optional[str] = None) -> Session:
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
                session_id = uuid.uuid4().hex
            if session_id in self.sessions:
                raise conflict("session_exists", f"session {session_id!r} already exists")
            if len(self.sessions) >= self.settings.max_sessions:
                raise conflict("session_limit", f"the server holds its maximum of {len(self.sessions)} sessions")
            sess = Session(session_id, rule, hyper, classes, init)
            self._place(sess, self._initial_tensors(sess), pinned=())
            self.sessions[session_id] = sess
            self._gauges()
            return sess

    def get(self, session_id: str) -> Session:
        with self.lock:
            sess = self.sessions.get(session_id)
            if sess is None:
                raise session_not_found(session_id)
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
            self._place(sess, self._initial_tensors(sess), pinned=())
            self._gauges()
            return sess

    def delete(self, session_id: str) -> None:
        with self.lock:
            sess = self.get(session_id)
            self._drop_tensors(sess)
            del self.sessions[session_id]
            self._gauges()

    def export(self, session_id: str) -> bytes:
        with self.lock:
            sess = self.get(session_id)
            return self._serialize(sess, self._tensors_of(sess))

    def import_(self, session_id: str, data: bytes) -> tuple[Session, bool]:
        """Create or replace `session_id` from an export; returns (session, created)."""
        meta, tensors = self._deserialize(data)
        sess = Session(session_id, get_rule(meta["rule"]), {}, self._check_classes(meta["classes"]),
                       str(meta.get("init", "zeros")))
        sess.hyper = sess.rule.validate(meta["hyperparameters"])
        for attr, key in (("version", "version"), ("seen", "examples_seen"),
                          ("correct", "prequential_correct"), ("total", "prequential_total")):
            v = meta.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise invalid("invalid_snapshot", f"metadata {key} must be a non-negative integer")
            setattr(sess, attr, v)
        self._check_tensors(sess, tensors)
        now = time.time()
        created = meta.get("created_at", now)
        sess.created_at = float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else now
        sess.updated_at = now
        with self.lock:
            old = self.sessions.get(session_id)
            if old is None and len(self.sessions) >= self.settings.max_sessions:
                raise conflict("session_limit", f"the server holds its maximum of {len(self.sessions)} sessions")
            if old is not None:
                self._drop_tensors(old)
            self.sessions[session_id] = sess
            self._place(sess, tensors, pinned=())
            self._gauges()
            return sess, old is None

    # ---- batch worker API -----------------------------------------------------------------

    def acquire(self, ids: Iterable[str]) -> tuple[dict[str, Session], set[str]]:
        """Bring these sessions to the device together (none evicts another); -> (found, missing)."""
        with self.lock:
            ids = list(dict.fromkeys(ids))
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
            return sess.version

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"device": len(self.device_lru), "host": len(self.host_lru), "disk": self.n_disk}

    def close(self) -> None:
        """Remove this store's disk snapshots (sessions do not outlive the process)."""
        with self.lock:
            for sess in list(self.sessions.values()):
                if sess.tier == "disk":
                    (self.snapshot_dir / snapshot_name(sess.id)).unlink(missing_ok=True)

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
        self.device_lru[sess.id] = None
        self.device_lru.move_to_end(sess.id)

    def _tensors_of(self, sess: Session) -> dict[str, torch.Tensor]:
        """The session's head and state as CPU tensors (copies), from whichever tier holds it."""
        if sess.tier == "host":
            return {k: v.clone() for k, v in sess.host.items()}
        if sess.tier == "disk":
            return self._deserialize((self.snapshot_dir / snapshot_name(sess.id)).read_bytes())[1]
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
        self.device_lru.pop(sess.id, None)
        sess.slot = sess.state_row = None

    def _drop_tensors(self, sess: Session) -> None:
        if sess.tier == "device":
            self._release_slot(sess)
        elif sess.tier == "host":
            self.host_lru.pop(sess.id, None)
            sess.host = None
        else:
            (self.snapshot_dir / snapshot_name(sess.id)).unlink(missing_ok=True)
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
        self.host_lru[sess.id] = None
        self._count_eviction("host")
        while len(self.host_lru) > self.settings.max_host_sessions:
            oldest = next(iter(self.host_lru))
            self._evict_to_disk(self.sessions[oldest])

    def _evict_to_disk(self, sess: Session) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = self.snapshot_dir / snapshot_name(sess.id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self._serialize(sess, sess.host))
        tmp.replace(path)
        self.host_lru.pop(sess.id)
        sess.host, sess.tier = None, "disk"
        self.n_disk += 1
        self._count_eviction("disk")

    def _to_device(self, sess: Session, pinned) -> None:
        if sess.tier == "device":
            self.device_lru.move_to_end(sess.id)
            return
        came_from = sess.tier
        tensors = self._tensors_of(sess)
        self._drop_tensors(sess)
        self._place(sess, tensors, pinned)
        if self.metrics is not None:
            self.metrics.restores.labels(from_tier=came_from).inc()
        self._gauges()

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

    def _serialize(self, sess: Session, tensors: dict[str, torch.Tensor]) -> bytes:
        meta = {"format": EXPORT_FORMAT, "backbone": self.backbone_name, "embed_dim": self.d, **sess.meta()}
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

"""A session: a client's adaptable head, its rule, classes, version and statistics.

``Session`` holds the domain fields only. Where its tensors live (tier, slot, host copy), what
the store has of it (synced and snapshot versions), its idempotency records, its history and
its guard's running state are kept beside it by the store in a ``Held`` entry, so that nothing
outside the sessions package sees them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch

from server.errors import invalid
from server.keys import split_key
from server.rules import Rule, get_rule
from server.sessions.guard import Watch
from server.sessions.history import History, Retention
from server.sessions.idempotency import IdempotencyRecords

MAX_LABEL_LEN = 128
MAX_COUNT = 2**53 - 1  # versions and counts stay exact in JSON numbers and Lua scripts
MAX_CLOCK_SKEW_S = 86400.0


@dataclass
class Session:
    key: str  # store key: id, or tenant/id
    rule: Rule
    hyper: dict[str, float]
    classes: list[str]
    init: str = "zeros"
    version: int = 0
    seen: int = 0
    correct: int = 0
    total: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    inc: str = ""  # incarnation: new at create and at an import that starts the session afresh
    frozen: bool = False  # adapts refused (a guard froze it, or PATCH did)
    guard: Optional[dict] = None  # the guard's settings (server/sessions/guard.py), None: no guard

    @property
    def id(self) -> str:
        return split_key(self.key)[1]

    @property
    def tenant(self) -> Optional[str]:
        return split_key(self.key)[0]

    @cached_property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def label_index(self, label) -> int:
        """A label (class name or index) -> its class index, or InvalidInput."""
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < len(self.classes):
                return label
            raise invalid("unknown_label", f"label index {label} is outside 0..{len(self.classes) - 1}")
        try:
            return self.index[label]
        except (KeyError, TypeError):
            shown = ", ".join(repr(c) for c in self.classes[:20])
            raise invalid("unknown_label", f"unknown label {label!r}; classes: {shown}") from None

    def book(self, n_examples: int, correct: int, labelled: int, t: float) -> int:
        """One applied adapt: version + 1 and the statistics; returns the new version."""
        self.version += 1
        self.seen += n_examples
        self.correct += correct
        self.total += labelled
        self.updated_at = t
        return self.version

    def meta(self) -> dict:
        """The metadata an export carries."""
        return {
            "id": self.id, "rule": self.rule.name, "hyperparameters": self.hyper, "classes": self.classes,
            "init": self.init, "version": self.version, "examples_seen": self.seen,
            "prequential_correct": self.correct, "prequential_total": self.total,
            "created_at": self.created_at, "updated_at": self.updated_at, "frozen": self.frozen, "guard": self.guard,
        }

    def info(self, tier: str) -> "SessionInfo":
        return SessionInfo(
            id=self.id, rule=self.rule.name, hyperparameters=dict(self.hyper), classes=list(self.classes),
            init=self.init, version=self.version, examples_seen=self.seen,
            prequential={"correct": self.correct, "total": self.total,
                         "accuracy": self.correct / self.total if self.total else None},
            tier=tier, created_at=self.created_at, updated_at=self.updated_at, frozen=self.frozen,
            guard=dict(self.guard) if self.guard else None,
        )

    @classmethod
    def from_meta(cls, key: str, meta: dict, max_classes: int) -> "Session":
        """A session from export/snapshot metadata, validated (InvalidInput otherwise)."""
        for name, typ in (("rule", str), ("classes", list), ("hyperparameters", dict)):
            if not isinstance(meta.get(name), typ):
                raise invalid("invalid_snapshot", f"snapshot metadata lacks {name!r}")
        rule = get_rule(meta["rule"])
        sess = cls(key, rule, rule.validate(meta["hyperparameters"]), check_classes(meta["classes"], max_classes),
                   str(meta.get("init", "zeros")))
        for attr, name in (("version", "version"), ("seen", "examples_seen"),
                           ("correct", "prequential_correct"), ("total", "prequential_total")):
            v = meta.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
                raise invalid("invalid_snapshot", f"metadata {name} must be an integer in 0..2**53 - 1")
            setattr(sess, attr, v)
        if sess.correct > sess.total:
            raise invalid("invalid_snapshot", "metadata prequential_correct exceeds prequential_total")
        sess.frozen = meta.get("frozen") is True
        guard = meta.get("guard")
        if guard is not None and not isinstance(guard, dict):
            raise invalid("invalid_snapshot", "metadata guard must be an object")
        sess.guard = guard
        now = time.time()
        for attr in ("created_at", "updated_at"):
            t = meta.get(attr, now)
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= now + MAX_CLOCK_SKEW_S:
                raise invalid("invalid_snapshot", f"metadata {attr} must be a time in seconds since 1970, not in "
                              "the future")
            setattr(sess, attr, float(t))
        return sess

    def check_tensors(self, tensors: dict[str, torch.Tensor], d: int) -> None:
        """Tensors of an export for this session's rule and classes, finite where they must be."""
        n = len(self.classes)
        want = {"W": (n, d), "b": (n,), **self.rule.state_shapes(n, d)}
        if set(tensors) != set(want):
            raise invalid("invalid_snapshot", f"snapshot tensors {sorted(tensors)} != expected {sorted(want)}")
        for k, shape in want.items():
            t = tensors[k]
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                raise invalid("invalid_snapshot", f"tensor {k} must be float32 {list(shape)}, "
                              f"got {t.dtype} {list(t.shape)} (backbone embed_dim is {d})")
            bad = ~torch.isfinite(t) if k not in self.rule.inf_state else t.isnan() | (t == -math.inf)
            if bad.any():
                raise invalid("invalid_snapshot", f"tensor {k} has NaN or Inf")


def check_classes(classes, max_classes: int) -> list[str]:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise invalid("invalid_classes", "classes must be a list of strings")
    if not 1 <= len(classes) <= max_classes:
        raise invalid("invalid_classes", f"a head needs 1..{max_classes} classes, got {len(classes)}")
    if any(not c or len(c) > MAX_LABEL_LEN for c in classes):
        raise invalid("invalid_classes", f"class names must be 1..{MAX_LABEL_LEN} characters")
    if len(set(classes)) != len(classes):
        raise invalid("invalid_classes", "class names must be unique")
    return list(classes)


@dataclass
class SessionInfo:
    """What a client may see of a session (plain data)."""

    id: str
    rule: str
    hyperparameters: dict
    classes: list[str]
    init: str
    version: int
    examples_seen: int
    prequential: dict
    tier: str
    created_at: float
    updated_at: float
    frozen: bool = False
    guard: Optional[dict] = None


@dataclass
class Held:
    """A session this process holds, with its placement, sync state and idempotency records."""

    session: Session
    tier: str = "none"  # device | host | disk | none (dropped)
    width: Optional[int] = None  # device tier: its pool's width (server/sessions/slots.py)
    slot: Optional[int] = None
    state_row: Optional[int] = None
    host: Optional[dict[str, torch.Tensor]] = None  # CPU copies while on the host tier
    synced: int = 0  # version the store holds (wal: == version once flushed)
    snap_version: int = 0  # version of the store's snapshot (wal: the log holds the rest)
    log_bytes: int = 0  # wal: bytes of its log records after the snapshot
    used_at: float = field(default_factory=time.time)  # last request on it (idle expiry)
    use_stored_at: float = 0.0  # when its last use was written to a shared store
    idem: IdempotencyRecords = field(default_factory=IdempotencyRecords)
    history: History = field(default_factory=lambda: History(Retention()))
    watch: Optional[Watch] = None  # the guard's running state (a guarded session)

    @property
    def key(self) -> str:
        return self.session.key

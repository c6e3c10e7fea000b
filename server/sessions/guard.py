"""Guards: a session's watch over what it learns, with an action when it learns harm.

A guard is set at creation (``"guard": {...}`` in POST /v1/sessions) or later (PATCH). Its
settings (``parse``; only ``action`` is required):

    action          rollback | freeze | alert
    margin          0.1    accuracy (a fraction) the session may fall below the reference
    window          64     labelled examples (and, label-free, unlabelled predictions) compared
    reference       "base" (the backbone's head; sessions with the base classes, the default
                    for them) or a version of the session, pinned (default for other sessions:
                    the version current when the guard is set); its head is kept with the guard
    collapse_share  0.5    label-free: the share of the rows its top class takes, at least, to count
                           as a collapse (and `margin` more of them than the reference gives it)
    entropy_drift   0.5    label-free: |mean normalised entropy, session - reference| (null: off)
    feature_drift   null   label-free: shift of the window's mean feature, in units of the
                           spread of the first window's features (null: off)
    label_conflict  null   labelled: the share of the window's labels the reference predicts
                           otherwise, at least (null: off). It sees a burst of wrong labels while
                           it lasts; set it well above the reference's own error rate (a stream
                           that really moved away from the reference trips it too)
    max_examples    null   examples per adapt request
    max_step_norm   null   norm of one request's head change (W and b, Frobenius), measured from
                           the transaction's copies before the update
    max_window_norm null   sum of those norms over the last `window` examples offered
    max_lr          null   ceiling on the rule's step size (lr, beta), checked when set

Labelled adapts: for each labelled example the session's prediction before the update and the
reference's prediction (shadow predictions: one grouped head_forward over the reference heads per
round, server/sessions/references.py) are both scored against the label. Over a full window, a
session more than `margin` below the reference trips the guard. Label-free rows: the class the
session predicts most takes at least `collapse_share` of the rows and `margin` more of them than
the reference gives that class on the same rows (a head collapsing, not a stream of one class),
or the entropy or feature drift exceeds its bound. With `label_conflict` set, labelled examples
also trip it when too many of their labels contradict the reference's predictions; its rollback
goes to the newest version from before the first contradicted label in the window.

Actions: ``alert`` logs and counts; ``freeze`` stops adapts (409 session_frozen until PATCH
unfreezes); ``rollback`` makes the last version that was above the reference current again, as a
new version. Which version that was is judged on the window's evidence: each retained version is
scored on the window's labelled examples that came after it (it never learned from their labels)
and the newest one scoring at least as well as the reference there is the target; label-free, on
all the window's rows (adapting on a row only makes a version look more skewed), the newest one
no more concentrated on one class than the reference (by `margin`) and without entropy drift.
With none, the guard freezes instead. The window starts afresh after every
trip. The tent rule's own collapse reset (back to the initial head, in its kernel) is the
default guard of tent sessions and reported as a trip (action ``reset``); a tent session created
with a guard leaves collapse to the guard.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from server.errors import DomainError, InvalidInput, conflict, invalid

ACTIONS = ("rollback", "freeze", "alert")
DEFAULTS = {"margin": 0.1, "window": 64, "collapse_share": 0.5, "entropy_drift": 0.5, "feature_drift": None,
            "label_conflict": None,
            "max_examples": None, "max_step_norm": None, "max_window_norm": None, "max_lr": None}
STEP_SIZES = ("lr", "beta")  # hyper-parameters max_lr bounds
MAX_WINDOW = 4096
LABELLED_TRIGGERS = ("accuracy", "label_conflict")
_tokens = itertools.count(1)


def _bad(message: str) -> InvalidInput:
    return invalid("invalid_guard", message)


def _number(spec: dict, name: str, low: float, high: float, optional: bool, integer: bool = False,
            low_open: bool = False):
    v = spec.get(name, DEFAULTS[name])
    if v is None:
        if optional:
            return None
        raise _bad(f"guard.{name} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise _bad(f"guard.{name} must be {'an integer' if integer else 'a number'}")
    v = int(v) if integer else float(v)
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
        raise _bad(f"guard.{name}={v} is outside {'(' if low_open else '['}{low:g}, {high:g}]")
    return v


def parse(spec, *, classes: list[str], base_classes: list[str], version: int, hyper: dict[str, float]) -> dict:
    """Guard settings from a request, validated and with defaults filled in (InvalidInput
    ``invalid_guard``). `version`: the session's current version (the default pinned reference)."""
    if not isinstance(spec, dict):
        raise _bad("guard must be an object")
    unknown = sorted(set(spec) - {"action", "reference", *DEFAULTS})
    if unknown:
        raise _bad(f"unknown guard settings {unknown}; known: action, reference, {', '.join(DEFAULTS)}")
    action = spec.get("action")
    if action not in ACTIONS:
        raise _bad(f"guard.action must be one of {', '.join(ACTIONS)}")
    out = {"action": action,
           "margin": _number(spec, "margin", 0.0, 1.0, False),
           "window": _number(spec, "window", 8, MAX_WINDOW, False, integer=True),
           "collapse_share": _number(spec, "collapse_share", 0.0, 1.0, False, low_open=True),
           "entropy_drift": _number(spec, "entropy_drift", 0.0, 1.0, True, low_open=True),
           "feature_drift": _number(spec, "feature_drift", 0.0, 1e6, True, low_open=True),
           "label_conflict": _number(spec, "label_conflict", 0.0, 1.0, True, low_open=True),
           "max_examples": _number(spec, "max_examples", 1, 1e9, True, integer=True),
           "max_step_norm": _number(spec, "max_step_norm", 0.0, 1e12, True, low_open=True),
           "max_window_norm": _number(spec, "max_window_norm", 0.0, 1e12, True, low_open=True),
           "max_lr": _number(spec, "max_lr", 0.0, 1e6, True, low_open=True)}
    ref = spec.get("reference", "base" if list(classes) == list(base_classes) else version)
    if ref == "base":
        if list(classes) != list(base_classes):
            raise _bad("guard.reference 'base' needs the session's classes to be the backbone's "
                       f"({base_classes}); pin a version of the session instead")
    elif isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref <= version:
        raise _bad(f"guard.reference must be 'base' or a version of the session (0..{version})")
    out["reference"] = ref
    if out["max_lr"] is not None:
        for name in STEP_SIZES:
            if name in hyper and hyper[name] > out["max_lr"]:
                raise _bad(f"the session's {name}={hyper[name]:g} exceeds guard.max_lr={out['max_lr']:g}")
    return out


def frozen_error(session_id: str) -> DomainError:
    return conflict("session_frozen", f"session {session_id!r} is frozen by its guard (or by PATCH): adapts are "
                    "refused until PATCH /v1/sessions/{id} with {\"frozen\": false}")


def too_large(session_id: str, message: str) -> InvalidInput:
    return invalid("update_too_large", f"session {session_id!r}: {message}; nothing was applied")


def normalised_entropy(probs: torch.Tensor, n: int) -> torch.Tensor:
    p = probs[:, :n].float()
    H = -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum(1)
    return H / math.log(max(n, 2))


@dataclass
class Row:
    """One example of the window: the version its adapt made, its features, label (-1: none),
    and the session's and the reference's predictions before the update."""

    version: int
    x: torch.Tensor
    y: int
    s_pred: int
    r_pred: int
    s_ent: float
    r_ent: float

    @property
    def conflicts(self) -> bool:
        """A label the reference predicts otherwise."""
        return self.y >= 0 and self.r_pred != self.y


class Window:
    """The last `size` rows of one kind, with running sums: a trigger is O(classes) per commit."""

    def __init__(self, size: int, n: int, track_x: bool = False) -> None:
        self.size, self.rows, self.track_x = size, deque(), track_x
        self.s_ok = self.r_ok = self.conflicts = 0
        self.s_count, self.r_count = [0] * n, [0] * n
        self.s_ent = self.r_ent = 0.0
        self.x_sum: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.size

    def push(self, row: Row) -> None:
        self._add(row, 1)
        self.rows.append(row)
        if len(self.rows) > self.size:
            self._add(self.rows.popleft(), -1)

    def _add(self, q: Row, sign: int) -> None:
        self.s_ok += sign * (q.s_pred == q.y)
        self.r_ok += sign * (q.r_pred == q.y)
        self.conflicts += sign * q.conflicts
        self.s_count[q.s_pred] += sign
        self.r_count[q.r_pred] += sign
        self.s_ent += sign * q.s_ent
        self.r_ent += sign * q.r_ent
        if self.track_x:
            x = q.x.float()
            self.x_sum = sign * x if self.x_sum is None else self.x_sum + sign * x

    def clear(self) -> None:
        self.__init__(self.size, len(self.s_count), self.track_x)


class Watch:
    """A guarded session's running state (in memory: a restart starts the window afresh)."""

    def __init__(self, cfg: dict, n_classes: int, ref: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.cfg, self.n = cfg, n_classes
        self.ref = ref  # pinned reference: {"W", "b"} (CPU); None: the base head
        self.token = next(_tokens)  # names this reference's content (the reference pool's rows)
        w = cfg["window"]
        self.labelled = Window(w, n_classes)
        self.unlabelled = Window(w, n_classes, track_x=cfg["feature_drift"] is not None)
        self.norms: deque[tuple[int, float]] = deque()  # (examples, norm) of recent requests
        self.baseline: Optional[tuple[torch.Tensor, float]] = None  # feature mean, total variance

    # ---- limits -----------------------------------------------------------------------------

    def admit(self, session_id: str, n: int) -> Optional[DomainError]:
        cap = self.cfg["max_examples"]
        if cap is not None and n > cap:
            return too_large(session_id, f"{n} examples in one adapt; its guard allows {cap}")
        return None

    @property
    def measures_steps(self) -> bool:
        return self.cfg["max_step_norm"] is not None or self.cfg["max_window_norm"] is not None

    def check_step(self, session_id: str, n: int, norm: float) -> Optional[DomainError]:
        """A head change of `norm` by a request of n examples; refused ones still move the window."""
        step, budget = self.cfg["max_step_norm"], self.cfg["max_window_norm"]
        err = None
        if step is not None and norm > step:
            err = too_large(session_id, f"this update would move the head by {norm:.4g}; its guard allows "
                            f"{step:g} per request")
        elif budget is not None and self._window_norm() + norm > budget:
            err = too_large(session_id, f"this update would move the head by {norm:.4g}, beyond its guard's budget of "
                            f"{budget:g} over the last {self.cfg['window']} examples ({self._window_norm():.4g} used)")
        self._push_norm(n, 0.0 if err else norm)
        return err

    def _window_norm(self) -> float:
        return sum(v for _, v in self.norms)

    def _push_norm(self, n: int, norm: float) -> None:
        self.norms.append((n, norm))
        while sum(k for k, _ in self.norms) - self.norms[0][0] >= self.cfg["window"]:
            self.norms.popleft()

    # ---- evidence and triggers ----------------------------------------------------------------

    def observe(self, version: int, x: torch.Tensor, y: list[int], s_probs: torch.Tensor,
                r_probs: torch.Tensor) -> Optional[str]:
        """One committed update's rows -> the trigger that fires now, or None."""
        n = self.n
        s_pred, r_pred = s_probs[:, :n].argmax(1).tolist(), r_probs[:, :n].argmax(1).tolist()
        s_ent, r_ent = normalised_entropy(s_probs, n).tolist(), normalised_entropy(r_probs, n).tolist()
        for i, lab in enumerate(y):
            row = Row(version, x[i], int(lab), s_pred[i], r_pred[i], s_ent[i], r_ent[i])
            (self.labelled if lab >= 0 else self.unlabelled).push(row)
        return self.trigger()

    def trigger(self) -> Optional[str]:
        c, lab, free = self.cfg, self.labelled, self.unlabelled
        if lab.full and (lab.s_ok - lab.r_ok) / lab.size < -c["margin"]:
            return "accuracy"
        if c["label_conflict"] is not None and lab.full and lab.conflicts / lab.size >= c["label_conflict"]:
            return "label_conflict"
        if not free.full:
            return None
        w = free.size
        top = max(range(self.n), key=free.s_count.__getitem__)
        share = free.s_count[top] / w
        if share >= c["collapse_share"] and share - free.r_count[top] / w >= c["margin"]:
            return "collapse"
        if c["entropy_drift"] is not None and abs(free.s_ent - free.r_ent) / w >= c["entropy_drift"]:
            return "entropy"
        if c["feature_drift"] is not None:
            if self.baseline is None:
                x = torch.stack([q.x.float() for q in free.rows])
                self.baseline = (x.mean(0), float(x.var(0, unbiased=False).sum()))
            else:
                mu, var = self.baseline
                if float((free.x_sum / w - mu).norm()) / math.sqrt(max(var, 1e-12)) >= c["feature_drift"]:
                    return "feature_drift"
        return None

    def rearm(self) -> None:
        self.labelled.clear()
        self.unlabelled.clear()
        self.baseline = None

    # ---- judging versions ---------------------------------------------------------------------

    def evidence(self, trigger: str) -> list[Row]:
        return list((self.labelled if trigger in LABELLED_TRIGGERS else self.unlabelled).rows)

    @property
    def min_evidence(self) -> int:
        return max(4, self.cfg["window"] // 2)

    def judge(self, trigger: str, rows: list[Row], probs: torch.Tensor) -> bool:
        """Was a version (its predictions `probs` on `rows`, all applied after it) above the reference?"""
        if trigger == "label_conflict":  # any version from before the conflicting labels (the caller's limit)
            return True
        pred = probs[:, :self.n].argmax(1).tolist()
        if trigger == "accuracy":
            mine = sum(p == q.y for p, q in zip(pred, rows)) / len(rows)
            return mine >= sum(q.r_pred == q.y for q in rows) / len(rows)
        # label-free: no more concentrated on one class than the reference on the same rows (within
        # the margin), and no entropy drift from it
        if _excess(rows, pred)[1] >= self.cfg["margin"]:
            return False
        if self.cfg["entropy_drift"] is not None:
            ent = normalised_entropy(probs, self.n).tolist()
            if _entropy_gap(rows, ent) >= self.cfg["entropy_drift"]:
                return False
        return True


def _top(preds: list[int]) -> tuple[int, float]:
    """The most predicted class and its share."""
    counts: dict[int, int] = {}
    for p in preds:
        counts[p] = counts.get(p, 0) + 1
    c = max(counts, key=counts.get)
    return c, counts[c] / len(preds)


def _excess(rows: list[Row], preds: list[int]) -> tuple[float, float]:
    """(share of the session's top class, how much more of the rows the session gives that class
    than the reference does)."""
    c, share = _top(preds)
    return share, share - sum(q.r_pred == c for q in rows) / len(rows)


def _entropy_gap(rows: list[Row], ent: list[float]) -> float:
    return abs(sum(ent) / len(ent) - sum(q.r_ent for q in rows) / len(rows))

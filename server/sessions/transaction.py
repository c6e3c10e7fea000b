"""One micro-batch's session work as one explicit transaction.

    with store.batch(keys) as txn:          # the store's lock; the sessions brought to device slots
        txn.found, txn.missing              # key -> Session; keys that do not exist
        txn.unavailable                     # key -> why it cannot be served now (the store failed for it)
        w = txn.width(key)                  # the pool of its head (txn.base_width for the base head)
        logits = txn.forward(x, slots, w)   # grouped head forward over txn.slot(key) / txn.base_slot
        failed = txn.apply(rule, x, y, slots, rows, w)   # one grouped update; key -> why it was undone
        version = txn.commit(key, ...)      # one applied adapt booked: version + 1
        txn.remember(key, idem, response)   # its Idempotency-Key answer
    txn.errors                              # after exit: key -> why its adapts were not made durable

Guarded sessions (server/sessions/guard.py): ``txn.admit`` refuses adapts of a frozen session or
beyond the guard's size limit; ``txn.reference_probs`` makes the round's shadow predictions (one
grouped head_forward over the reference heads); ``txn.observe`` hands the guard an update's
evidence, which ``commit`` weighs: a trip acts at once (freeze, or rollback: a new version in
this transaction, logged as a state record after the adapt's record), and ``txn.guard_outcome``
says what it did. ``apply`` measures each guarded session's head change from the copies and puts
back an update beyond the guard's norm limits (``update_too_large``).

Failures stay with the sessions they belong to. A session the store cannot load is unavailable
and the rest are served. Before every update the touched heads and state rows are copied; if the
kernel call raises, every session of the call is put back (and reported failed), and after it any
session whose head or state became non-finite is put back alone (``diverged``): an update that
was not applied is never logged. On a clean exit the transaction appends every committed adapt
to the write-ahead log (wal mode: one backend call, fsync or AOF) before the caller acknowledges
anything; a session whose append failed is dropped from memory (the store keeps its last durable
state) and listed in ``errors``. On an exception it aborts: every session it changed goes back to
how it was before the transaction, then the exception propagates. Management calls (create,
reset, ...) wait for the lock, so they never interleave with an update.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

import kernels

from server.errors import DomainError, diverged, internal
from server.rules import Heads, Rule
from server.sessions import guard as guards
from server.sessions.codec import Record
from server.sessions.idempotency import Idem
from server.sessions.session import Held, Session
from server.sessions.wal import WalBuffer

log = logging.getLogger("fwserve.store")


@dataclass
class _Copy:
    """The touched sessions' heads and state rows before one update call (on the device)."""

    width: int
    keys: list[str]
    slots: torch.Tensor  # [U]
    W: torch.Tensor  # [U, C, d]
    b: torch.Tensor  # [U, C]
    rows: Optional[torch.Tensor]  # [U] state rows (rules with state)
    state: dict[str, torch.Tensor]  # name -> [U, ...]


class Transaction:
    def __init__(self, store, keys) -> None:
        self._store = store
        self._keys = list(dict.fromkeys(k for k in keys if k))
        self._held: dict[str, Held] = {}
        self._owner: dict[int, dict[int, str]] = {}  # width -> slot -> key
        self._wal = WalBuffer(store.fingerprint, keep_steps=store.durability == "wal" or store.retention.versions > 1)
        self._before: dict[str, tuple] = {}  # key -> (rule, copy, index, counters, idem keys): the state at entry
        self.found: dict[str, Session] = {}
        self.missing: set[str] = set()
        self.unavailable: dict[str, DomainError] = {}
        self.errors: dict[str, DomainError] = {}
        self._keyed: list[tuple[str, Idem]] = []  # keyed adapts remembered here
        self._evidence: dict[str, tuple] = {}  # key -> the guard's evidence of its next commit
        self._outcomes: dict[str, dict] = {}  # key -> what its guard did in this transaction
        self._trips: list[tuple[str, str, str]] = []  # (key, action, trigger)
        self._rule_resets: set[str] = set()  # sessions the rule's own safeguard reset, not yet committed

    def __enter__(self) -> "Transaction":
        self._store.lock.acquire()
        try:
            self._held, self.unavailable = self._store._acquire(self._keys)
        except BaseException:
            self._store.lock.release()
            raise
        for k, h in self._held.items():
            self._owner.setdefault(h.width, {})[h.slot] = k
        self.found = {k: h.session for k, h in self._held.items()}
        self.missing = set(self._keys) - set(self.found) - set(self.unavailable)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.errors = self._store._flush(self._wal)
                self._store._keep_history(self._wal, self.errors)
                self._store._record_claims([(k, i) for k, i in self._keyed if k not in self.errors])
                for key, action, trigger in self._trips:
                    if key not in self.errors:
                        self._store._guard_tripped(self.found[key], action, trigger)
            else:
                self._restore_entry_state()
        finally:
            self._store.lock.release()
        return False

    # ---- views ------------------------------------------------------------------------------

    def heads(self, width: int) -> Heads:
        return self._store.pool.heads(width)

    @property
    def base_slot(self) -> int:
        return self._store.pool.base_slot

    @property
    def base_width(self) -> int:
        return self._store.pool.base_width

    @property
    def base_classes(self) -> list[str]:
        return self._store.base_classes

    def slot(self, key: str) -> int:
        return self._held[key].slot

    def width(self, key: Optional[str]) -> int:
        """The width of the pool holding the session's head (None: the base head)."""
        return self._held[key].width if key else self._store.pool.base_width

    def state_row(self, key: str) -> Optional[int]:
        return self._held[key].state_row

    # ---- work -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, slots: torch.Tensor, width: int, batch=None) -> torch.Tensor:
        """Grouped head forward: row i scored by slot slots[i] of the width's pool -> [B, width]
        float32 logits."""
        h = self.heads(width)
        return kernels.head_forward(x, h.W, h.b, slots, h.n_classes, normalize=h.normalize, batch=batch)

    def apply(self, rule: Rule, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
              state_rows: Optional[torch.Tensor], width: int, batch=None,
              logits=None) -> tuple[int, dict[str, DomainError]]:
        """One grouped update over rows of sessions of `rule` whose heads are in the width's
        pool (all found here) -> (what the rule reports: sessions reset by a label-free collapse
        guard, {key: why its rows were undone}). `logits`: this call's rows' logits from
        txn.forward, handed to rules that reuse them."""
        groups = batch.host_groups() if batch is not None else None
        copy = self._copy(rule, slots, state_rows, width, groups)
        self._wal.log_steps(x, y, slots, self._owner.get(width, {}), groups)
        kw = {"logits": logits} if logits is not None and rule.reuses_logits else {}
        try:
            resets = rule.update(self.heads(width), x, y, slots, state_rows, batch=batch, **kw)
        except Exception as e:
            self._put_back(rule, copy, range(len(copy.keys)))
            err = internal(f"the {rule.name} update failed ({type(e).__name__}); nothing was changed")
            log.exception("rule %s: update failed; %d sessions put back", rule.name, len(copy.keys))
            return 0, {k: err for k in copy.keys}
        reset_slots = set(resets.tolist()) if isinstance(resets, torch.Tensor) else set()
        for slot in reset_slots:  # the rule's own collapse reset (tent's default guard)
            self._trips.append((self._owner[width][slot], "reset", "collapse"))
            self._rule_resets.add(self._owner[width][slot])
        undone = {copy.keys[i]: diverged(self.found[copy.keys[i]].id) for i in self._nonfinite(rule, copy)}
        for i, err in self._over_limits(copy, slots, reset_slots).items():
            undone.setdefault(copy.keys[i], err)
        if undone:
            self._put_back(rule, copy, [i for i, k in enumerate(copy.keys) if k in undone])
        n_resets = len(reset_slots) if isinstance(resets, torch.Tensor) else int(resets or 0)
        return n_resets, undone

    def commit(self, key: str, n_examples: int, correct: int, labelled: Optional[int] = None,
               actor: Optional[str] = None) -> int:
        """Book one applied adapt request; returns the session's new version. `labelled`: how
        many of the examples had a label (prequential total); default all. `actor`: the API key
        id that sent it (its history entry). A guarded session's evidence (``observe``) is weighed
        here: a trip acts at once (see ``guard_outcome``)."""
        sess = self.found[key]
        labelled = n_examples if labelled is None else labelled
        t = time.time()
        version = sess.book(n_examples, correct, labelled, t)
        info = {"kind": "adapt", "key_id": actor, "by": "client", "cum": [sess.seen, sess.correct, sess.total]}
        rec = self._wal.commit(key, version, n_examples, correct, labelled, t, info)
        if key in self._rule_resets:
            self._rule_resets.discard(key)
            rec.info["guard"] = self._outcomes[key] = {"trigger": "collapse", "action": "reset", "version": version}
        watch, evidence = self._held[key].watch, self._evidence.pop(key, None)
        if watch is not None and evidence is not None:
            trigger = watch.observe(version, *evidence)
            if trigger is not None:
                self._trip(key, rec, trigger)
        return version

    # ---- guards -----------------------------------------------------------------------------

    def guarded(self, key: Optional[str]) -> bool:
        return key is not None and key in self._held and self._held[key].watch is not None

    def admit(self, key: str, n: int, adapt: bool = True) -> Optional[DomainError]:
        """Why an update of n examples may not run now (a frozen session; beyond its guard's
        per-request limit), or None. `adapt` False: a predict's own update (adapt_on_predict)."""
        held = self._held[key]
        if held.session.frozen:
            return guards.frozen_error(held.session.id)
        if adapt and held.watch is not None:
            return held.watch.admit(held.session.id, n)
        return None

    def reference_probs(self, x: torch.Tensor, keys: list[Optional[str]]) -> torch.Tensor:
        """The reference heads' probabilities [B, C] (CPU) for rows of guarded sessions (keys[i];
        None: not scored): one grouped head_forward over every row's reference."""
        refs, busy = self._store.refs, {k for k in keys if k}
        rows = []
        for k in keys:
            w = self._held[k].watch if k else None
            rows.append(-1 if w is None else refs.row(k, w.token, w.ref, self.found[k].rule.normalize, busy))
        logits = refs.forward(x, torch.tensor(rows, dtype=torch.int64, device=x.device))
        return torch.softmax(logits.float(), dim=1).cpu()

    def observe(self, key: str, x: torch.Tensor, y: list[int], probs: torch.Tensor, ref_probs: torch.Tensor) -> None:
        """The evidence of the session's next commit: its rows, labels (-1: none), and the session's
        and its reference's probabilities before the update."""
        if self.guarded(key):
            self._evidence[key] = (x.detach().cpu(), list(y), probs, ref_probs)

    def guard_outcome(self, key: str) -> Optional[dict]:
        return self._outcomes.get(key)

    def _trip(self, key: str, rec: Record, trigger: str) -> None:
        held, sess = self._held[key], self.found[key]
        watch = held.watch
        outcome = {"trigger": trigger, "action": watch.cfg["action"], "version": rec.version}
        if outcome["action"] == "rollback":
            target = self._target(held, trigger)
            if target is None:
                outcome.update(action="freeze", note="no retained version was above the reference")
            else:
                self._guard_rollback(held, *target, outcome)
        if outcome["action"] == "freeze":
            sess.frozen = True
            rec.info["frozen"] = True
        rec.info["guard"] = dict(outcome)
        watch.rearm()
        self._outcomes[key] = outcome
        self._trips.append((key, outcome["action"], trigger))

    def _target(self, held: Held, trigger: str):
        """The newest retained version above the reference on the evidence after it -> (version,
        its state), or None."""
        watch = held.watch
        rows = watch.evidence(trigger)
        if not rows:
            return None
        # versions from before the evidence: the window's first row (feature drift) or its first
        # label the reference contradicts (label conflict)
        limit = {"feature_drift": lambda: min(r.version for r in rows) - 1,
                 "label_conflict": lambda: min(r.version for r in rows if r.conflicts) - 1}.get(trigger, lambda: None)()
        xs = torch.stack([r.x for r in rows]).to(self._store.device)
        best = None
        for v, run in self._store.sweep(held, self._wal.pending.get(held.key, [])):
            if limit is not None and v > limit:
                break
            # labelled: judged on the examples after it (it may have learnt the wrong labels before);
            # label-free: on the whole window (having adapted on a row only makes it look more skewed)
            idx = [i for i, r in enumerate(rows) if r.version > v or trigger != "accuracy"]
            if len(idx) < watch.min_evidence or not any(r.version > v for r in rows):
                break
            h = run.heads
            sel = torch.tensor(idx, device=xs.device)
            logits = kernels.head_forward(xs.index_select(0, sel), h.W, h.b, torch.zeros(len(idx), dtype=torch.int64,
                                          device=xs.device), h.n_classes, normalize=h.normalize)
            if watch.judge(trigger, [rows[i] for i in idx], torch.softmax(logits.float(), dim=1).cpu()):
                best = (v, run.read())
        return best

    def _guard_rollback(self, held: Held, target: int, tensors: dict, outcome: dict) -> None:
        """The guard makes version `target` current again: a new version in this transaction."""
        sess = held.session
        stats = self._stats_at(held, target)
        t = time.time()
        version = sess.version + 1
        info = {"kind": "rollback", "key_id": None, "by": "guard", "source": {"version": target},
                "cum": list(stats), "guard": dict(outcome, to=target)}
        self._wal.add_state(held.key, Record(version, 0, 0, 0, t, [], info=info, state=tensors, stats=stats))
        self._store.pool.write(held.width, held.slot, held.state_row, sess.rule, sess.hyper, tensors)
        sess.version, (sess.seen, sess.correct, sess.total), sess.updated_at = version, stats, t
        outcome.update(to=target, rollback_version=version)

    def _stats_at(self, held: Held, version: int) -> tuple[int, int, int]:
        for rec in self._wal.pending.get(held.key, []):
            if rec.version == version and rec.info.get("cum"):
                return tuple(rec.info["cum"])
        e = held.history.entry(version)
        return (e.seen, e.correct, e.total) if e is not None else (0, 0, 0)

    def _over_limits(self, copy: "_Copy", slots: torch.Tensor, skip: set[int]) -> dict[int, DomainError]:
        """Guarded sessions whose head moved more than their guard allows (index in copy -> why)."""
        idx = [i for i, k in enumerate(copy.keys) if self._held[k].watch is not None
               and self._held[k].watch.measures_steps and int(copy.slots[i]) not in skip]
        if not idx:
            return {}
        pool = self._store.pool.pool(copy.width)
        sel = torch.tensor(idx, dtype=torch.int64, device=copy.slots.device)
        sl = copy.slots.index_select(0, sel)
        dW = (pool.W.index_select(0, sl).float() - copy.W.index_select(0, sel).float()).flatten(1)
        db = pool.b.index_select(0, sl).float() - copy.b.index_select(0, sel).float()
        norms = (dW.double().pow(2).sum(1) + db.double().pow(2).sum(1)).sqrt().tolist()
        out = {}
        for j, i in enumerate(idx):
            key = copy.keys[i]
            n = int((slots == copy.slots[i]).sum())
            err = self._held[key].watch.check_step(self.found[key].id, n, norms[j])
            if err is not None:
                out[i] = err
        return out

    def reused(self, pairs: list[tuple[str, Idem]]) -> tuple[set[str], dict[str, DomainError]]:
        """For this batch's keyed adapts, (session key, idem) pairs -> (the session keys whose
        Idempotency-Key the tenant used for another request, {session key: why that could not be
        checked}). One store call per tenant; applied requests' keys are recorded at the end."""
        if not pairs:
            return set(), {}
        try:
            return self._store._reused(pairs), {}
        except DomainError as e:
            return set(), {s: e for s, _ in pairs}

    def lookup(self, key: str, idem: Optional[Idem]) -> Optional[dict]:
        """The stored answer of an earlier adapt with this Idempotency-Key (InvalidInput when the
        key came with another request), or None."""
        return self._held[key].idem.lookup(idem)

    def remember(self, key: str, idem: Optional[Idem], response: dict) -> None:
        if not idem:
            return
        entry = self._held[key].idem.remember(idem, response, self._store.idem_ttl)
        self._keyed.append((key, idem))
        if key in self._before:
            self._before[key][4].add(idem[0])
        self._wal.attach_idem(key, {"key": idem[0], **entry})

    # ---- copies, checks and putting back ----------------------------------------------------

    def _copy(self, rule: Rule, slots: torch.Tensor, state_rows: Optional[torch.Tensor], width: int,
              groups: Optional[list[tuple[int, list[int]]]] = None) -> _Copy:
        """The touched sessions' heads (and state rows) before the update. `groups`: the call's
        rows grouped by slot on the host (SlotBatch.host_groups), when the caller has them."""
        pool = self._store.pool.pool(width)
        if groups is not None:
            touched_list = [s for s, _ in groups]
            touched = torch.tensor(touched_list, dtype=torch.int64, device=slots.device)
            rows = None
            if rule.state and state_rows is not None:
                first = torch.tensor([r[0] for _, r in groups], dtype=torch.int64, device=slots.device)
                rows = state_rows.index_select(0, first)
        else:
            valid = slots >= 0
            touched, first = _unique_first(slots[valid])
            touched_list = touched.tolist()
            rows = state_rows[valid].index_select(0, first) if rule.state and state_rows is not None else None
        owner = self._owner[width]
        keys = [owner[s] for s in touched_list]
        state = {}
        if rows is not None:
            state = {n: t.index_select(0, rows) for n, t in pool.states[rule.name].tensors.items()}
        copy = _Copy(width, keys, touched, pool.W.index_select(0, touched), pool.b.index_select(0, touched), rows,
                     state)
        for i, key in enumerate(keys):  # the state at entry: the first copy of each session
            if key not in self._before:
                s = self.found[key]
                self._before[key] = (rule, copy, i, (s.version, s.seen, s.correct, s.total, s.updated_at, s.frozen),
                                     set())
        return copy

    def _nonfinite(self, rule: Rule, copy: _Copy) -> list[int]:
        pool = self._store.pool.pool(copy.width)
        W, b = pool.W.index_select(0, copy.slots), pool.b.index_select(0, copy.slots)
        tensors = pool.states[rule.name].tensors if copy.rows is not None else {}
        states = {name: t.index_select(0, copy.rows).flatten(1) for name, t in tensors.items()}
        # One sum per tensor first: it is finite only if every value is (NaN and inf propagate;
        # an overflow to inf just takes the exact path below), the common case.
        if not set(states) & set(rule.inf_state):  # (a state that may hold inf: checked row by row)
            if all(math.isfinite(float(t.sum())) for t in (W, b, *states.values())):
                return []
        ok = W.isfinite().flatten(1).all(1)
        ok &= b.isfinite().all(1)
        for name, v in states.items():
            good = ~(v.isnan() | (v == -math.inf)) if name in rule.inf_state else v.isfinite()
            ok &= good.all(1)
        return (~ok).nonzero().flatten().tolist()

    def _put_back(self, rule: Rule, copy: _Copy, which) -> None:
        pool = self._store.pool.pool(copy.width)
        idx = torch.as_tensor(list(which), dtype=torch.int64, device=copy.slots.device)
        slots = copy.slots.index_select(0, idx)
        pool.W.index_copy_(0, slots, copy.W.index_select(0, idx))
        pool.b.index_copy_(0, slots, copy.b.index_select(0, idx))
        if copy.rows is not None:
            rows = copy.rows.index_select(0, idx)
            for name, t in pool.states[rule.name].tensors.items():
                t.index_copy_(0, rows, copy.state[name].index_select(0, idx))
        for i in idx.tolist():
            self._wal.drop_last_step(copy.keys[i])

    def _restore_entry_state(self) -> None:
        """Abort: every session this transaction changed goes back to its state at entry."""
        for key, (rule, copy, i, counters, idem_keys) in self._before.items():
            self._put_back(rule, copy, [i])
            s = self.found[key]
            s.version, s.seen, s.correct, s.total, s.updated_at, s.frozen = counters
            for k in idem_keys:
                self._held[key].idem.adapts.pop(k, None)
        self._wal.pending.clear()
        self._wal.steps.clear()
        self._outcomes.clear()
        self._trips.clear()
        self._rule_resets.clear()


def _unique_first(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct slots (ascending) and, for each, the index of its first row."""
    touched, inverse = torch.unique(slots, return_inverse=True)
    first = torch.full((touched.numel(),), slots.numel(), dtype=torch.int64, device=slots.device)
    first.scatter_reduce_(0, inverse, torch.arange(slots.numel(), device=slots.device), reduce="amin")
    return touched, first

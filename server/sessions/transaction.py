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
        self._wal: Optional[WalBuffer] = WalBuffer(store.fingerprint) if store.durability == "wal" else None
        self._before: dict[str, tuple] = {}  # key -> (rule, copy, index, counters, idem keys): the state at entry
        self.found: dict[str, Session] = {}
        self.missing: set[str] = set()
        self.unavailable: dict[str, DomainError] = {}
        self.errors: dict[str, DomainError] = {}
        self._keyed: list[tuple[str, Idem]] = []  # keyed adapts remembered here

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
                self._store._record_claims([(k, i) for k, i in self._keyed if k not in self.errors])
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
        pool (all found here) -> (what the rule
        reports: sessions reset by a label-free collapse guard, {key: why its rows were undone}).
        `logits`: this call's rows' logits from txn.forward, handed to rules that reuse them."""
        copy = self._copy(rule, slots, state_rows, width)
        if self._wal is not None:
            self._wal.log_steps(x, y, slots, self._owner.get(width, {}))
        kw = {"logits": logits} if logits is not None and rule.reuses_logits else {}
        try:
            resets = rule.update(self.heads(width), x, y, slots, state_rows, batch=batch, **kw)
        except Exception as e:
            self._put_back(rule, copy, range(len(copy.keys)))
            err = internal(f"the {rule.name} update failed ({type(e).__name__}); nothing was changed")
            log.exception("rule %s: update failed; %d sessions put back", rule.name, len(copy.keys))
            return 0, {k: err for k in copy.keys}
        bad = self._nonfinite(rule, copy)
        if bad:
            self._put_back(rule, copy, bad)
        return int(resets or 0), {copy.keys[i]: diverged(self.found[copy.keys[i]].id) for i in bad}

    def commit(self, key: str, n_examples: int, correct: int, labelled: Optional[int] = None) -> int:
        """Book one applied adapt request; returns the session's new version. `labelled`: how
        many of the examples had a label (prequential total); default all."""
        sess = self.found[key]
        labelled = n_examples if labelled is None else labelled
        t = time.time()
        version = sess.book(n_examples, correct, labelled, t)
        if self._wal is not None:
            self._wal.commit(key, version, n_examples, correct, labelled, t)
        return version

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
        if self._wal is not None:
            self._wal.attach_idem(key, {"key": idem[0], **entry})

    # ---- copies, checks and putting back ----------------------------------------------------

    def _copy(self, rule: Rule, slots: torch.Tensor, state_rows: Optional[torch.Tensor], width: int) -> _Copy:
        pool = self._store.pool.pool(width)
        valid = slots >= 0
        touched, first = _unique_first(slots[valid])
        owner = self._owner[width]
        keys = [owner[s] for s in touched.tolist()]
        rows = state_rows[valid].index_select(0, first) if rule.state and state_rows is not None else None
        state = {}
        if rows is not None:
            state = {n: t.index_select(0, rows) for n, t in pool.states[rule.name].tensors.items()}
        copy = _Copy(width, keys, touched, pool.W.index_select(0, touched), pool.b.index_select(0, touched), rows,
                     state)
        for i, key in enumerate(keys):  # the state at entry: the first copy of each session
            if key not in self._before:
                s = self.found[key]
                self._before[key] = (rule, copy, i, (s.version, s.seen, s.correct, s.total, s.updated_at), set())
        return copy

    def _nonfinite(self, rule: Rule, copy: _Copy) -> list[int]:
        pool = self._store.pool.pool(copy.width)
        ok = pool.W.index_select(0, copy.slots).isfinite().flatten(1).all(1)
        ok &= pool.b.index_select(0, copy.slots).isfinite().all(1)
        if copy.rows is not None:
            for name, t in pool.states[rule.name].tensors.items():
                v = t.index_select(0, copy.rows).flatten(1)
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
        if self._wal is not None:
            for i in idx.tolist():
                self._wal.drop_last_step(copy.keys[i])

    def _restore_entry_state(self) -> None:
        """Abort: every session this transaction changed goes back to its state at entry."""
        for key, (rule, copy, i, counters, idem_keys) in self._before.items():
            self._put_back(rule, copy, [i])
            s = self.found[key]
            s.version, s.seen, s.correct, s.total, s.updated_at = counters
            for k in idem_keys:
                self._held[key].idem.adapts.pop(k, None)
        if self._wal is not None:
            self._wal.pending.clear()
            self._wal.steps.clear()


def _unique_first(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct slots (ascending) and, for each, the index of its first row."""
    touched, inverse = torch.unique(slots, return_inverse=True)
    first = torch.full((touched.numel(),), slots.numel(), dtype=torch.int64, device=slots.device)
    first.scatter_reduce_(0, inverse, torch.arange(slots.numel(), device=slots.device), reduce="amin")
    return touched, first

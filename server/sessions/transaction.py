"""One micro-batch's session work as one explicit transaction.

    with store.batch(keys) as txn:          # the store's lock; the sessions brought to device slots
        txn.found, txn.missing              # key -> Session; keys that do not exist
        logits = txn.forward(x, slots)      # grouped head forward over txn.slot(key) / txn.base_slot
        txn.apply(rule, x, y, slots, rows)  # one grouped update (wal: its exact inputs are kept)
        version = txn.commit(key, ...)      # one applied adapt booked: version + 1
        txn.remember(key, idem, response)   # its Idempotency-Key answer
    txn.errors                              # after exit: key -> why its work was not made durable

On a clean exit the transaction appends every committed adapt to the write-ahead log (wal mode:
one backend call, fsync or AOF) before the caller acknowledges anything; sessions whose append
failed are dropped from memory and listed in ``errors``. On an exception it aborts: the sessions
it changed but did not log are dropped from memory (the store still has their last durable
state), then the exception propagates. Management calls (create, reset, ...) wait for the lock,
so they never interleave with an update.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

import kernels

from server.errors import DomainError
from server.rules import Heads, Rule
from server.sessions.idempotency import Idem
from server.sessions.session import Held, Session
from server.sessions.wal import WalBuffer


class Transaction:
    def __init__(self, store, keys) -> None:
        self._store = store
        self._keys = list(dict.fromkeys(k for k in keys if k))
        self._held: dict[str, Held] = {}
        self._wal: Optional[WalBuffer] = WalBuffer() if store.durability == "wal" else None
        self.found: dict[str, Session] = {}
        self.missing: set[str] = set()
        self.errors: dict[str, DomainError] = {}

    def __enter__(self) -> "Transaction":
        self._store.lock.acquire()
        try:
            self._held = self._store._acquire(self._keys)
        except BaseException:
            self._store.lock.release()
            raise
        self.found = {k: h.session for k, h in self._held.items()}
        self.missing = set(self._keys) - set(self.found)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.errors = self._store._flush(self._wal)
            else:
                self._store._abort(self._wal)
        finally:
            self._store.lock.release()
        return False

    # ---- views ------------------------------------------------------------------------------

    @property
    def heads(self) -> Heads:
        return self._store.pool.heads

    @property
    def base_slot(self) -> int:
        return self._store.pool.base_slot

    @property
    def base_classes(self) -> list[str]:
        return self._store.base_classes

    def slot(self, key: str) -> int:
        return self._held[key].slot

    def state_row(self, key: str) -> Optional[int]:
        return self._held[key].state_row

    # ---- work -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, slots: torch.Tensor, batch=None) -> torch.Tensor:
        """Grouped head forward: row i scored by slot slots[i] -> [B, C] float32 logits."""
        h = self.heads
        return kernels.head_forward(x, h.W, h.b, slots, h.n_classes, normalize=h.normalize, batch=batch)

    def apply(self, rule: Rule, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
              state_rows: Optional[torch.Tensor], batch=None, logits=None) -> int:
        """One grouped update over rows of sessions of `rule` (all found here); returns what the
        rule reports (label-free rules: sessions reset by their collapse guard). `logits`: this
        call's rows' logits from txn.forward, handed to rules that reuse them."""
        if self._wal is not None:
            self._wal.log_steps(x, y, slots, {h.slot: k for k, h in self._held.items()})
        if logits is not None and rule.reuses_logits:
            return rule.update(self.heads, x, y, slots, state_rows, batch=batch, logits=logits)
        return rule.update(self.heads, x, y, slots, state_rows, batch=batch)

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

    def lookup(self, key: str, idem: Optional[Idem]) -> Optional[dict]:
        """The stored answer of an earlier adapt with this Idempotency-Key (InvalidInput when the
        key came with another request), or None."""
        return self._held[key].idem.lookup(idem)

    def remember(self, key: str, idem: Optional[Idem], response: dict) -> None:
        if not idem:
            return
        entry = self._held[key].idem.remember(idem, response, self._store.idem_ttl)
        if self._wal is not None:
            self._wal.attach_idem(key, {"key": idem[0], **entry})

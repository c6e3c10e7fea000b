"""The write-ahead log's two halves: collecting what one micro-batch did, and replaying it.

``WalBuffer`` (one per transaction) keeps, for every session a kernel call touched, that
session's exact rows and the row counts of the other sessions in the call (with ``--durability
wal``, or when the in-memory history keeps them); each committed adapt becomes a ``Record``, a
guard's rollback a state record. In wal mode the transaction appends them to the store before
anything is acknowledged; they also become the sessions' history entries (and, without the
log, the in-memory history's records: server/sessions/history.py).

``replay`` applies records to a session's tensors outside the slot pool, rebuilding every call
with the shape it had live (``kernels.replay_slots``: stand-in sessions with the other row
counts), so the torch kernels take the code path they took live and compute this session's rows
bit for bit as they did.
"""

from __future__ import annotations

from typing import Optional

import torch

import kernels

from server.rules import scratch_heads
from server.sessions.codec import Record
from server.sessions.session import Session


class WalBuffer:
    def __init__(self, weights: Optional[str] = None, keep_steps: bool = True) -> None:
        self.weights = weights  # the backbone weights' sha256, carried by every record
        self.keep_steps = keep_steps  # False: records carry statistics and history entries only
        self.steps: dict[str, list] = {}  # update inputs applied since the session's last commit
        self.pending: dict[str, list[Record]] = {}  # committed, not yet logged

    def log_steps(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, owner: dict[int, str],
                  groups: Optional[list[tuple[int, list[int]]]] = None) -> None:
        """Keep each session's rows of one update call (its exact inputs) for its record.
        `groups`: the rows grouped by slot on the host (SlotBatch.host_groups), when the caller has them."""
        if not self.keep_steps:
            return
        rows: dict[int, list[int]] = {}
        if groups is None:
            for i, slot in enumerate(slots.tolist()):
                if slot >= 0:
                    rows.setdefault(slot, []).append(i)
        else:  # in order of first appearance, as the others' counts have always been logged
            rows = dict(sorted(groups, key=lambda g: g[1][0]))
        for slot, at in rows.items():
            key = owner.get(slot)
            if key is None:
                continue
            others = [len(r) for s, r in rows.items() if s != slot]
            self.steps.setdefault(key, []).append((_rows(x, at), _rows(y, at), others))

    def drop_last_step(self, key: str) -> None:
        """The last update call's rows of this session were undone: they are not its inputs."""
        steps = self.steps.get(key)
        if steps:
            steps.pop()

    def commit(self, key: str, version: int, n: int, correct: int, labelled: int, t: float,
               info: Optional[dict] = None) -> Record:
        rec = Record(version, n, correct, labelled, t, self.steps.pop(key, []), weights=self.weights,
                     info=dict(info or {}))
        self.pending.setdefault(key, []).append(rec)
        return rec

    def add_state(self, key: str, rec: Record) -> None:
        """A state record made inside the transaction (a guard's rollback)."""
        rec.weights = self.weights
        self.pending.setdefault(key, []).append(rec)

    def attach_idem(self, key: str, entry: dict) -> None:
        recs = self.pending.get(key)
        if recs:
            recs[-1].idem = entry

    def touched(self) -> set[str]:
        return set(self.pending) | set(self.steps)


def _rows(t: torch.Tensor, at: list[int]) -> torch.Tensor:
    """t's rows `at` (ascending) as a CPU tensor of their own: one copy of a slice when they are
    consecutive, as a request's rows are."""
    if t.requires_grad:
        t = t.detach()
    if at[-1] - at[0] + 1 == len(at):
        part = t[at[0]:at[-1] + 1]
    else:
        part = t.index_select(0, torch.tensor(at, device=t.device))
    return part.to("cpu", copy=True)


def replay(sess: Session, tensors: dict[str, torch.Tensor], records: list[Record], C: int, d: int,
           device, head_dtype: torch.dtype = torch.float32, learned: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Apply logged versions (adapts and state records) to a copy of the session's tensors; books
    each record on `sess`. Returns the new tensors (CPU copies). `C` and `head_dtype`: the width
    and storage of the pool the session's head lives in, so every step is computed exactly as it
    was live. `learned`: the learned rules' parameters the live calls used."""
    run = Replay(sess, tensors, records, C, d, device, head_dtype, learned)
    for _ in run.steps():
        pass
    return run.read()


class Replay:
    """`replay` one record at a time (``steps`` yields after each one, booked on `sess`:
    sess.version is the version the heads hold). The session is slot 0 of ``heads``; slots 1..
    are the stand-ins of the calls it shared live."""

    def __init__(self, sess: Session, tensors: dict[str, torch.Tensor], records: list[Record], C: int, d: int,
                 device, head_dtype: torch.dtype = torch.float32, learned: Optional[dict] = None) -> None:
        self.sess, self.records, self.device = sess, records, device
        rule, n = sess.rule, len(sess.classes)
        U = 1 + max((len(o) for r in records for _, _, o in r.steps), default=0)
        # Stand-ins share the session's rule and hyper-parameters; they start from zero every call.
        entries = [(rule, sess.hyper, n, tensors)] + [(rule, sess.hyper, 1, _zeros(rule, 1, d))] * (U - 1)
        self.heads, _ = scratch_heads(entries, C, d, device, head_dtype, learned=learned)

    def steps(self):
        sess, heads, device = self.sess, self.heads, self.device
        rule = sess.rule
        pool = heads.pools.get(rule.name, {})
        for rec in self.records:
            if rec.state is not None:  # a reset, import or rollback: the state as it was written
                self._write(rec.state)
                sess.seen, sess.correct, sess.total = rec.stats or (0, 0, 0)
                sess.version, sess.updated_at = rec.version, rec.t
                yield heads
                continue
            for x, y, others in rec.steps:
                slots = kernels.replay_slots(len(y), others)
                k = len(slots) - len(y)
                x = torch.cat([x.to(device), torch.zeros(k, x.shape[1], dtype=x.dtype, device=device)])
                y = torch.cat([y.to(device), torch.zeros(k, dtype=y.dtype, device=device)])
                z = torch.tensor(slots, dtype=torch.int64, device=device)
                rule.update(heads, x, y, z, z if rule.state else None)
                heads.W[1:].zero_()
                heads.b[1:].zero_()
                for t in pool.values():
                    t[1:].zero_()
            sess.book(rec.n, rec.correct, rec.labelled, rec.t)
            sess.version = rec.version
            yield heads

    def read(self) -> dict[str, torch.Tensor]:
        """The session's tensors now (CPU copies of its own size)."""
        rule, n, heads = self.sess.rule, len(self.sess.classes), self.heads
        pool = heads.pools.get(rule.name, {})
        out = {"W": heads.W[0, :n].float().cpu().clone(), "b": heads.b[0, :n].float().cpu().clone()}
        for k, shape in rule.state_shapes(n, heads.W.shape[2]).items():
            out[k] = pool[k][0][tuple(slice(0, s) for s in shape)].cpu().clone()
        return out

    def _write(self, state: dict[str, torch.Tensor]) -> None:
        heads, n = self.heads, state["W"].shape[0]
        heads.W[0].zero_()
        heads.b[0].zero_()
        heads.W[0, :n] = state["W"].to(heads.W.device, heads.W.dtype)
        heads.b[0, :n] = state["b"].to(heads.b.device, heads.b.dtype)
        for k, t in heads.pools.get(self.sess.rule.name, {}).items():
            t[0].zero_()
            t[0][tuple(slice(0, s) for s in state[k].shape)] = state[k].to(t.device)


def _zeros(rule, n: int, d: int) -> dict[str, torch.Tensor]:
    return {"W": torch.zeros(n, d), "b": torch.zeros(n), **{k: torch.zeros(s) for k, s in rule.state_shapes(n, d).items()}}

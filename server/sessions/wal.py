"""The write-ahead log's two halves: collecting what one micro-batch did, and replaying it.

``WalBuffer`` (one per transaction, ``--durability wal``) keeps, for every session a kernel call
touched, that session's exact rows and the row counts of the other sessions in the call; each
committed adapt becomes a ``Record``. The transaction appends them to the store before anything
is acknowledged.

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
    def __init__(self, weights: Optional[str] = None) -> None:
        self.weights = weights  # the backbone weights' sha256, carried by every record
        self.steps: dict[str, list] = {}  # update inputs applied since the session's last commit
        self.pending: dict[str, list[Record]] = {}  # committed, not yet logged

    def log_steps(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, owner: dict[int, str]) -> None:
        """Keep each session's rows of one update call (its exact inputs) for its record."""
        counts: dict[int, int] = {}
        for slot in slots.tolist():
            if slot >= 0:
                counts[slot] = counts.get(slot, 0) + 1
        for slot in counts:
            key = owner.get(slot)
            if key is None:
                continue
            mask = slots == slot
            others = [c for s, c in counts.items() if s != slot]
            self.steps.setdefault(key, []).append(
                (x[mask].detach().cpu().clone(), y[mask].detach().cpu().clone(), others))

    def drop_last_step(self, key: str) -> None:
        """The last update call's rows of this session were undone: they are not its inputs."""
        steps = self.steps.get(key)
        if steps:
            steps.pop()

    def commit(self, key: str, version: int, n: int, correct: int, labelled: int, t: float) -> None:
        self.pending.setdefault(key, []).append(
            Record(version, n, correct, labelled, t, self.steps.pop(key, []), weights=self.weights))

    def attach_idem(self, key: str, entry: dict) -> None:
        recs = self.pending.get(key)
        if recs:
            recs[-1].idem = entry

    def touched(self) -> set[str]:
        return set(self.pending) | set(self.steps)


def replay(sess: Session, tensors: dict[str, torch.Tensor], records: list[Record], C: int, d: int,
           device, head_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Apply logged adapts to a copy of the session's tensors; books each record on `sess`.
    Returns the new tensors (CPU copies). `C` and `head_dtype`: the width and storage of the pool
    the session's head lives in, so every step is computed exactly as it was live."""
    rule, n = sess.rule, len(sess.classes)
    U = 1 + max((len(o) for r in records for _, _, o in r.steps), default=0)
    # Stand-ins share the session's rule and hyper-parameters; they start from zero every call.
    entries = [(rule, sess.hyper, n, tensors)] + [(rule, sess.hyper, 1, _zeros(rule, 1, d))] * (U - 1)
    heads, _ = scratch_heads(entries, C, d, device, head_dtype)
    pool = heads.pools.get(rule.name, {})
    for rec in records:
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
    out = {"W": heads.W[0, :n].float().cpu().clone(), "b": heads.b[0, :n].float().cpu().clone()}
    for k, shape in rule.state_shapes(n, d).items():
        out[k] = pool[k][0][tuple(slice(0, s) for s in shape)].cpu().clone()
    return out


def _zeros(rule, n: int, d: int) -> dict[str, torch.Tensor]:
    return {"W": torch.zeros(n, d), "b": torch.zeros(n), **{k: torch.zeros(s) for k, s in rule.state_shapes(n, d).items()}}

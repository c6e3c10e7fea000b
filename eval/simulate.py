"""Streams simulated on cached features with the server's own rule code (server.rules, the same
kernels the server calls), many sessions per kernel call.

A server session adapting on a stream does, per request: predict every instance with the head
as it is (the prequential predictions), then one grouped update over the request's rows. Here
every stream of one method is a slot of one set of scratch heads and all streams advance in
lockstep, so a step is one head_forward and one rule update over every stream's request. The
values a slot gets differ from a lone server session only in the last bits (the kernels' row
grouping, kernels/slot_batch.py); tests/eval compares predictions with a server over HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

import kernels
from server.rules import RULES, check_trained, scratch_heads, source_head

CHECKPOINTS = (5, 10, 20, 50)
EVAL_CHUNK = 8192


@dataclass(frozen=True)
class Method:
    """A rule with its settings, or the base head (rule None).

    labelled: the stream's rows carry their labels (else the rule adapts label-free);
    budget: learn only from the first `budget` labelled rows of each class, then stay frozen
    ("static after k labels"); fit_epochs > 0 (with a budget): learn nothing online; once every
    class has `budget` labels, take fit_epochs full-batch steps of the rule over those rows (an
    offline fine-tune, e.g. of the base head with sgd), then stay frozen; steps: passes over an
    episode's support set."""

    name: str
    rule: Optional[str]
    hyper: tuple = ()
    init: str = "zeros"
    labelled: bool = True
    budget: Optional[int] = None
    fit_epochs: int = 0
    steps: int = 1

    @property
    def hyper_dict(self) -> dict:
        return dict(self.hyper)


def method(name: str, rule: Optional[str], hyper: Optional[dict] = None, **kw) -> Method:
    return Method(name, rule, tuple(sorted((hyper or {}).items())), **kw)


@dataclass
class Stream:
    """One stream: rows `order` of a dataset's features, then its test rows `test`."""

    key: dict
    features: np.ndarray  # [N, d] float32 (shared by every stream of the dataset)
    labels: np.ndarray  # [N] int64
    order: np.ndarray  # stream rows, in stream order
    test: np.ndarray  # held-out test rows of this stream's split
    classes: list[str]
    images: Optional[np.ndarray] = None  # [N, 28, 28] uint8 (HTTP backend, pixel baselines)
    extra: dict = field(default_factory=dict)


@dataclass
class Base:
    """What a session started from the base head gets: the backbone's head and source stats."""

    W: torch.Tensor  # [n, d]
    b: torch.Tensor  # [n]
    source_stats: Optional[dict] = None  # {"mean", "var"} [d]
    learned: dict = field(default_factory=dict)  # learned rules' parameters: rule -> name -> tensor

    def head(self) -> dict:
        return {"W": self.W.clone(), "b": self.b.clone(), **self.source()}

    def source(self) -> dict:
        """The source statistics by init_state key, as the session store hands them to rules."""
        return init_state_source(self.source_stats)


def init_state_source(stats: Optional[dict]) -> dict:
    """{"mean", "var"[, "within_cov"]} -> {"feature_mean", "feature_var"[, "feature_within_cov"]}."""
    return {f"feature_{k}": v.clone() for k, v in (stats or {}).items() if k in ("mean", "var", "within_cov")}


def _heads(m: Method, streams: list[Stream], base: Base, d: int):
    C = max(len(s.classes) for s in streams)
    if m.rule is None:  # the base head, frozen
        rule = RULES["sgd"]
        hp = rule.validate({})
        entries = [(rule, hp, len(s.classes), {"W": base.W.clone(), "b": base.b.clone()}) for s in streams]
        return None, *scratch_heads(entries, C, d, "cpu")
    rule = RULES[m.rule]
    check_trained(rule, base.learned)
    hp = rule.validate(m.hyper_dict)
    entries = []
    for s in streams:
        n = len(s.classes)
        if m.init == "base":
            head = base.head()
            tensors = {"W": head["W"], "b": head["b"], **rule.init_state(n, d, hp, head=head)}
        else:
            zero = {"W": torch.zeros(n, d), "b": torch.zeros(n)}
            tensors = {**zero, **rule.init_state(n, d, hp, head=source_head(rule, n, d, base.source(), dict(zero)))}
        entries.append((rule, hp, n, tensors))
    return rule, *scratch_heads(entries, C, d, "cpu", learned=base.learned)


def _accuracy(heads, slot_ids: list[int], streams: list[Stream], which: str = "test") -> list[float]:
    """Held-out accuracy of the given slots on their streams' test rows (no adaptation)."""
    feats, slots, labels, owner = [], [], [], []
    for j in slot_ids:
        idx = getattr(streams[j], which)
        feats.append(streams[j].features[idx])
        labels.append(streams[j].labels[idx])
        slots.append(np.full(len(idx), j))
    if not feats:
        return []
    x = torch.from_numpy(np.concatenate(feats))
    sl = torch.from_numpy(np.concatenate(slots)).long()
    y = np.concatenate(labels)
    pred = np.concatenate([kernels.head_forward(x[i:i + EVAL_CHUNK], heads.W, heads.b, sl[i:i + EVAL_CHUNK],
                                                heads.n_classes, normalize=heads.normalize).argmax(1).numpy()
                           for i in range(0, len(x), EVAL_CHUNK)])
    ok = pred == y
    out, at = [], 0
    for j in slot_ids:
        n = len(getattr(streams[j], which))
        out.append(float(ok[at:at + n].mean()) if n else float("nan"))
        at += n
    return out


def run_streams(m: Method, streams: list[Stream], base: Base, batch: int = 10,
                checkpoints: tuple[int, ...] = CHECKPOINTS) -> list[dict]:
    """Every stream through a fresh session of method m. Per stream: "correct" (prequential,
    bool per row), "final" (test accuracy after the stream), "checkpoints" {k: test accuracy
    once every class has k stream rows (None if never)}, "resets" (label-free guards)."""
    if not streams:
        return []
    d = streams[0].features.shape[1]
    rule, heads, state_rows = _heads(m, streams, base, d)
    state_rows = torch.tensor(state_rows, dtype=torch.int64)
    S, C = len(streams), heads.W.shape[1]
    n_cls = np.array([len(s.classes) for s in streams])
    seen = np.zeros((S, C), dtype=np.int64)
    seen[np.arange(C)[None, :] >= n_cls[:, None]] = np.iinfo(np.int64).max  # absent classes never limit
    learned = np.zeros((S, C), dtype=np.int64)
    correct = [np.zeros(len(s.order), dtype=bool) for s in streams]
    ckpt: list[dict] = [{k: None for k in checkpoints} for _ in streams]
    resets = 0
    fitting = m.fit_epochs > 0 and m.budget is not None
    collected: list[list[int]] = [[] for _ in streams]  # fit_epochs: the budgeted rows of each stream
    fitted = np.zeros(S, dtype=bool)
    steps = max(math.ceil(len(s.order) / batch) for s in streams)
    for t in range(steps):
        parts = [(j, s.order[t * batch:(t + 1) * batch]) for j, s in enumerate(streams)]
        parts = [(j, idx) for j, idx in parts if len(idx)]
        x = torch.from_numpy(np.concatenate([streams[j].features[idx] for j, idx in parts]))
        y_np = np.concatenate([streams[j].labels[idx] for j, idx in parts])
        slot_np = np.concatenate([np.full(len(idx), j) for j, idx in parts])
        slots = torch.from_numpy(slot_np).long()
        pred = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
        ok = pred.argmax(1).numpy() == y_np
        at = 0
        for j, idx in parts:
            correct[j][t * batch:t * batch + len(idx)] = ok[at:at + len(idx)]
            at += len(idx)
        if rule is not None:
            learn = np.ones(len(y_np), dtype=bool)
            if m.budget is not None:  # the first `budget` labels of each class, in stream order
                for i, (j, c) in enumerate(zip(slot_np, y_np)):
                    learn[i] = learned[j, c] < m.budget
                    learned[j, c] += learn[i]
            if fitting:
                at = 0
                for j, idx in parts:
                    collected[j] += [int(v) for v, keep in zip(idx, learn[at:at + len(idx)]) if keep]
                    at += len(idx)
                ready = [j for j in range(S) if not fitted[j] and learned[j, :n_cls[j]].min() >= m.budget]
                if ready:
                    _fit(rule, heads, state_rows, streams, ready, collected, m.fit_epochs)
                    fitted[ready] = True
            elif learn.any():
                upd = torch.where(torch.from_numpy(learn), slots, -1)
                y = torch.from_numpy(y_np).long() if m.labelled else torch.full((len(y_np),), -1, dtype=torch.int64)
                rows = state_rows.index_select(0, slots) if rule.state else None
                reset = rule.update(heads, x, y, upd, rows, batch=kernels.SlotBatch(upd))
                # a rule's safeguard reports the slots it reset (a tensor) or how many (an int)
                resets += int(reset.numel()) if isinstance(reset, torch.Tensor) else int(reset or 0)
        before = seen.min(1)
        np.add.at(seen, (slot_np, y_np), 1)
        after = seen.min(1)
        for k in checkpoints:
            due = [j for j in range(S) if before[j] < k <= after[j]]
            for j, acc in zip(due, _accuracy(heads, due, streams)):
                ckpt[j][k] = acc
    finals = _accuracy(heads, list(range(S)), streams)
    return [{"correct": correct[j], "final": finals[j], "checkpoints": ckpt[j], "resets": resets if S == 1 else None}
            for j in range(S)]


def _fit(rule, heads, state_rows, streams, ready, collected, epochs) -> None:
    """fit_epochs: full-batch steps of the rule over each ready stream's collected rows."""
    x = torch.from_numpy(np.concatenate([streams[j].features[collected[j]] for j in ready]))
    y = torch.from_numpy(np.concatenate([streams[j].labels[collected[j]] for j in ready])).long()
    slots = torch.from_numpy(np.concatenate([np.full(len(collected[j]), j) for j in ready])).long()
    batch = kernels.SlotBatch(slots)
    for _ in range(epochs):
        rule.update(heads, x, y, slots, state_rows.index_select(0, slots) if rule.state else None, batch=batch)


def run_episodes(m: Method, episodes: list[dict], features: np.ndarray, d: int,
                 learned: Optional[dict] = None, source: Optional[dict] = None) -> list[float]:
    """N-way k-shot episodes through throw-away heads (init zeros, like the server's episodic
    heads): each episode's support rows (shuffled) adapt its head `m.steps` times, then its
    queries are scored. episodes: {"support", "support_y", "query", "query_y"} index arrays."""
    rule = RULES["prototype" if m.rule is None else m.rule]
    hp = rule.validate(m.hyper_dict)
    C = max(int(e["support_y"].max()) + 1 for e in episodes)
    check_trained(rule, learned or {})
    heads, state_rows = scratch_heads([(rule, hp, C, None) for _ in episodes], C, d, "cpu", learned=learned,
                                      source=source)
    sr = torch.tensor(state_rows, dtype=torch.int64)
    x = torch.from_numpy(np.concatenate([features[e["support"]] for e in episodes]))
    y = torch.from_numpy(np.concatenate([e["support_y"] for e in episodes])).long()
    slots = torch.from_numpy(np.concatenate([np.full(len(e["support"]), j) for j, e in enumerate(episodes)])).long()
    for _ in range(m.steps):
        rule.update(heads, x, y, slots, sr.index_select(0, slots) if rule.state else None,
                    batch=kernels.SlotBatch(slots))
    xq = torch.from_numpy(np.concatenate([features[e["query"]] for e in episodes]))
    sq = torch.from_numpy(np.concatenate([np.full(len(e["query"]), j) for j, e in enumerate(episodes)])).long()
    pred = kernels.head_forward(xq, heads.W, heads.b, sq, heads.n_classes, normalize=heads.normalize).argmax(1)
    ok = (pred.numpy() == np.concatenate([e["query_y"] for e in episodes]))
    out, at = [], 0
    for e in episodes:
        out.append(float(ok[at:at + len(e["query"])].mean()))
        at += len(e["query"])
    return out

"""Running one micro-batch.

1. features: one backbone forward (``torch.inference_mode``; bf16 autocast on CUDA) over the
   rows whose content hash is not in the feature cache (rows with the same hash computed once);
2. session and base-head jobs, in one sessions transaction, in *rounds*: a job's round is the
   number of adapt jobs of its session queued before it in this batch. Per round: one grouped
   head forward over all its rows (predictions, and the pre-update predictions of adapts =
   prequential), then one grouped update call per rule, for each pool width the round's heads
   are in (server/sessions/slots.py). Jobs of different sessions share a round, so the common
   case is one forward and one update per rule; several adapts of one
   session in one batch become successive rounds, identical to sending them one at a time;
3. episodic jobs: a throw-away head per job, adapted on its support set (one call per rule per
   step) and one head forward for all their queries;
4. predicts at a version: the engine materialised each job's head; one head forward over all of
   them (no session slot, nothing changed).
Guarded sessions (server/sessions/guard.py): an adapt of a frozen session, or beyond its guard's
size limit, is refused before its round; per round, one more grouped head forward scores the
guarded updates' rows with their reference heads (the shadow predictions), handed to the
transaction with the session's own predictions before each commit.
Futures are resolved only after the transaction has made the batch's adapts durable.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

import kernels

from server.engine.batcher import Pending
from server.engine.messages import AdaptResult, Input, Prediction, PredictResult, Scored
from server.errors import DomainError, idempotency_reused, internal, invalid, session_not_found
from server.keys import split_key
from server.rules import RULES, Rule, scratch_heads
from server.sessions import width_for

log = logging.getLogger("fwserve.executor")


@dataclass
class EpisodicSpec:
    """An episodic job's head, resolved when it was submitted."""

    rule: Rule
    hyper: dict[str, float]
    classes: list[str]
    y: list[int]
    steps: int


class Executor:
    def __init__(self, backbone, store, cache, metrics, settings) -> None:
        self.backbone, self.store, self.cache, self.metrics = backbone, store, cache, metrics
        self.max_rows = settings.max_batch_size

    def run(self, items: list[Pending]) -> None:
        m = self.metrics
        start = time.perf_counter()
        for item in items:
            m.queue_wait.observe(start - item.enqueued)
        m.batch_size.observe(sum(i.n_rows for i in items))
        m.batch_requests.observe(len(items))
        m.batch_sessions.observe(len({i.session for i in items if i.session is not None}))
        inputs = [inp for i in items for inp in _inputs(i)]
        # one tenant's images never answer another's from the cache (or tell by timing that they would)
        keys = [_cache_key(i.job.tenant, inp.key) for i in items for inp in _inputs(i)]
        feats = iter(self._features(inputs, keys))
        rows: dict[int, list[torch.Tensor]] = {}
        support: dict[int, list[torch.Tensor]] = {}
        for i in items:
            rows[id(i)] = [next(feats) for _ in i.job.inputs]
            if i.episodic is not None:
                support[id(i)] = [next(feats) for _ in i.job.support]
        results: dict[int, object] = {}
        versioned = [i for i in items if getattr(i.job, "view", None) is not None]
        self._session_jobs([i for i in items if i.episodic is None and getattr(i.job, "view", None) is None], rows,
                           results)
        if versioned:
            self._versioned_jobs(versioned, rows, results)
        episodic = [i for i in items if i.episodic is not None]
        try:  # episodic heads touch no session: their failure is theirs alone
            self._episodic_jobs(episodic, rows, support, results)
        except Exception:
            log.exception("episodic heads failed")
            for i in episodic:
                results.pop(id(i), None)
                i.future.set_exception(internal("the episodic head failed; nothing was changed"))
        now = time.perf_counter()
        for item in items:
            if item.future.done():
                continue
            res = results[id(item)]
            if not res.latency_seconds:
                res.latency_seconds = now - item.enqueued
            res.queue_seconds = start - item.enqueued
            item.future.set_result(res)

    # ---- features ---------------------------------------------------------------------------

    def _features(self, inputs: list[Input], keys: list[Optional[str]]) -> list[torch.Tensor]:
        out: list[Optional[torch.Tensor]] = [None] * len(inputs)
        todo: dict[object, list[int]] = {}
        for i, key in enumerate(keys):
            f = self.cache.get(key) if key else None
            if f is not None:
                out[i] = f
            else:
                todo.setdefault(key or ("row", i), []).append(i)
        firsts = [idx[0] for idx in todo.values()]
        groups = list(todo.values())
        for at in range(0, len(firsts), self.max_rows):
            chunk = firsts[at:at + self.max_rows]
            x = torch.stack([inputs[i].pixels for i in chunk])
            t0 = time.perf_counter()
            feats = self.backbone.features(x)
            if feats.is_cuda:
                torch.cuda.synchronize(feats.device)
            self.metrics.backbone_forward.observe(time.perf_counter() - t0)
            for i, f, same in zip(chunk, feats, groups[at:at + self.max_rows]):
                f = f.clone()  # not a view into the batch: the cache keeps it
                for j in same:
                    out[j] = f
                if keys[i]:
                    self.cache.put(keys[i], f)
        return out

    # ---- session and base-head jobs ---------------------------------------------------------

    def _session_jobs(self, items: list[Pending], rows, results) -> None:
        if not items:
            return
        first_of: dict[tuple[str, str], Pending] = {}  # (session, Idempotency-Key) -> its first job here
        dups: list[tuple[Pending, Pending]] = []
        with self.store.batch(i.session for i in items) as txn:
            live, ys = [], {}
            for item in items:
                key = item.session
                if key in txn.missing:
                    item.future.set_exception(session_not_found(split_key(key)[1]))
                    continue
                if key in txn.unavailable:
                    item.future.set_exception(txn.unavailable[key])
                    continue
                sess = txn.found.get(key) if key else None
                if item.is_adapt:
                    try:
                        ys[id(item)] = _label_indices(sess, item.job.labels)
                    except DomainError as e:
                        item.future.set_exception(invalid(e.code, f"{e.message} (session {sess.id!r})"))
                        continue
                    if item.job.idempotency and self._idempotent(txn, item, first_of, dups, results):
                        ys.pop(id(item), None)
                        continue
                elif sess is not None and sess.hyper.get("adapt_on_predict"):
                    ys[id(item)] = [-1] * len(item.job.inputs)  # test-time adaptation on the predict's own instances
                live.append(item)
            # keys the tenant used on another session or for another request (only the ones that
            # would be applied: a rejected request leaves no trace)
            keyed = [i for i in live if i.is_adapt and i.job.idempotency]
            reused, unchecked = txn.reused([(i.session, i.job.idempotency) for i in keyed])
            for item in keyed:
                if item.session in reused or item.session in unchecked:
                    item.future.set_exception(unchecked.get(item.session) or idempotency_reused())
                    ys.pop(id(item), None)
                    live.remove(item)
            rounds: dict[int, list[Pending]] = defaultdict(list)
            n_adapts: dict[str, int] = defaultdict(int)
            for item in live:
                r = n_adapts[item.session] if item.session else 0
                rounds[r].append(item)
                if id(item) in ys:
                    n_adapts[item.session] += 1
            for r in sorted(rounds):
                by_width: dict[int, list[Pending]] = defaultdict(list)  # heads of one width: one kernel call
                for item in rounds[r]:
                    by_width[txn.width(item.session)].append(item)
                for width, witems in by_width.items():
                    self._round(txn, width, witems, rows, ys, results)
        for item in live:  # the log append failed for these sessions: nothing is acknowledged
            if item.session in txn.errors and not item.future.done():
                item.future.set_exception(txn.errors[item.session])
                results.pop(id(item), None)
        for dup, first in dups:
            if first.future.done():
                dup.future.set_exception(first.future.exception())
            else:
                results[id(dup)] = AdaptResult.from_record(results[id(first)].to_record())

    def _idempotent(self, txn, item: Pending, first_of, dups, results) -> bool:
        """An adapt with an Idempotency-Key seen before: answer the stored response (or join the
        same key's first job in this batch); True when the job needs no update of its own."""
        idem = item.job.idempotency
        try:
            hit = txn.lookup(item.session, idem)
        except DomainError as e:
            item.future.set_exception(e)
            return True
        if hit is not None:
            results[id(item)] = AdaptResult.from_record(hit)
            return True
        first = first_of.get((item.session, idem[0]))
        if first is None:
            first_of[(item.session, idem[0])] = item
            return False
        if first.job.idempotency[1] != idem[1]:
            item.future.set_exception(idempotency_reused())
        else:
            dups.append((item, first))
        return True

    def _round(self, txn, width: int, items: list[Pending], rows, ys, results) -> None:
        """One round's jobs whose heads are in the width's pool: one forward, one update per rule."""
        m = self.metrics
        items = self._admitted(txn, items, ys)
        if not items:
            return
        x = torch.stack([f for i in items for f in rows[id(i)]])
        fwd = kernels.SlotBatch.from_list([txn.slot(i.session) if i.session else txn.base_slot
                                           for i in items for _ in i.job.inputs], x.device)
        t0 = time.perf_counter()
        logits = txn.forward(x, fwd.slots, width, batch=fwd)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        prob_rows = probs.tolist()
        m.head_predict.observe(time.perf_counter() - t0)
        guarded = [i.session if id(i) in ys and txn.guarded(i.session) else None for i in items for _ in i.job.inputs]
        ref_probs = txn.reference_probs(x, guarded) if any(guarded) else None  # one call for the round

        at = 0
        by_rule: dict[str, list[Pending]] = defaultdict(list)
        first_row: dict[int, int] = {}  # item -> its first row in x (and in logits)
        for i in items:
            n = len(i.job.inputs)
            p = prob_rows[at:at + n]
            first_row[id(i)] = at
            at += n
            if i.session is None:
                results[id(i)] = PredictResult("base", None, None, _predictions(p, txn.base_classes, i.job.top_k))
                continue
            sess = txn.found[i.session]
            if not i.is_adapt:
                results[id(i)] = PredictResult("session", sess.id, sess.version,
                                               _predictions(p, sess.classes, i.job.top_k))
                if id(i) in ys:  # adapt_on_predict: the predictions above, then an unlabelled update
                    by_rule[sess.rule.name].append(i)
                continue
            preds = _predictions(p, sess.classes, 1)
            for pred, y in zip(preds, ys[id(i)]):
                pred.true_label = sess.classes[y] if y >= 0 else None
                pred.correct = pred.index == y if y >= 0 else None
            results[id(i)] = AdaptResult(sess.id, sess.version, 0, preds, 0.0)
            by_rule[sess.rule.name].append(i)

        for rule_name, ritems in by_rule.items():
            rule = txn.found[ritems[0].session].rule
            whole = len(ritems) == len(items)  # every row of the round, in its order: the forward's x and batch
            xs = x if whole else torch.stack([f for i in ritems for f in rows[id(i)]])
            dev = xs.device
            y = torch.tensor([v for i in ritems for v in ys[id(i)]], dtype=torch.int64, device=dev)
            batch = fwd if whole else kernels.SlotBatch.from_list(
                [txn.slot(i.session) for i in ritems for _ in i.job.inputs], dev)
            sl = batch.slots
            # The forward above already read these heads: the update reuses its logits (Triton path).
            pre = None
            if kernels.dispatch.logits_reusable(xs):
                at_rows = [first_row[id(i)] + k for i in ritems for k in range(len(i.job.inputs))]
                pre = logits if whole else logits.index_select(
                    0, torch.tensor(at_rows, dtype=torch.int64, device=logits.device))
            state_rows = None
            if rule.state:
                state_rows = torch.tensor([txn.state_row(i.session) for i in ritems for _ in i.job.inputs],
                                          dtype=torch.int64, device=dev)
            t0 = time.perf_counter()
            resets, undone = txn.apply(rule, xs, y, sl, state_rows, width, batch=batch, logits=pre)
            if xs.is_cuda:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            m.head_update.labels(rule=rule_name).observe(dt)
            if resets:
                m.label_free_resets.labels(rule=rule_name).inc(resets)
            for i in ritems:
                if i.session in undone:  # not applied: an adapt fails alone; a predict keeps its predictions
                    if i.is_adapt:
                        results.pop(id(i), None)
                        i.future.set_exception(undone[i.session])
                    continue
                res = results[id(i)]
                labelled = sum(v >= 0 for v in ys[id(i)])
                correct = sum(bool(p.correct) for p in res.predictions)
                if ref_probs is not None and txn.guarded(i.session):
                    a, n = first_row[id(i)], len(i.job.inputs)
                    txn.observe(i.session, torch.stack(rows[id(i)]), ys[id(i)], probs[a:a + n], ref_probs[a:a + n])
                version = txn.commit(i.session, len(i.job.inputs), correct, labelled,
                                     actor=getattr(i.job, "actor", None))
                res.applied = len(i.job.inputs)
                if i.is_adapt:
                    res.version, res.update_seconds = version, dt
                    res.guard = txn.guard_outcome(i.session)
                    if i.job.idempotency:
                        res.latency_seconds = time.perf_counter() - i.enqueued
                        txn.remember(i.session, i.job.idempotency, res.to_record())
                m.prequential_correct.labels(rule=rule_name).inc(correct)
                m.prequential_total.labels(rule=rule_name).inc(labelled)
                m.adapted.labels(rule=rule_name).inc(len(i.job.inputs))

    def _admitted(self, txn, items: list[Pending], ys) -> list[Pending]:
        """The round's items a guard lets through: an adapt of a frozen session (or beyond its
        guard's size limit) fails alone; a frozen session's predict is answered without its update."""
        out = []
        for i in items:
            if id(i) in ys:
                err = txn.admit(i.session, len(i.job.inputs), adapt=i.is_adapt)
                if err is not None:
                    ys.pop(id(i))
                    if i.is_adapt:
                        i.future.set_exception(err)
                        continue
            out.append(i)
        return out

    # ---- predicts at a version ----------------------------------------------------------------

    def _versioned_jobs(self, items: list[Pending], rows, results) -> None:
        """Each job's materialised head (PredictJob.view) in one scratch head set, one forward."""
        dev = rows[id(items[0])][0].device
        # as wide as the sessions' pools: a solo predict at a version computes as the live one did
        C, d = max(width_for(len(i.job.view.classes)) for i in items), self.store.d
        W = torch.zeros(len(items), C, d, device=dev)
        b = torch.zeros(len(items), C, device=dev)
        for j, i in enumerate(items):
            v = i.job.view
            W[j, :len(v.classes)], b[j, :len(v.classes)] = v.W.to(dev), v.b.to(dev)
        n_classes = torch.tensor([len(i.job.view.classes) for i in items], dtype=torch.int64, device=dev)
        normalize = torch.tensor([i.job.view.normalize for i in items], dtype=torch.bool, device=dev)
        x = torch.stack([f for i in items for f in rows[id(i)]])
        sl = torch.tensor([j for j, i in enumerate(items) for _ in i.job.inputs], dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        probs = torch.softmax(kernels.head_forward(x, W, b, sl, n_classes, normalize=normalize).float(), dim=1).cpu()
        self.metrics.head_predict.observe(time.perf_counter() - t0)
        at, prob_rows = 0, probs.tolist()
        for i in items:
            v, n = i.job.view, len(i.job.inputs)
            results[id(i)] = PredictResult("session", v.session_id, v.version,
                                           _predictions(prob_rows[at:at + n], v.classes, i.job.top_k))
            at += n

    # ---- episodic jobs ----------------------------------------------------------------------

    def _episodic_jobs(self, items: list[Pending], rows, support, results) -> None:
        if not items:
            return
        specs: list[EpisodicSpec] = [i.episodic for i in items]
        dev = rows[id(items[0])][0].device
        C = max(len(s.classes) for s in specs)
        heads, state_rows = scratch_heads([(s.rule, s.hyper, len(s.classes), None) for s in specs], C,
                                          self.store.d, dev, learned=self.store.learned,
                                          source=self.store.source_stats)
        for step in range(max(s.steps for s in specs)):
            groups: dict[str, list[int]] = defaultdict(list)
            for j, s in enumerate(specs):
                if s.steps > step:
                    groups[s.rule.name].append(j)
            for idx in groups.values():
                rule = specs[idx[0]].rule
                xs = torch.stack([f for j in idx for f in support[id(items[j])]])
                y = torch.tensor([v for j in idx for v in specs[j].y], dtype=torch.int64, device=dev)
                sl = torch.tensor([j for j in idx for _ in specs[j].y], dtype=torch.int64, device=dev)
                sr = torch.tensor([state_rows[j] for j in idx for _ in specs[j].y], dtype=torch.int64, device=dev)
                t0 = time.perf_counter()
                rule.update(heads, xs, y, sl, sr if rule.state else None, batch=kernels.SlotBatch(sl))
                self.metrics.head_update.labels(rule=rule.name).observe(time.perf_counter() - t0)
        x = torch.stack([f for i in items for f in rows[id(i)]])
        sl = torch.tensor([j for j, i in enumerate(items) for _ in i.job.inputs], dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        logits = kernels.head_forward(x, heads.W, heads.b, sl, heads.n_classes, normalize=heads.normalize)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        self.metrics.head_predict.observe(time.perf_counter() - t0)
        at, prob_rows = 0, probs.tolist()
        for i, s in zip(items, specs):
            n = len(i.job.inputs)
            results[id(i)] = PredictResult("episodic", None, None, _predictions(prob_rows[at:at + n], s.classes,
                                                                                i.job.top_k))
            at += n


def _cache_key(tenant: Optional[str], key: Optional[str]) -> Optional[str]:
    return f"{tenant}|{key}" if key and tenant else key


def _inputs(item: Pending) -> list[Input]:
    return item.job.inputs + (item.job.support if item.episodic is not None else [])


def _label_indices(sess, labels: list) -> list[int]:
    """Adapt labels -> class indices; -1 for a missing label (label-free rules only)."""
    if sess.rule.needs_labels and any(lab is None for lab in labels):
        label_free = ", ".join(name for name, rule in RULES.items() if not rule.needs_labels)
        raise invalid("missing_label", f"rule {sess.rule.name!r} needs a label on every instance "
                      f"(the label-free rules are {label_free})")
    return [-1 if lab is None else sess.label_index(lab) for lab in labels]


def _predictions(probs: list[list[float]], classes: list[str], top_k: int) -> list[Prediction]:
    """probs rows (host lists; masked classes have probability 0) -> per row label, score and
    top-k. A stable sort: ties go to the lowest index; NaN ranks first, as in torch.sort."""
    n = len(classes)
    k = min(top_k, n)
    out = []
    for row in probs:
        row = row[:n]
        top = [Scored(classes[i], i, row[i]) for i in sorted(range(n), key=_rank_key(row), reverse=True)[:k]]
        out.append(Prediction(top[0].label, top[0].index, top[0].score, top))
    return out


def _rank_key(row: list[float]):
    if not any(map(math.isnan, row)):
        return row.__getitem__
    return lambda i: math.inf if math.isnan(row[i]) else row[i]

"""Dynamic micro-batching: one bounded queue for the predict and adapt jobs of all sessions,
one worker thread. Knows nothing of HTTP.

A micro-batch is up to ``max_batch_size`` rows, collected until ``max_wait_ms`` after its first
job was enqueued. Per micro-batch the worker runs

1. one backbone forward (``torch.inference_mode``; bf16 autocast on CUDA) over the rows whose
   features were not in the feature cache;
2. for session/base-head jobs, under the store lock, in *rounds*: a job's round is the number of
   adapt jobs of its session queued before it in this batch. Per round: one grouped
   ``head_forward`` over all its rows (predictions, and the pre-update predictions of adapts =
   prequential), then one grouped update call per rule. Jobs of different sessions share a
   round, so the common case is one forward and one update per rule; several adapts of one
   session in one batch become successive rounds, identical to sending them one at a time;
3. episodic jobs: a throw-away head per job, adapted on its support set (one call per rule per
   step) and one head_forward for all their queries.

Futures are ``concurrent.futures.Future``: the worker claims a job with
``set_running_or_notify_cancel``, so a job cancelled by its timeout is never applied.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

import kernels

from server.errors import ApiError, idempotency_reused, overloaded, session_not_found
from server.persistence import split_key
from server.rules import Heads, Rule

log = logging.getLogger("fwserve.batcher")


@dataclass
class Row:
    key: Optional[str]  # feature-cache key
    pixels: Optional[torch.Tensor] = None  # [C, H, W] when the features must be computed
    feats: Optional[torch.Tensor] = None  # [d] once known


@dataclass
class Episodic:
    rule: Rule
    hyper: dict[str, float]
    classes: list[str]
    support: list[Row]
    y: list[int]
    steps: int


@dataclass
class Job:
    kind: str  # "predict" | "adapt" | "episodic"
    rows: list[Row]
    session_id: Optional[str] = None
    labels: list = field(default_factory=list)  # adapt: names or indices, resolved per session
    top_k: int = 1
    episodic: Optional[Episodic] = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    idem: Optional[tuple[str, str]] = None  # adapt: (Idempotency-Key, request fingerprint)

    @property
    def n_rows(self) -> int:
        return len(self.rows) + (len(self.episodic.support) if self.episodic else 0)

    def all_rows(self) -> list[Row]:
        return self.rows + (self.episodic.support if self.episodic else [])


class Batcher:
    def __init__(self, backbone, store, cache, metrics, settings) -> None:
        self.backbone, self.store, self.cache, self.metrics = backbone, store, cache, metrics
        self.max_rows = settings.max_batch_size
        self.max_wait = settings.max_wait_ms / 1000.0
        self.max_queue = settings.max_queue_size
        self.retry_after = settings.retry_after_s
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.batches_started = 0  # micro-batches taken by the worker (for tests and debugging)

    # ---- producer side ----------------------------------------------------------------------

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stop:
                raise ApiError(503, "shutting_down", "the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise overloaded(self.retry_after)
            job.enqueued = time.perf_counter()
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job.future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fwserve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            while self._queue:
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))

    # ---- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            if not jobs:
                continue
            try:
                self.process(jobs)
            except Exception as e:  # a bug or a device error: fail this batch, keep serving
                if not isinstance(e, ApiError):
                    log.exception("micro-batch failed")
                    e = ApiError(500, "internal", f"batch failed: {type(e).__name__}: {e}")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _collect(self) -> Optional[list[Job]]:
        jobs: list[Job] = []
        rows, sessions = 0, set()
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop and not self._queue:  # stopping: the queue is drained first
                return None
            deadline = self._queue[0].enqueued + self.max_wait
            while True:
                if not self._queue:
                    left = deadline - time.perf_counter()
                    if left <= 0 or rows >= self.max_rows:
                        break
                    self._cond.wait(left)
                    if self._stop:
                        break
                    continue
                nxt = self._queue[0]
                new_session = nxt.session_id is not None and nxt.session_id not in sessions
                if jobs and (rows + nxt.n_rows > self.max_rows
                             or (new_session and len(sessions) >= self.store.S)):
                    break
                self._queue.popleft()
                if not nxt.future.set_running_or_notify_cancel():
                    continue  # timed out before it was served
                jobs.append(nxt)
                rows += nxt.n_rows
                if nxt.session_id is not None:
                    sessions.add(nxt.session_id)
            self.metrics.queue_depth.set(len(self._queue))
        return jobs

    def process(self, jobs: list[Job]) -> None:
        m = self.metrics
        self.batches_started += 1
        start = time.perf_counter()
        for job in jobs:
            m.queue_wait.observe(start - job.enqueued)
        m.batch_size.observe(sum(j.n_rows for j in jobs))
        m.batch_requests.observe(len(jobs))
        m.batch_sessions.observe(len({j.session_id for j in jobs if j.session_id is not None}))
        self._features([r for j in jobs for r in j.all_rows()])
        results: dict[int, dict] = {}
        self._session_jobs([j for j in jobs if j.kind != "episodic"], results)
        self._episodic_jobs([j for j in jobs if j.kind == "episodic"], results)
        for job in jobs:
            if job.future.done():
                continue
            res = results[id(job)]
            res.setdefault("latency_seconds", time.perf_counter() - job.enqueued)
            job.future.set_result(res)

    def _features(self, rows: list[Row]) -> None:
        todo: dict[str, list[Row]] = {}
        order: list[Row] = []
        for r in rows:
            if r.feats is not None:
                continue
            key = r.key or str(id(r))
            if key not in todo:
                todo[key] = []
                order.append(r)
            todo[key].append(r)
        for i in range(0, len(order), self.max_rows):
            chunk = order[i:i + self.max_rows]
            x = torch.stack([r.pixels for r in chunk])
            t0 = time.perf_counter()
            feats = self.backbone.features(x)
            if feats.is_cuda:
                torch.cuda.synchronize(feats.device)
            self.metrics.backbone_forward.observe(time.perf_counter() - t0)
            for r, f in zip(chunk, feats):
                f = f.clone()  # not a view into the batch: the cache keeps it
                for same in todo[r.key or str(id(r))]:
                    same.feats, same.pixels = f, None
                if r.key:
                    self.cache.put(r.key, f)

    # ---- session and base-head jobs -------------------------------------------------------

    def _session_jobs(self, jobs: list[Job], results: dict[int, dict]) -> None:
        if not jobs:
            return
        store = self.store
        with store.lock:
            found, missing = store.acquire(j.session_id for j in jobs if j.session_id)
            live, ys = [], {}
            first_of: dict[tuple[str, str], Job] = {}  # (session, Idempotency-Key) -> its first job here
            dups: list[tuple[Job, Job]] = []
            for job in jobs:
                if job.session_id in missing:
                    job.future.set_exception(session_not_found(split_key(job.session_id)[1]))
                    continue
                sess = found.get(job.session_id) if job.session_id else None
                if job.kind == "adapt":
                    try:
                        ys[id(job)] = _label_indices(sess, job.labels)
                    except ApiError as e:
                        job.future.set_exception(ApiError(e.status, e.code, f"{e.message} (session {sess.id!r})"))
                        continue
                    if job.idem and self._idempotent(job, sess, first_of, dups, results):
                        ys.pop(id(job), None)
                        continue
                elif sess is not None and sess.hyper.get("adapt_on_predict"):
                    ys[id(job)] = [-1] * len(job.rows)  # test-time adaptation on the predict's own instances
                live.append(job)
            rounds: dict[int, list[Job]] = defaultdict(list)
            n_adapts: dict[str, int] = defaultdict(int)
            for job in live:
                r = n_adapts[job.session_id] if job.session_id else 0
                rounds[r].append(job)
                if id(job) in ys:
                    n_adapts[job.session_id] += 1
            try:
                for r in sorted(rounds):
                    self._round(rounds[r], found, ys, results)
            except BaseException:
                store.abort()  # sessions changed but not logged are dropped from memory
                raise
            errors = store.flush()  # wal: logged (fsync / AOF) before anything is acknowledged
            for job in live:
                if job.session_id in errors and not job.future.done():
                    job.future.set_exception(errors[job.session_id])
                    results.pop(id(job), None)
            for dup, first in dups:
                if first.future.done():
                    dup.future.set_exception(first.future.exception())
                else:
                    results[id(dup)] = {**copy.deepcopy(results[id(first)]), "_replayed": True}

    def _idempotent(self, job: Job, sess, first_of, dups, results) -> bool:
        """An adapt with an Idempotency-Key seen before: answer the stored response (or join the
        same key's first job in this batch); True when the job needs no update of its own."""
        try:
            hit = self.store.idem_lookup(sess, job.idem)
        except ApiError as e:
            job.future.set_exception(e)
            return True
        if hit is not None:
            results[id(job)] = {**hit, "_replayed": True}
            return True
        first = first_of.get((job.session_id, job.idem[0]))
        if first is None:
            first_of[(job.session_id, job.idem[0])] = job
            return False
        if first.idem[1] != job.idem[1]:
            job.future.set_exception(idempotency_reused())
        else:
            dups.append((job, first))
        return True

    def _round(self, jobs: list[Job], found, ys, results) -> None:
        store, m = self.store, self.metrics
        x = torch.stack([row.feats for j in jobs for row in j.rows])
        slots_list = []
        for j in jobs:
            slot = found[j.session_id].slot if j.session_id else store.base_slot
            slots_list += [slot] * len(j.rows)
        slots = torch.tensor(slots_list, dtype=torch.int64, device=x.device)
        t0 = time.perf_counter()
        logits = store.forward(x, slots)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        m.head_predict.observe(time.perf_counter() - t0)

        at = 0
        by_rule: dict[str, list[Job]] = defaultdict(list)
        for j in jobs:
            p = probs[at:at + len(j.rows)]
            at += len(j.rows)
            if j.session_id is None:
                results[id(j)] = {"head": "base", "session_id": None, "version": None,
                                  "predictions": _predictions(p, store.base_classes, j.top_k)}
                continue
            sess = found[j.session_id]
            preds = _predictions(p, sess.classes, j.top_k)
            if j.kind == "predict":
                results[id(j)] = {"head": "session", "session_id": sess.id, "version": sess.version,
                                  "predictions": preds}
                if id(j) in ys:  # adapt_on_predict: the predictions above, then an unlabelled update
                    by_rule[sess.rule.name].append(j)
            else:
                for pred, y in zip(preds, ys[id(j)]):
                    pred["true_label"] = sess.classes[y] if y >= 0 else None
                    pred["correct"] = pred["index"] == y if y >= 0 else None
                results[id(j)] = {"session_id": sess.id, "predictions": preds}
                by_rule[sess.rule.name].append(j)

        for rule_name, rjobs in by_rule.items():
            rule = found[rjobs[0].session_id].rule
            xs = torch.stack([row.feats for j in rjobs for row in j.rows])
            y = torch.tensor([v for j in rjobs for v in ys[id(j)]], dtype=torch.int64, device=xs.device)
            sl = torch.tensor([found[j.session_id].slot for j in rjobs for _ in j.rows],
                              dtype=torch.int64, device=xs.device)
            rows_ = None
            if rule.state:
                rows_ = torch.tensor([found[j.session_id].state_row for j in rjobs for _ in j.rows],
                                     dtype=torch.int64, device=xs.device)
            t0 = time.perf_counter()
            resets = store.apply(rule, xs, y, sl, rows_)
            if xs.is_cuda:
                torch.cuda.synchronize(xs.device)
            dt = time.perf_counter() - t0
            m.head_update.labels(rule=rule_name).observe(dt)
            if resets:
                m.label_free_resets.labels(rule=rule_name).inc(resets)
            for j in rjobs:
                res = results[id(j)]
                labelled = sum(v >= 0 for v in ys[id(j)])
                correct = sum(bool(p.get("correct")) for p in res["predictions"])
                version = store.commit(found[j.session_id], len(j.rows), correct, labelled)
                if j.kind == "adapt":
                    res["version"] = version
                    res["update_seconds"] = dt
                res["applied"] = len(j.rows)
                if j.idem:
                    res["latency_seconds"] = time.perf_counter() - j.enqueued
                    store.remember(found[j.session_id], j.idem, res)
                m.prequential_correct.labels(rule=rule_name).inc(correct)
                m.prequential_total.labels(rule=rule_name).inc(labelled)
                m.adapted.labels(rule=rule_name).inc(len(j.rows))

    # ---- episodic jobs --------------------------------------------------------------------

    def _episodic_jobs(self, jobs: list[Job], results: dict[int, dict]) -> None:
        if not jobs:
            return
        heads, state_rows = _episodic_heads([j.episodic for j in jobs], self.store.d, jobs[0].rows[0].feats.device)
        dev = heads.W.device
        for step in range(max(j.episodic.steps for j in jobs)):
            groups: dict[str, list[int]] = defaultdict(list)
            for i, j in enumerate(jobs):
                if j.episodic.steps > step:
                    groups[j.episodic.rule.name].append(i)
            for idx in groups.values():
                rule = jobs[idx[0]].episodic.rule
                ep = [jobs[i].episodic for i in idx]
                xs = torch.stack([r.feats for e in ep for r in e.support])
                y = torch.tensor([v for e in ep for v in e.y], dtype=torch.int64, device=dev)
                sl = torch.tensor([i for i, e in zip(idx, ep) for _ in e.support], dtype=torch.int64, device=dev)
                sr = torch.tensor([state_rows[i] for i, e in zip(idx, ep) for _ in e.support],
                                  dtype=torch.int64, device=dev)
                t0 = time.perf_counter()
                rule.update(heads, xs, y, sl, sr if rule.state else None)
                self.metrics.head_update.labels(rule=rule.name).observe(time.perf_counter() - t0)
        x = torch.stack([r.feats for j in jobs for r in j.rows])
        sl = torch.tensor([i for i, j in enumerate(jobs) for _ in j.rows], dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        logits = kernels.head_forward(x, heads.W, heads.b, sl, heads.n_classes, normalize=heads.normalize)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        self.metrics.head_predict.observe(time.perf_counter() - t0)
        at = 0
        for j in jobs:
            p = probs[at:at + len(j.rows)]
            at += len(j.rows)
            results[id(j)] = {"head": "episodic", "session_id": None, "version": None,
                              "predictions": _predictions(p, j.episodic.classes, j.top_k)}


def _episodic_heads(specs: list[Episodic], d: int, device) -> tuple[Heads, list[int]]:
    """Zero-initialised throw-away heads, one slot per spec; state rows compact per rule."""
    E = len(specs)
    C = max(len(s.classes) for s in specs)
    from server.rules import PER_SLOT_HYPER

    heads = Heads(
        W=torch.zeros(E, C, d, device=device),
        b=torch.zeros(E, C, device=device),
        n_classes=torch.tensor([len(s.classes) for s in specs], dtype=torch.int64, device=device),
        normalize=torch.tensor([s.rule.normalize for s in specs], dtype=torch.bool, device=device),
        hyper={n: torch.tensor([float(s.hyper.get(n, v)) for s in specs], device=device)
               for n, v in PER_SLOT_HYPER.items()},
        pools={},
    )
    state_rows, per_rule = [], defaultdict(list)
    for i, s in enumerate(specs):
        state_rows.append(len(per_rule[s.rule.name]))
        per_rule[s.rule.name].append(i)
    for name, idx in per_rule.items():
        rule = specs[idx[0]].rule
        if not rule.state:
            continue
        pool = {k: torch.zeros((len(idx), *shape(C, d)), device=device) for k, shape in rule.state.items()}
        for row, i in enumerate(idx):
            init = rule.init_state(len(specs[i].classes), d, specs[i].hyper)
            for k, t in init.items():
                pool[k][row][tuple(slice(0, s) for s in t.shape)] = t.to(device)
        heads.pools[name] = pool
    return heads, state_rows


def _label_indices(sess, labels: list) -> list[int]:
    """Adapt labels -> class indices; -1 for a missing label (label-free rules only)."""
    if sess.rule.needs_labels and any(lab is None for lab in labels):
        raise ApiError(422, "missing_label", f"rule {sess.rule.name!r} needs a label on every instance "
                       "(the label-free rules are t3a and tent)")
    return [-1 if lab is None else sess.label_index(lab) for lab in labels]


def _predictions(probs: torch.Tensor, classes: list[str], top_k: int) -> list[dict]:
    """probs [B, C] (masked classes have probability 0) -> per row label, score and top-k."""
    n = len(classes)
    k = min(top_k, n)
    vals, idx = torch.sort(probs[:, :n], dim=1, descending=True, stable=True)  # ties: lowest index first
    vals, idx = vals[:, :k], idx[:, :k]
    out = []
    for v_row, i_row in zip(vals.tolist(), idx.tolist()):
        top = [{"label": classes[i], "index": i, "score": v} for v, i in zip(v_row, i_row)]
        out.append({**top[0], "top_k": top})
    return out

"""Dynamic micro-batching: one bounded queue for the jobs of all sessions, one worker thread.

A micro-batch is up to ``max_batch_size`` rows, collected until ``max_wait_ms`` after its oldest
job was enqueued, with at most as many distinct sessions as there are device slots. The worker
hands each micro-batch to the executor (server/engine/executor.py).

It starts sooner when nothing more is on its way: an event loop that submits a job promises to
``settle`` it once the loop has caught up with what it had in hand (the engine settles two loop
iterations later, so every request whose bytes had arrived has been decoded and submitted by
then). With every submitted job settled, waiting longer would only leave the CPU idle and the
clients waiting, so the batch starts; while a loop is still busy with more requests, it waits for
them (up to ``max_wait_ms``), which is what makes batches large under load.

Fair share: the queue keeps one line per tenant and takes jobs from the lines in turn (first in,
first out within a tenant, so a session's jobs keep their order). When the queue is full, a
tenant with fewer queued jobs than the longest line still gets in: the newest job of the
longest line is turned away instead (503, never started, never applied). One tenant's burst
therefore cannot starve the others.

Each job's answer is a ``Reply`` (server/engine/reply.py): the worker claims a job with
``set_running_or_notify_cancel``, so a job cancelled by its timeout is never applied, and after
every batch the answers reach their event loops with one wake-up per loop.

Who runs the batches (``on_loop``): the worker thread, or the event loop itself. On one core the
thread only competes with the loop that feeds it: every batch costs two thread hand-offs and a
fight for the interpreter lock, and a batch starts with what the loop had submitted by then. Run
on the loop, a batch starts when the last settle of what the loop had in hand comes round, so
every request that arrived while the previous batch ran joins the next one, and nothing is handed
between threads. The price is that the loop reads nothing while a batch runs, which a server on
one core pays anyway. ``max_wait_ms`` still bounds how long a loop that never catches up holds a
job back; no batch waits for more jobs than the loop has.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

from server.engine.messages import AdaptJob, EpisodicJob, Job
from server.engine.reply import Reply, deliver
from server.errors import DomainError, overloaded, shutting_down

log = logging.getLogger("fwserve.batcher")


@dataclass
class Pending:
    """A job in the queue, with what the engine resolved for it before queueing."""

    job: Job
    future: Reply = field(default_factory=Reply)
    enqueued: float = field(default_factory=time.perf_counter)
    episodic: Optional[object] = None  # EpisodicJob: the resolved head spec (executor.EpisodicSpec)

    @cached_property
    def session(self) -> Optional[str]:
        """The session whose slot the job uses (a predict at a version brings its own head); the
        batcher and the executor ask often, the job never changes."""
        if isinstance(self.job, EpisodicJob) or getattr(self.job, "view", None) is not None:
            return None
        return self.job.session

    @property
    def n_rows(self) -> int:
        return len(self.job.inputs) + (len(self.job.support) if isinstance(self.job, EpisodicJob) else 0)

    @property
    def is_adapt(self) -> bool:
        return isinstance(self.job, AdaptJob)


class Batcher:
    def __init__(self, run_batch: Callable[[list[Pending]], None], metrics, settings, max_sessions: int,
                 on_loop: bool = False) -> None:
        self.run_batch, self.metrics = run_batch, metrics
        self.on_loop = on_loop  # batches run on the event loop that settles, not on a worker thread
        self.max_rows = settings.max_batch_size
        self.max_wait = settings.max_wait_ms / 1000.0
        self.max_queue = settings.max_queue_size
        self.retry_after = settings.retry_after_s
        self.max_sessions = max_sessions
        self._lines: OrderedDict[Optional[str], deque[Pending]] = OrderedDict()  # tenant -> its jobs
        self._size = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.batches_started = 0  # micro-batches taken by the worker
        self._unsettled = 0  # submitted jobs whose loop has not caught up yet
        self._settling = False  # some submitter settles its jobs: the early start applies
        self._running = threading.Lock()  # on_loop: held by the loop running a batch (one at a time)

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue."""
        return self._size

    def submit(self, item: Pending, settles: bool = False) -> Reply:
        """Queue a job. `settles`: the caller calls ``settle()`` once for this job when its loop has
        caught up (see the module docstring); not when this raises."""
        tenant = item.job.tenant
        with self._cond:
            if self._stop:
                raise shutting_down()
            if self._size >= self.max_queue:
                self._make_room(tenant)
            item.enqueued = time.perf_counter()
            self._lines.setdefault(tenant, deque()).append(item)
            self._size += 1
            if settles:
                self._unsettled += 1
                self._settling = True
            self.metrics.queue_depth.set(self._size)
            self._cond.notify()
        return item.future

    def settle(self) -> None:
        """The loop that submitted a job (with ``settles``) has caught up with what it had in hand."""
        with self._cond:
            self._unsettled -= 1
            if not self._unsettled:
                self._cond.notify()
        if self.on_loop:
            self.run_on_loop()

    def run_on_loop(self) -> None:
        """on_loop: run what is queued as a micro-batch here, on the calling event loop, once every
        submitted job is settled or the oldest has waited ``max_wait_ms`` (a loop that never catches
        up still gets its batches). Jobs left over (beyond a batch's rows or slots) run after the
        loop's next iteration, with what arrives in it. Another loop already running a batch takes
        this loop's jobs too: it looks at the queue again when it is done."""
        if not self._size or not self._running.acquire(blocking=False):
            return
        try:
            with self._cond:
                if self._unsettled and time.perf_counter() < self._oldest() + self.max_wait:
                    return
            items = self._collect(wait=False)
            if items:
                self.batches_started += 1
                self._execute(items)
        finally:
            self._running.release()
        if self._size and not self._stop:
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.run_on_loop)  # after the next poll for requests

    def _oldest(self) -> float:
        return min(line[0].enqueued for line in self._lines.values()) if self._lines else float("inf")

    def _make_room(self, tenant) -> None:
        """The queue is full: turn away the newest job of the longest line if that line is longer
        than this tenant's, else this job."""
        mine = len(self._lines.get(tenant, ()))
        longest = max(self._lines, key=lambda t: len(self._lines[t]))
        if len(self._lines[longest]) <= mine + 1:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise overloaded(self.retry_after)
        shed = self._pop(longest, newest=True)
        self.metrics.rejected.labels(reason="fair_share").inc()
        if shed.future.set_running_or_notify_cancel():
            shed.future.set_exception(overloaded(self.retry_after, "the queue is full and other tenants are "
                                                 "waiting; retry later"))
            deliver([shed.future])

    def _pop(self, tenant, newest: bool = False) -> Pending:
        line = self._lines[tenant]
        item = line.pop() if newest else line.popleft()
        self._size -= 1
        if not line:
            del self._lines[tenant]
        return item

    def start(self) -> None:
        if self.on_loop:
            return
        self._thread = threading.Thread(target=self._run, name="fwserve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, let the worker drain the queue, fail what is left."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        elif self.on_loop and self._running.acquire(timeout=timeout):
            try:  # what is still queued runs here: its loops are stopping
                while items := self._collect(wait=False):
                    self.batches_started += 1
                    self._execute(items)
            finally:
                self._running.release()
        with self._cond:
            while self._lines:
                item = self._pop(next(iter(self._lines)))
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(shutting_down())
                    deliver([item.future])

    def _run(self) -> None:
        while True:
            items = self.next_batch()
            if items is None:
                return
            if not items:
                continue
            self.batches_started += 1
            self._execute(items)

    def _execute(self, items: list[Pending]) -> None:
        try:
            self.run_batch(items)
        except Exception as e:  # a bug or a device error: fail this batch, keep serving
            if not isinstance(e, DomainError):
                log.exception("micro-batch failed")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
        deliver(item.future for item in items)

    def next_batch(self) -> Optional[list[Pending]]:
        """The next micro-batch (waiting for jobs); None once stopped and drained. The worker's step."""
        return self._collect(wait=True)

    def _collect(self, wait: bool) -> Optional[list[Pending]]:
        """Jobs for one micro-batch. wait: for the first job, and for more until the deadline or
        every submitted job is settled; else only what is queued now (possibly nothing)."""
        items: list[Pending] = []
        rows, sessions = 0, set()
        with self._cond:
            while wait and not self._size and not self._stop:
                self._cond.wait()
            if self._stop and not self._size:  # stopping: the queue is drained first
                return None
            if not self._size:
                return items
            deadline = self._oldest() + self.max_wait
            full: set = set()  # tenants whose next job does not fit this batch
            while True:
                ready = [t for t in self._lines if t not in full]
                if not ready:
                    if not wait:
                        break
                    left = deadline - time.perf_counter()
                    if left <= 0 or rows >= self.max_rows or full:
                        break
                    if self._settling and not self._unsettled and items:  # nothing more is on its way
                        break
                    self._cond.wait(left)
                    if self._stop:
                        break
                    continue
                tenant = ready[0]
                nxt = self._lines[tenant][0]
                key = nxt.session
                new_session = key is not None and key not in sessions
                if items and (rows + nxt.n_rows > self.max_rows
                              or (new_session and len(sessions) >= self.max_sessions)):
                    full.add(tenant)
                    continue
                self._pop(tenant)
                if tenant in self._lines:  # its turn is over: to the back of the rota
                    self._lines.move_to_end(tenant)
                if not nxt.future.set_running_or_notify_cancel():
                    continue  # timed out before it was served
                items.append(nxt)
                rows += nxt.n_rows
                if key is not None:
                    sessions.add(key)
            self.metrics.queue_depth.set(self._size)
        return items

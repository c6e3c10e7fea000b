"""One job's answer slot: filled once by the batch worker, read by whoever asked.

A ``Reply`` behaves like the subset of ``concurrent.futures.Future`` the engine uses
(``set_running_or_notify_cancel``, ``set_result``, ``set_exception``, ``cancel``, ``done``,
``result``, ``exception``), with one difference that matters under load: an event loop waiting
on replies is woken once per micro-batch, not once per job. ``attach(loop)`` gives the asking
coroutine an asyncio future; the worker fills the replies of a batch and then ``deliver`` hands
all of a loop's answers over in a single ``call_soon_threadsafe``.

A job that is cancelled (its request timed out) before the worker starts it is never run; one
the worker has started always runs to its answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any, Iterable, Optional

QUEUED, RUNNING, DONE, CANCELLED = range(4)


class Reply:
    __slots__ = ("_lock", "_state", "_value", "_error", "_event", "_loop", "_waiter")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = QUEUED
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._event: Optional[threading.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._waiter: Optional[asyncio.Future] = None

    # ---- the asking side --------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """An asyncio future, on `loop`, that gets this reply's answer (delivered per batch)."""
        self._loop, self._waiter = loop, loop.create_future()
        return self._waiter

    def cancel(self) -> bool:
        """Drop a job the worker has not started: True if it will never run."""
        with self._lock:
            if self._state == QUEUED:
                self._state = CANCELLED
                return True
            return self._state == CANCELLED

    def done(self) -> bool:
        return self._state in (DONE, CANCELLED)

    def result(self, timeout: Optional[float] = None):
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._wait(timeout)
        return self._error

    def _wait(self, timeout: Optional[float]) -> None:
        with self._lock:
            if self._state == DONE:
                return
            if self._event is None:
                self._event = threading.Event()
        if not self._event.wait(timeout):
            raise TimeoutError("no reply in time")

    # ---- the worker's side ------------------------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        """The worker claims the job: False if it was cancelled (then it is skipped)."""
        with self._lock:
            if self._state != QUEUED:
                return False
            self._state = RUNNING
            return True

    def set_result(self, value) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value, error) -> None:
        with self._lock:
            if self._state == DONE:
                raise RuntimeError("a reply is answered once")
            self._value, self._error, self._state = value, error, DONE
            event = self._event
        if event is not None:
            event.set()


def deliver(replies: Iterable[Reply]) -> None:
    """Hand the answered replies of a batch to the event loops waiting on them: one wake-up per loop."""
    by_loop = defaultdict(list)
    for r in replies:
        if r._waiter is not None and r._state == DONE:
            by_loop[r._loop].append(r)
    try:
        here = asyncio.get_running_loop()  # batches run on the event loop (Batcher.on_loop)
    except RuntimeError:
        here = None
    for loop, rs in by_loop.items():
        if loop is here:  # no need to wake a loop that is running this
            loop.call_soon(_settle, rs)
            continue
        try:
            loop.call_soon_threadsafe(_settle, rs)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(replies: list[Reply]) -> None:
    for r in replies:
        w = r._waiter
        if w.done():  # the asking coroutine gave up
            continue
        if r._error is not None:
            w.set_exception(r._error)
        else:
            w.set_result(r._value)

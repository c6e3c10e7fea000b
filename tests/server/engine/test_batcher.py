"""The batch queue on its own (no model): micro-batches by rows and sessions, order kept within
a tenant, tenants served in turn, a full queue that still lets a quiet tenant in, and a batch
that starts once the loops that submitted its jobs have caught up; batches run on the event loop
itself (on_loop), and which runner `auto` picks."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.config import Settings
from server.engine.batcher import Batcher, Pending
from server.engine.messages import Input, PredictJob
from server.engine.metrics import Metrics
from server.errors import Unavailable


def job(tenant, session=None, rows=1) -> Pending:
    return Pending(PredictJob([Input(None, torch.zeros(1))] * rows, session=session, tenant=tenant))


def batcher(**kw) -> Batcher:
    s = Settings(**{"max_batch_size": 4, "max_wait_ms": 0.0, "max_queue_size": 6, **kw})
    return Batcher(lambda items: None, Metrics(), s, max_sessions=3)


def test_tenants_are_served_in_turn_and_in_order():
    b = batcher()
    a = [job("a", f"a{i}") for i in range(4)]
    c = [job("c", f"c{i}") for i in range(2)]
    for item in a + c:
        b.submit(item)
    first = b.next_batch()  # the worker's step, run here without its thread
    assert [i.job.session for i in first] == ["a0", "c0", "a1"]  # 3 sessions: the slot limit
    second = b.next_batch()
    assert [i.job.session for i in second] == ["c1", "a2", "a3"]


def test_a_full_queue_lets_a_quiet_tenant_in():
    b = batcher()
    burst = [job("loud") for _ in range(6)]
    for item in burst:
        b.submit(item)
    with pytest.raises(Unavailable):
        b.submit(job("loud"))  # the longest line itself: refused
    quiet = job("quiet")
    b.submit(quiet)  # the loud tenant's newest job makes room
    assert isinstance(burst[-1].future.exception(), Unavailable) and b.depth == 6
    assert not quiet.future.done()


def test_a_batch_starts_once_every_submitted_job_is_settled():
    """max_wait is an hour, yet the batch starts as soon as every submitted job is settled (the
    submitting loops have caught up); a job submitted before the last settle joins it, whichever
    thread gets there first."""
    b = batcher(max_wait_ms=3_600_000.0)
    first, second = job("a", "s1"), job("a", "s2")
    b.submit(first, settles=True)
    other_loop = threading.Thread(target=lambda: (b.submit(second, settles=True), b.settle(), b.settle()))
    other_loop.start()
    assert b.next_batch() == [first, second]
    other_loop.join()


def test_an_unsettled_job_never_holds_a_batch_past_its_deadline():
    b = batcher(max_wait_ms=0.0)
    item = job("a", "s1")
    b.submit(item, settles=True)  # its loop has not caught up (yet)
    assert b.next_batch() == [item]
    b.settle()
    later = job("a", "s2")
    b.submit(later)  # a submitter that does not settle: max_wait alone decides
    assert b.next_batch() == [later]


def test_rows_bound_a_batch():
    b = batcher()
    big, small = job("a", rows=3), job("b", rows=2)
    b.submit(big)
    b.submit(small)
    assert [i.n_rows for i in b.next_batch()] == [3]
    assert [i.n_rows for i in b.next_batch()] == [2]


def test_the_worker_drains_and_stops():
    seen = []
    done = threading.Event()
    s = Settings(max_batch_size=8, max_wait_ms=0.0)
    b = Batcher(lambda items: (seen.extend(items), [i.future.set_result(1) for i in items]), Metrics(), s, 4)
    items = [job("t") for _ in range(5)]
    for i in items:
        b.submit(i)
    b.start()
    b.stop()
    done.set()
    assert all(i.future.result(timeout=10) == 1 for i in items) and len(seen) == 5
    with pytest.raises(Unavailable):
        b.submit(job("t"))


# ---- batches run on the event loop (on_loop) ---------------------------------------------------


def loop_batcher(run_batch=None, **kw) -> tuple[Batcher, list]:
    """An on_loop batcher whose run_batch answers each job with its batch's number and records
    (thread, jobs) per batch."""
    batches: list = []

    def run(items):
        batches.append((threading.get_ident(), list(items)))
        if run_batch is not None:
            run_batch(items)
        for i in items:
            i.future.set_result(len(batches))

    s = Settings(**{"max_batch_size": 4, "max_wait_ms": 3_600_000.0, **kw})
    return Batcher(run, Metrics(), s, max_sessions=4, on_loop=True), batches


async def submit(b: Batcher, item: Pending):
    """What the engine does: submit, settle after the next loop iteration, wait for the answer."""
    loop = asyncio.get_running_loop()
    waiter = item.future.attach(loop)
    b.submit(item, settles=True)
    loop.call_soon(loop.call_soon, b.settle)
    return await waiter


def test_on_the_loop_the_jobs_of_one_iteration_make_one_batch_on_its_thread():
    b, batches = loop_batcher()
    b.start()  # starts no thread

    async def main():
        return threading.get_ident(), await asyncio.gather(*(submit(b, job("t", f"s{i}")) for i in range(3)))

    loop_thread, answers = asyncio.run(main())
    assert answers == [1, 1, 1] and len(batches) == 1 and b._thread is None
    assert batches[0][0] == loop_thread


def test_on_the_loop_jobs_beyond_a_batch_run_in_the_next_iterations():
    b, batches = loop_batcher()  # 4 rows per batch

    async def main():
        return await asyncio.gather(*(submit(b, job("t", f"s{i % 4}")) for i in range(10)))

    assert asyncio.run(main()) == [1] * 4 + [2] * 4 + [3] * 2
    assert [len(items) for _, items in batches] == [4, 4, 2]


def test_on_the_loop_a_loop_that_never_catches_up_still_gets_batches():
    """max_wait passed: the batch runs although a later job is not settled yet."""
    b, batches = loop_batcher(max_wait_ms=0.0)
    first, second = job("t", "s1"), job("t", "s2")
    b.submit(first, settles=True)
    b.submit(second, settles=True)
    b.settle()  # only the first is settled; no running loop is needed for a batch that empties the queue
    assert first.future.result(timeout=1) == 1 and second.future.result(timeout=1) == 1
    assert len(batches) == 1


def test_on_the_loop_an_unsettled_job_waits_within_max_wait():
    b, batches = loop_batcher()  # max_wait: an hour
    first, second = job("t", "s1"), job("t", "s2")
    b.submit(first, settles=True)
    b.submit(second, settles=True)
    b.settle()
    assert not batches and not first.future.done()
    b.settle()
    assert len(batches) == 1 and first.future.result(timeout=1) == second.future.result(timeout=1) == 1


def test_on_the_loop_a_cancelled_job_is_skipped_and_a_failed_batch_fails_alone():
    calls = []

    def run(items):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("device error")

    b, batches = loop_batcher(run_batch=run, max_batch_size=1)
    dropped, failing, fine = job("t", "s0"), job("t", "s1"), job("t", "s2")

    async def main():
        loop = asyncio.get_running_loop()
        waiter = dropped.future.attach(loop)
        b.submit(dropped, settles=True)
        dropped.future.cancel()  # timed out before its batch: never run
        b.settle()
        assert not waiter.done()
        waiter.cancel()
        return await asyncio.gather(submit(b, failing), submit(b, fine), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[0], RuntimeError) and out[1] == 2
    assert [items for _, items in batches] == [[failing], [fine]]


def test_on_the_loop_two_loops_never_run_batches_at_once():
    inside = threading.Lock()
    overlaps = []

    def run(items):
        if not inside.acquire(blocking=False):
            overlaps.append(items)
            return
        try:
            threading.Event().wait(0.001)
        finally:
            inside.release()

    b, batches = loop_batcher(run_batch=run)
    answers: list = []

    def one_loop(tag):
        async def main():
            return await asyncio.gather(*(submit(b, job(tag, f"{tag}{i % 3}")) for i in range(40)))
        answers.append(asyncio.run(main()))

    threads = [threading.Thread(target=one_loop, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not overlaps and len(answers) == 2 and all(len(a) == 40 for a in answers)
    assert sum(len(items) for _, items in batches) == 80


def test_on_the_loop_stop_runs_what_is_queued():
    b, batches = loop_batcher()
    items = [job("t", f"s{i}") for i in range(6)]
    for i in items:
        b.submit(i, settles=True)  # never settled: their loop is gone
    b.stop()
    assert [i.future.result(timeout=1) for i in items] == [1] * 4 + [2] * 2
    with pytest.raises(Unavailable):
        b.submit(job("t"))


@pytest.mark.parametrize("kw, device, expected", [
    ({"batch_runner": "loop"}, "cuda", True),
    ({"batch_runner": "thread"}, "cpu", False),
    ({}, "cpu", True),
    ({}, "cuda:0", False),
    ({"store": "redis://127.0.0.1:6379/0", "durability": "wal"}, "cpu", False),
    ({"durability": "wal"}, "cpu", False),
    ({"durability": "snapshot"}, "cpu", True),
    ({"api_workers": 2}, "cpu", False),
    ({"api_workers": 2, "batch_runner": "loop"}, "cpu", True),
])
def test_batch_runner_auto_takes_the_loop_only_for_one_cpu_core(kw, device, expected, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert Settings(**kw).batches_on_loop(device) is expected


def test_batch_runner_auto_keeps_the_thread_with_more_torch_threads_and_cores(monkeypatch):
    import os

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert Settings().batches_on_loop("cpu") is False
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert Settings().batches_on_loop("cpu") is True

"""The batch queue on its own (no model): micro-batches by rows and sessions, order kept within
a tenant, tenants served in turn, a full queue that still lets a quiet tenant in, and a batch
that starts once the loops that submitted its jobs have caught up."""

from __future__ import annotations

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

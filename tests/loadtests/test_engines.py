"""The open- and closed-loop engines against the stub API: scheduling, coordinated omission,
bounds, error counting."""

import asyncio
import time

import httpx
import numpy as np
import pytest

from loadtests import generator, scenarios
from loadtests.generator import run_closed, run_open, schedule, summarise


def _scenario(name="predict", sessions=0, **kw):
    pool = scenarios.ImagePool(synthetic=True)
    return scenarios.make(name, pool, scenarios.Options(sessions=sessions, **kw))


def _run(coro_fn, url, limit=256):
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=10.0,
                                     limits=httpx.Limits(max_connections=limit)) as http:
            return await coro_fn(http)

    return asyncio.run(go())


# --- schedules -------------------------------------------------------------------------------


def test_constant_schedule_spacing_and_bounds():
    offs = schedule("constant", 100.0, 1.0, 10_000)
    assert len(offs) == 100
    assert np.allclose(np.diff(offs), 0.01)
    assert offs[0] == 0.0 and offs[-1] < 1.0
    assert len(schedule("constant", 1000.0, 10.0, 25)) == 25  # the count bound wins


def test_poisson_schedule_mean_rate():
    offs = schedule("poisson", 200.0, 20.0, 1_000_000, seed=1)
    assert abs(len(offs) / 20.0 - 200.0) < 200.0 * 0.05
    gaps = np.diff(offs)
    assert abs(gaps.mean() - 1 / 200.0) < 0.05 / 200.0 * 20
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: CV = 1
    assert (offs < 20.0).all()


def test_burst_schedule_groups():
    offs = schedule("burst", 100.0, 1.0, 10_000, burst_size=10)
    vals, counts = np.unique(offs, return_counts=True)
    assert (counts == 10).all()
    assert np.allclose(np.diff(vals), 0.1)  # same mean rate: 10 per 0.1 s
    assert len(offs) == 100


def test_loopback_guard():
    for ok in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.0.0.5"):
        generator.check_loopback(ok)
    for bad in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError):
            generator.check_loopback(bad)


# --- open loop -------------------------------------------------------------------------------


def test_open_loop_constant_rate(stub):
    stub.reset(delay_s=0.005)
    sc = _scenario()
    t = time.monotonic()
    raw = _run(lambda h: run_open(sc, h, 50.0, 2.0, arrival="constant"), stub.url)
    assert time.monotonic() - t < 8
    lv = summarise(raw, "predict")
    assert lv["scheduled"] == 100 and lv["ok"] == 100 and lv["errors"] == {}
    assert 35 <= lv["throughput_rps"] <= 51
    assert lv["latency_ms"]["p50"] >= 5.0
    sent = [tx.sent for tx in raw.transactions]
    lags = [s - tx.scheduled for s, tx in zip(sent, raw.transactions)]
    assert np.median(lags) < 0.1  # sends leave on schedule (loose: the test machine may be busy)
    assert stub.state()['requests'] == 100


def test_open_loop_charges_a_stall_to_every_request_scheduled_during_it(stub):
    """No coordinated omission: a serial server stalls 0.6 s; at 50/s about 30 requests are
    scheduled during the stall and each must carry its wait from its schedule."""
    stub.reset(delay_s=0.001, serial=True, stall_after=15, stall_s=0.6)
    raw = _run(lambda h: run_open(_scenario(), h, 50.0, 1.5, arrival="constant"), stub.url)
    lv = summarise(raw, "predict")
    lat = np.array([tx.end - tx.scheduled for tx in raw.transactions])
    assert lv["ok"] == 75
    assert (lat > 0.15).sum() >= 15  # the queue behind the stall, not one slow request
    assert lv["latency_ms"]["p90"] > 150.0
    assert lv["latency_ms"]["max"] >= 550.0
    # the dispatcher kept to the schedule while the server stalled (it never waits for responses)
    lags = np.array([tx.sent - tx.scheduled for tx in raw.transactions])
    assert np.median(lags) < 0.1 and raw.max_send_lag < 0.3


def test_closed_loop_hides_the_same_stall(stub):
    """The contrast: a closed loop with one user waits out the stall and sends nothing meanwhile,
    so only one request looks slow."""
    stub.reset(delay_s=0.001, serial=True, stall_after=15, stall_s=0.6)
    raw = _run(lambda h: run_closed(_scenario(), h, 1, 1.5), stub.url)
    lat = np.array([tx.end - tx.scheduled for tx in raw.transactions])
    assert (lat > 0.1).sum() == 1
    assert summarise(raw, "predict")["latency_ms"]["p90"] < 50.0


def test_open_loop_drops_beyond_max_in_flight(stub):
    stub.reset(delay_s=0.3)
    raw = _run(lambda h: run_open(_scenario(), h, 50.0, 0.5, arrival="constant", max_in_flight=3), stub.url)
    lv = summarise(raw, "predict")
    assert lv["dropped"] > 0
    assert lv["sent"] + lv["dropped"] == lv["scheduled"] == 25
    assert stub.state()['peak_inflight'] <= 3


def test_open_loop_drain_bound_and_unfinished(stub):
    stub.reset(delay_s=5.0)
    t = time.monotonic()
    raw = _run(lambda h: run_open(_scenario(), h, 20.0, 0.3, arrival="constant", drain_s=0.3), stub.url)
    assert time.monotonic() - t < 2.0
    lv = summarise(raw, "predict")
    assert lv["unfinished"] == lv["scheduled"] == 6 and lv["ok"] == 0


def test_count_bound(stub):
    raw = _run(lambda h: run_open(_scenario(), h, 1000.0, 10.0, max_requests=12), stub.url)
    assert len(raw.transactions) == 12
    raw = _run(lambda h: run_closed(_scenario(), h, 4, 10.0, max_requests=9), stub.url)
    assert len(raw.transactions) == 9 and raw.elapsed < 3


def test_errors_by_status_and_transport(stub):
    stub.reset(error_every=4)
    raw = _run(lambda h: run_open(_scenario(), h, 200.0, 0.2, arrival="constant"), stub.url)
    lv = summarise(raw, "predict")
    assert lv["errors"] == {"503": 10} and lv["ok"] == 30
    # nothing listens on this port: every request is a transport error
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    raw = _run(lambda h: run_closed(_scenario(), h, 2, 0.2, max_requests=6), dead)
    lv = summarise(raw, "predict")
    assert lv["ok"] == 0 and lv["errors"] == {"ConnectError": 6}


# --- closed loop -----------------------------------------------------------------------------


def test_closed_loop_concurrency_and_throughput(stub):
    stub.reset(delay_s=0.05)
    raw = _run(lambda h: run_closed(_scenario(), h, 4, 1.0), stub.url)
    lv = summarise(raw, "predict")
    assert stub.state()['peak_inflight'] == 4
    assert 30 <= lv["throughput_rps"] <= 81  # at most 4 users / 50 ms
    assert lv["latency_ms"]["p50"] >= 50.0


def test_closed_loop_waves_move_in_lock_step(stub):
    stub.reset(delay_s=0.05)
    raw = _run(lambda h: run_closed(_scenario("burst"), h, 8, 0.3, waves=True), stub.url)
    txs = sorted(raw.transactions, key=lambda t: t.i)
    assert len(txs) % 8 == 0 and len(txs) >= 8
    waves = [txs[k:k + 8] for k in range(0, len(txs), 8)]
    for prev, nxt in zip(waves, waves[1:]):  # a wave starts only once the previous one is done
        assert min(t.scheduled for t in nxt) >= max(t.end for t in prev)

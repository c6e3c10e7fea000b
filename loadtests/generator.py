"""Open- and closed-loop load engines on asyncio + httpx, and a run over several levels.

Open loop: transaction i is *scheduled* at ``t0 + offset_i`` (constant spacing, Poisson, or
bursts) whatever the server does; the dispatcher never waits for responses, and latency is
``end - scheduled``, so a stall is charged to every request scheduled during it (no coordinated
omission). A send that leaves later than ``late_ms`` after its schedule is counted as late (the
client could not keep up; its latency still counts from the schedule). A send due while
``max_in_flight`` transactions are outstanding is dropped and counted.

Closed loop: ``concurrency`` workers each send, wait, send again; latency is ``end - send``.

Both stop scheduling at ``duration`` or ``max_requests``, whichever comes first, then wait at
most ``drain_s`` for outstanding requests; those still open are cancelled and counted as
``unfinished``. Every run is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlparse

import numpy as np

from loadtests import promscrape
from loadtests.report import latency_summary
from loadtests.scenarios import Call, Scenario

ARRIVALS = ("constant", "poisson", "burst")


@dataclass
class Transaction:
    i: int
    scheduled: float  # monotonic seconds; the send time in closed loop
    calls: list[Call] = field(default_factory=list)
    status: str = "ok"  # ok | http error status | dropped | unfinished | exception name

    @property
    def end(self) -> Optional[float]:
        return self.calls[-1].end if self.calls else None

    @property
    def sent(self) -> Optional[float]:
        return self.calls[0].start if self.calls else None


@dataclass
class LevelRaw:
    mode: str
    offered: float
    arrival: Optional[str]
    t0: float
    duration: float
    transactions: list[Transaction]
    late_sends: int = 0
    max_send_lag: float = 0.0
    elapsed: float = 0.0


# --- loopback guard --------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    """Refuse anything but a loopback target (127.0.0.0/8, ::1, localhost)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing non-loopback target {host!r}; load tests only target 127.0.0.1 / localhost "
                     "(pass --allow-remote to override)")


# --- schedules -------------------------------------------------------------------------------


def schedule(arrival: str, rate: float, duration: float, max_requests: int, seed: int = 0,
             burst_size: int = 32) -> np.ndarray:
    """Send offsets (seconds from the level's start) of an open-loop level, all < duration,
    at most max_requests of them."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    n_cap = min(max_requests, int(math.ceil(rate * duration)) + 1)
    if arrival == "constant":
        offs = np.arange(n_cap) / rate
    elif arrival == "poisson":
        rng = np.random.default_rng(seed)
        n = min(max_requests, int(rate * duration + 6 * math.sqrt(rate * duration) + 16))
        offs = np.cumsum(rng.exponential(1.0 / rate, size=n)) - 0.0
        offs = offs - offs[0] if len(offs) else offs  # first send at the start
    elif arrival == "burst":
        b = max(1, int(burst_size))
        period = b / rate
        n_bursts = int(math.ceil(duration / period)) + 1
        offs = np.repeat(np.arange(n_bursts) * period, b)
    else:
        raise ValueError(f"arrival must be one of {ARRIVALS}")
    return offs[offs < duration][:max_requests]


# --- engines ---------------------------------------------------------------------------------


class Progress:
    """Prints one line a second while a level runs (to stderr)."""

    def __init__(self, label: str, duration: float, enabled: bool = True, stream=None) -> None:
        self.label, self.duration, self.enabled = label, duration, enabled
        self.stream = stream or sys.stderr
        self.sent = self.done = self.errors = self.inflight = 0
        self._lat: list[float] = []

    def completed(self, tx: Transaction, latency: float) -> None:
        self.done += 1
        if tx.status != "ok":
            self.errors += 1
        self._lat.append(latency)

    async def run(self, t0: float) -> None:
        if not self.enabled:
            return
        last_done, last_t = 0, t0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            lat = sorted(self._lat)
            self._lat = []
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")
            rate = (self.done - last_done) / max(now - last_t, 1e-9)
            last_done, last_t = self.done, now
            print(f"[{self.label}] {min(now - t0, self.duration):5.1f}/{self.duration:g}s sent {self.sent} "
                  f"done {self.done} err {self.errors} in-flight {self.inflight} {rate:7.1f}/s "
                  f"p99(1s) {p99:7.1f} ms", file=self.stream, flush=True)


def _finish(tx: Transaction, calls: list[Call]) -> None:
    tx.calls = calls
    bad = next((c for c in calls if not c.ok), None)
    if bad is not None:
        tx.status = str(bad.status) if bad.status else (bad.error or "error")


async def run_open(scenario: Scenario, http, rate: float, duration: float, *, arrival: str = "constant",
                   max_requests: int = 100_000, max_in_flight: int = 1024, drain_s: float = 10.0,
                   late_ms: float = 10.0, seed: int = 0, progress: Optional[Progress] = None) -> LevelRaw:
    offs = schedule(arrival, rate, duration, max_requests, seed, scenario.opts.burst_size)
    prog = progress or Progress("open", duration, enabled=False)
    txs: list[Transaction] = []
    inflight: set[asyncio.Task] = set()
    late, max_lag = 0, 0.0

    async def one(tx: Transaction) -> None:
        try:
            _finish(tx, await scenario.step(http, tx.i))
        except asyncio.CancelledError:
            tx.status = "unfinished"
            raise
        except Exception as e:  # a scenario bug must not stop the level
            tx.status = type(e).__name__
        finally:
            prog.inflight -= 1
            if tx.end is not None and tx.status != "unfinished":
                prog.completed(tx, tx.end - tx.scheduled)

    t0 = time.monotonic() + 0.02
    ticker = asyncio.create_task(prog.run(t0))
    try:
        for i, off in enumerate(offs):
            when = t0 + float(off)
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tx = Transaction(i, when)
            txs.append(tx)
            if len(inflight) >= max_in_flight:
                tx.status = "dropped"
                continue
            lag = time.monotonic() - when
            max_lag = max(max_lag, lag)
            if lag * 1000.0 > late_ms:
                late += 1
            prog.sent += 1
            prog.inflight += 1
            task = asyncio.create_task(one(tx))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            _, pending = await asyncio.wait(set(inflight), timeout=max(0.0, t0 + duration + drain_s - time.monotonic()))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        ticker.cancel()
    elapsed = time.monotonic() - t0
    return LevelRaw("open", rate, arrival, t0, duration, txs, late, max_lag, elapsed)


async def run_closed(scenario: Scenario, http, concurrency: int, duration: float, *, max_requests: int = 100_000,
                     drain_s: float = 10.0, waves: bool = False, progress: Optional[Progress] = None) -> LevelRaw:
    """`waves`: the workers start each transaction together (a barrier per round): lock-step bursts."""
    prog = progress or Progress("closed", duration, enabled=False)
    txs: list[Transaction] = []
    counter = iter(range(max_requests))
    t0 = time.monotonic()
    deadline = t0 + duration

    async def do(i: int) -> None:
        tx = Transaction(i, time.monotonic())
        txs.append(tx)
        prog.sent += 1
        prog.inflight += 1
        try:
            _finish(tx, await scenario.step(http, i))
        except asyncio.CancelledError:
            tx.status = "unfinished"
            raise
        except Exception as e:
            tx.status = type(e).__name__
        finally:
            prog.inflight -= 1
            if tx.end is not None and tx.status != "unfinished":
                prog.completed(tx, tx.end - tx.scheduled)

    async def worker() -> None:
        while time.monotonic() < deadline:
            i = next(counter, None)
            if i is None:
                return
            await do(i)

    async def wave_loop() -> None:
        while time.monotonic() < deadline:
            ids = [i for i in (next(counter, None) for _ in range(concurrency)) if i is not None]
            if not ids:
                return
            await asyncio.gather(*(do(i) for i in ids))

    ticker = asyncio.create_task(prog.run(t0))
    try:
        coros = [wave_loop()] if waves else [worker() for _ in range(concurrency)]
        tasks = [asyncio.create_task(c) for c in coros]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        ticker.cancel()
    # transactions cut off by the drain limit never got calls; mark them
    for tx in txs:
        if tx.end is None and tx.status == "ok":
            tx.status = "unfinished"
    return LevelRaw("closed", concurrency, "waves" if waves else None, t0, duration, txs,
                    elapsed=time.monotonic() - t0)


# --- summarising -----------------------------------------------------------------------------


def summarise(raw: LevelRaw, scenario_name: str, images_per_step: int = 1) -> dict:
    """One level's client-side figures (see report.CSV_COLUMNS)."""
    txs = raw.transactions
    done = [t for t in txs if t.end is not None and t.status not in ("unfinished", "dropped")]
    ok = [t for t in done if t.status == "ok"]
    errors: dict[str, int] = {}
    for t in txs:
        if t.status != "ok":
            errors[t.status] = errors.get(t.status, 0) + 1
    calls = [c for t in done for c in t.calls]
    last_end = max((t.end for t in done), default=raw.t0 + raw.duration)
    span = max(last_end - raw.t0, raw.duration if not done else 1e-9)
    lat = [t.end - t.scheduled for t in done]
    ops: dict[str, dict] = {}
    for name in sorted({c.name for c in calls}):
        cs = [c for c in calls if c.name == name]
        s = latency_summary(c.end - c.start for c in cs)
        ops[name] = {"count": len(cs), "ok": sum(c.ok for c in cs), "service_ms": s}
    return {
        "scenario": scenario_name,
        "mode": raw.mode,
        "arrival": raw.arrival,
        "offered": raw.offered,
        "duration_s": raw.duration,
        "elapsed_s": raw.elapsed,
        "scheduled": len(txs),
        "sent": sum(1 for t in txs if t.status != "dropped"),
        "completed": len(done),
        "ok": len(ok),
        "errors": errors,
        "dropped": errors.get("dropped", 0),
        "unfinished": errors.get("unfinished", 0),
        "late_sends": raw.late_sends,
        "max_send_lag_ms": raw.max_send_lag * 1000.0,
        "throughput_rps": len(ok) / span,
        "requests_per_s": sum(c.ok for c in calls) / span,
        "images_per_s": len(ok) * images_per_step / span,
        "latency_ms": latency_summary(lat),
        "latencies_ms": [round(x * 1000.0, 3) for x in lat],
        "ops": ops,
    }


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a process so far (Linux /proc), None when unavailable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def scrape(http, timeout: float = 5.0) -> Optional[promscrape.Scrape]:
    try:
        r = await http.get("/metrics", timeout=timeout)
        if r.status_code != 200:
            return None
        return promscrape.parse(r.text)
    except Exception:
        return None


@dataclass
class RunConfig:
    url: str
    scenario: str
    mode: str  # open | closed
    levels: list[float]
    duration: float
    arrival: str = "constant"
    max_requests: int = 100_000
    max_in_flight: int = 1024
    drain_s: float = 10.0
    late_ms: float = 10.0
    warmup_s: float = 1.0
    pause_s: float = 0.0
    timeout_s: float = 30.0
    seed: int = 0
    progress: bool = True
    command: Optional[str] = None
    server_pid: Optional[int] = None  # for the server's CPU time per level (Linux /proc)


async def run_levels(cfg: RunConfig, scenario: Scenario, http=None, log: Callable[[str], None] = None) -> dict:
    """Setup, warm-up, then each level with a /metrics scrape before and after; -> the run dict."""
    import httpx

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    own = http is None
    if own:
        top = max(cfg.levels) if cfg.mode == "closed" else cfg.max_in_flight
        limits = httpx.Limits(max_connections=int(top) + 8, max_keepalive_connections=int(top) + 8)
        http = httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s, limits=limits)
    levels = []
    try:
        log(f"setup: {scenario.n_sessions} sessions for scenario {scenario.name}")
        await scenario.setup(http)
        if cfg.warmup_s > 0:
            c = int(cfg.levels[0]) if cfg.mode == "closed" else 4
            await run_closed(scenario, http, max(1, c), cfg.warmup_s, max_requests=cfg.max_requests,
                             drain_s=cfg.drain_s)
        for k, level in enumerate(cfg.levels):
            if k and cfg.pause_s > 0:
                await asyncio.sleep(cfg.pause_s)
            scenario.stats.clear()
            before = await scrape(http)
            cpu0 = time.process_time()
            srv_cpu0 = cpu_seconds(cfg.server_pid) if cfg.server_pid else None
            label = f"{scenario.name} " + (f"{level:g}/s" if cfg.mode == "open" else f"c={int(level)}")
            prog = Progress(label, cfg.duration, enabled=cfg.progress)
            if cfg.mode == "open":
                arrival = scenario.arrival or cfg.arrival
                raw = await run_open(scenario, http, float(level), cfg.duration, arrival=arrival,
                                     max_requests=cfg.max_requests, max_in_flight=cfg.max_in_flight,
                                     drain_s=cfg.drain_s, late_ms=cfg.late_ms, seed=cfg.seed + k, progress=prog)
            else:
                raw = await run_closed(scenario, http, int(level), cfg.duration, max_requests=cfg.max_requests,
                                       drain_s=cfg.drain_s, waves=scenario.arrival == "burst", progress=prog)
            after = await scrape(http)
            lv = summarise(raw, scenario.name, scenario.images_per_step)
            lv["server"] = promscrape.server_split(before, after) if before and after else None
            lv["extras"] = scenario.extras()
            lv["client_cpu_s"] = time.process_time() - cpu0
            srv_cpu1 = cpu_seconds(cfg.server_pid) if cfg.server_pid else None
            lv["server_cpu_s"] = srv_cpu1 - srv_cpu0 if srv_cpu0 is not None and srv_cpu1 is not None else None
            levels.append(lv)
            lat = lv["latency_ms"]
            log(f"[{label}] done: {lv['throughput_rps']:.1f}/s ok {lv['ok']} errors {lv['errors'] or 0} "
                f"p50 {lat['p50'] or float('nan'):.1f} ms p99 {lat['p99'] or float('nan'):.1f} ms")
    finally:
        try:
            await scenario.teardown(http)
        finally:
            if own:
                await http.aclose()
    return {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__} | {"scenario": scenario.name},
            "levels": levels, "finished_at": time.time()}

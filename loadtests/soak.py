"""Soak test: a long open-loop run at a fraction of measured capacity, reporting errors, latency
and the server's resident memory window by window.

    # against a server you started (RSS read from /proc/PID; without --pid, from /metrics if exported)
    python -m loadtests.soak --url http://127.0.0.1:8000 --pid 1234 --duration 600 --fraction 0.7
    # or let the soak start its own server (arguments after --server-args go to `fwserve serve`)
    python -m loadtests.soak --start-server --duration 600 --server-args --random-init

Capacity is the best throughput of a short closed-loop sweep (``--capacity`` skips it). The
scenario is prequential by default (predict + adapt on many sessions). Exit status 1 when
errors exceed ``--max-errors`` or resident memory grew more than ``--max-rss-growth-mb`` from
the first window to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx

from loadtests import generator, promscrape, scenarios
from loadtests.serverproc import ServerProcess, rss_bytes


async def measure_capacity(sc: scenarios.Scenario, http, concurrencies=(4, 16, 32), seconds: float = 3.0) -> float:
    best = 0.0
    for c in concurrencies:
        raw = await generator.run_closed(sc, http, c, seconds, drain_s=30.0)
        best = max(best, generator.summarise(raw, sc.name)["throughput_rps"])
    return best


async def soak(url: str, duration: float, fraction: float, window: float, scenario: str, sessions: Optional[int],
               capacity: Optional[float], pid: Optional[int], synthetic: bool = False, encoding: str = "array",
               log=None) -> dict:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    pool = scenarios.ImagePool(synthetic=synthetic, encoding=encoding)
    sc = scenarios.make(scenario, pool, scenarios.Options(sessions=sessions))
    limits = httpx.Limits(max_connections=1100, max_keepalive_connections=256)
    windows = []
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as http:
        await sc.setup(http)
        try:
            if capacity is None:
                log("measuring capacity (closed loop, concurrency 4, 16, 32)")
                capacity = await measure_capacity(sc, http)
            rate = max(0.5, capacity * fraction)
            log(f"capacity {capacity:.1f}/s -> soak at {rate:.1f}/s for {duration:g} s in {window:g} s windows")
            t_start = time.monotonic()
            k = 0
            while time.monotonic() - t_start < duration - 1e-6:
                w = min(window, duration - (time.monotonic() - t_start))
                before = await generator.scrape(http)
                raw = await generator.run_open(sc, http, rate, w, arrival="poisson", seed=k, drain_s=30.0)
                after = await generator.scrape(http)
                lv = generator.summarise(raw, sc.name, sc.images_per_step)
                rss = rss_bytes(pid) if pid else None
                if rss is None and after is not None:
                    v = after.get("process_resident_memory_bytes")
                    rss = int(v) if v > 0 else None
                srv = promscrape.server_split(before, after) if before and after else {}
                row = {"window": k, "t_end_s": round(time.monotonic() - t_start, 2), "offered_rps": rate,
                       "throughput_rps": lv["throughput_rps"], "ok": lv["ok"], "errors": lv["errors"],
                       "p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"],
                       "max_ms": lv["latency_ms"]["max"], "late_sends": lv["late_sends"],
                       "rss_mb": None if rss is None else rss / 2**20,
                       "sessions": srv.get("sessions"), "batch_size_mean": srv.get("batch_size_mean")}
                windows.append(row)
                log(f"[soak {row['t_end_s']:7.1f}s] {row['throughput_rps']:.1f}/s ok {row['ok']} "
                    f"errors {sum(row['errors'].values())} p99 {row['p99_ms'] or float('nan'):.1f} ms "
                    f"rss {row['rss_mb'] or float('nan'):.1f} MiB")
                k += 1
        finally:
            await sc.teardown(http)
    rss = [w["rss_mb"] for w in windows if w["rss_mb"] is not None]
    return {
        "config": {"url": url, "duration_s": duration, "fraction": fraction, "window_s": window,
                   "scenario": scenario, "capacity_rps": capacity},
        "windows": windows,
        "summary": {
            "requests_ok": sum(w["ok"] for w in windows),
            "errors": sum(sum(w["errors"].values()) for w in windows),
            "rss_first_mb": rss[0] if rss else None,
            "rss_last_mb": rss[-1] if rss else None,
            "rss_max_mb": max(rss) if rss else None,
            "rss_growth_mb": (rss[-1] - rss[0]) if rss else None,
            "p99_ms_worst_window": max((w["p99_ms"] or 0.0) for w in windows) if windows else None,
        },
    }


def to_markdown(result: dict) -> str:
    c, s = result["config"], result["summary"]
    lines = [f"### soak: {c['scenario']} at {c['fraction']:.0%} of {c['capacity_rps']:.1f}/s for {c['duration_s']:g} s", "",
             "| t (s) | offered/s | achieved/s | ok | errors | p50 ms | p99 ms | max ms | RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    for w in result["windows"]:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(w["errors"].items())) or "0"
        lines.append(f"| {w['t_end_s']:.0f} | {w['offered_rps']:.1f} | {w['throughput_rps']:.1f} | {w['ok']} | {errs} "
                     f"| {f(w['p50_ms'])} | {f(w['p99_ms'])} | {f(w['max_ms'])} | {f(w['rss_mb'])} |")
    lines += ["", f"{s['requests_ok']} ok, {s['errors']} errors; resident memory {f(s['rss_first_mb'])} -> "
              f"{f(s['rss_last_mb'])} MiB (max {f(s['rss_max_mb'])}, growth {f(s['rss_growth_mb'])})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None, help="server to soak (loopback); omit with --start-server")
    p.add_argument("--pid", type=int, help="server process id, for its resident memory")
    p.add_argument("--start-server", action="store_true", help="start a server (python -m server.cli serve)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--fraction", type=float, default=0.7, help="share of measured capacity to offer")
    p.add_argument("--capacity", type=float, help="transactions/s to take as capacity (skips measuring)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    p.add_argument("--scenario", default="prequential", choices=sorted(scenarios.SCENARIOS))
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--encoding", choices=("array", "png"), default="array")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--max-errors", type=int, default=0)
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="the rest of the command line goes to `fwserve serve` (with --start-server)")
    a = p.parse_args(argv)
    if not 0 < a.duration <= 24 * 3600 or not 0 < a.fraction <= 2 or a.window <= 0:
        p.error("--duration in (0, 86400], --fraction in (0, 2], --window > 0")
    srv = None
    try:
        if a.start_server:
            srv = ServerProcess(*a.server_args).start()
            url, pid = srv.url, srv.pid
        else:
            if not a.url:
                p.error("give --url or --start-server")
            generator.check_loopback(a.url)
            url, pid = a.url.rstrip("/"), a.pid
        result = asyncio.run(soak(url, a.duration, a.fraction, a.window, a.scenario, a.sessions, a.capacity, pid,
                                  a.synthetic, a.encoding))
    except ValueError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    finally:
        if srv is not None:
            srv.close()
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md, end="")
    s = result["summary"]
    failed = []
    if s["errors"] > a.max_errors:
        failed.append(f"{s['errors']} errors > {a.max_errors}")
    if s["rss_growth_mb"] is not None and s["rss_growth_mb"] > a.max_rss_growth_mb:
        failed.append(f"resident memory grew {s['rss_growth_mb']:.1f} MiB > {a.max_rss_growth_mb:g}")
    if failed:
        print("soak: FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("soak: passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

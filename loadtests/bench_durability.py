"""Adapt latency by durability mode, side by side in one run, through the real HTTP server.

    python -m loadtests.bench_durability [--requests 300] [--concurrency 16] [--redis auto|URL|off]

Per mode one in-process server (uvicorn, the bundled-config backbone shared by all) on a fresh
store: a closed loop of one client sending one-instance adapts to one session (latency
p50/p99: what one adapt costs), then `--concurrency` clients on as many sessions (throughput:
the log is appended once per micro-batch, so fsyncs are shared). Modes: none, snapshot,
wal with --no-fsync (survives a process crash, not a power loss), wal (directory, fsync), and
wal on Redis (appendonly yes, appendfsync always) when a redis-server binary or URL is there.
Features are cached after the first request, so the figures are the serving path without the
backbone forward.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def _serve(app):
    from server.threaded import ThreadedServer

    srv = ThreadedServer(app, log_level="error").start(120, why=lambda: app.state.engine.load_error)
    return srv.url, srv.stop


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_mode(backbone, name: str, root: Path, n: int, conc: int, **settings) -> dict:
    from server.api import create_app
    from server.config import Settings

    s = Settings(snapshot_dir=root / "store", max_wait_ms=1.0, warmup=False, **settings)
    url, stop = _serve(create_app(s, backbone=backbone))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28)).tolist() for _ in range(8)]
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "bench"})
            lat = []
            for i in range(n + 10):
                body = {"session_id": "bench", "instances": [{"array": images[i % 8], "label": "ab"[i % 2]}]}
                t0 = time.perf_counter()
                r = c.post("/v1/adapt", json=body)
                dt = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                if i >= 10:  # the first ones fill the feature cache
                    lat.append(dt)

        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                for k in range(conc):
                    await ac.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": f"c{k}"})

                async def one(k):
                    for i in range(n // conc):
                        body = {"session_id": f"c{k}", "instances": [{"array": images[i % 8], "label": "a"}]}
                        r = await ac.post("/v1/adapt", json=body)
                        assert r.status_code == 200, r.text

                t0 = time.perf_counter()
                await asyncio.gather(*(one(k) for k in range(conc)))
                return conc * (n // conc) / (time.perf_counter() - t0)

        rps = asyncio.run(many())
    finally:
        stop()
    return {"mode": name, "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * _pct(lat, 0.99),
            "mean_ms": 1e3 * statistics.fmean(lat), f"adapts_per_s_{conc}_clients": rps}


def _start_redis(workdir: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_durability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="adapts per mode (sequential and concurrent)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--redis", default="auto", help="auto (start redis-server if installed), a redis:// URL, or off")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON line per mode too")
    args = p.parse_args(argv)

    import torch

    from models import bundled_weights, load_backbone

    torch.set_num_threads(args.torch_threads)
    name = "fwserve-mnist-vit"
    backbone = load_backbone(name, random_init=bundled_weights(name) is None, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="fwserve-bench-"))
    redis_url, redis_proc = (None, None)
    if args.redis == "auto":
        redis_url, redis_proc = _start_redis(tmp)
    elif args.redis != "off":
        redis_url = args.redis
    modes = [("none", {}), ("snapshot", {"durability": "snapshot"}),
             ("wal, no fsync", {"durability": "wal", "fsync": False}),
             ("wal, fsync (directory)", {"durability": "wal"})]
    if redis_url:
        modes.append(("wal, redis appendfsync always", {"durability": "wal", "store": redis_url}))
    rows = []
    try:
        for i, (label, kw) in enumerate(modes):
            rows.append(run_mode(backbone, label, tmp / f"m{i}", args.requests, args.concurrency, **kw))
            print(f"  {label}: done", flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    key = f"adapts_per_s_{args.concurrency}_clients"
    print(f"\n| durability | adapt p50 (ms) | adapt p99 (ms) | adapts/s, {args.concurrency} clients |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r[key]:.0f} |")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Memory per session, and predict latency with many sessions resident.

    python -m loadtests.session_memory [--sessions 20000] [--slope 100000] [--compare-root DIR]
                                       [--json FILE]

1. server: a real `fwserve serve` (the bundled backbone, d = 128, float32 heads) holding N
   10-class sgd sessions, all on the device tier: (RSS after creating them over HTTP - RSS of
   an empty server at the default settings) / N, so memory reserved up front counts; with
   --history-versions 1 (the target counts no history), then again with the default history. With --compare-root, the same measurement of the server in
   another checkout (an earlier commit), side by side.
2. slope: the session store in a child process, sessions created directly, RSS and the slot
   pools' bytes read at four levels up to --slope sessions; the least-squares slope of RSS per
   session, the pools' bytes per session at the top level, and the extrapolation to 1M sessions, at d = 128 float32 and at d = 768 bfloat16 (the pools'
   bytes are what a GPU would hold; the rest stays in host memory).
3. latency: the engine in process with 100 and then --slope sessions resident on the device
   tier, predicts spread uniformly over them (features cached: the session-dependent part of a
   predict); p50 ratio.
History and idempotency records are not counted (none are made).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGET_KB = 10.0
MACHINE_BYTES = os.sysconf("SC_PHYS_PAGES") * PAGE
H200_BYTES = 141e9


def rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    total, frontier = 0, [pid]
    while frontier:
        p = frontier.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        frontier += [int(k) for k in kids]
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. a real server ----------------------------------------------------------------------------


async def _create(url: str, n: int, prefix: str, concurrency: int = 8) -> None:
    import httpx

    ids = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def worker():
            for i in ids:
                r = await c.post("/v1/sessions", json={"rule": "sgd", "classes": CLASSES, "id": f"{prefix}{i}"})
                if r.status_code not in (200, 201):
                    raise RuntimeError(r.text)
        await asyncio.gather(*(worker() for _ in range(concurrency)))


class _Server:
    def __init__(self, root: Path, limits: list[str]) -> None:
        import httpx

        port = _free_port()
        self.work = Path(tempfile.mkdtemp(prefix="fwserve-mem-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FWSERVE_")}
        env["PYTHONPATH"] = str(root)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--torch-threads", "1",
               "--log-level", "warning", "--snapshot-dir", str(self.work / "s"), *limits]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=open(self.work / "log", "wb"),
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the server did not start:\n" + (self.work / "log").read_text()[-2000:])
            time.sleep(0.3)
        asyncio.run(_create(self.url, 64, "warm"))  # the first requests allocate what any request needs

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def server_per_session(root: Path, n: int, extra: tuple[str, ...] = (), log=print) -> dict:
    """(RSS of a server holding n sessions - RSS of an empty server at the default settings) / n:
    what the sessions cost, including whatever the server reserves for them up front. `extra`:
    more flags for both servers."""
    import httpx

    empty_srv = _Server(root, list(extra))
    try:
        time.sleep(1.0)
        empty = rss(empty_srv.proc.pid)
    finally:
        empty_srv.stop()
    limit = str(n + 64)
    srv = _Server(root, ["--max-device-sessions", limit, "--max-sessions", limit, "--tenant-max-sessions", limit,
                         *extra])
    try:
        before = rss(srv.proc.pid)
        asyncio.run(_create(srv.url, n, "m"))
        time.sleep(1.0)
        full = rss(srv.proc.pid)
        tiers = httpx.get(srv.url + "/metrics").text
        on_device = sum(float(line.split()[-1]) for line in tiers.splitlines()
                        if line.startswith("fwserve_sessions{") and 'tier="device"' in line)
    finally:
        srv.stop()
    out = {"root": str(root), "flags": list(extra), "sessions": n, "rss_empty_default_mib": empty / 2**20,
           "rss_sized_before_mib": before / 2**20, "rss_full_mib": full / 2**20,
           "kb_per_session": (full - empty) / n / 1000, "on_device": on_device}
    log(f"server ({root}{' ' + ' '.join(extra) if extra else ''}): empty at the defaults {out['rss_empty_default_mib']:.0f} MiB; sized for {n} sessions "
        f"{out['rss_sized_before_mib']:.0f} MiB before and {out['rss_full_mib']:.0f} MiB after creating them: "
        f"{out['kb_per_session']:.2f} KB per session ({on_device:.0f} on the device tier)")
    return out


# ---- 2. the slope, in a child process -------------------------------------------------------------

_SLOPE = r"""
import json, sys, gc, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from loadtests.session_memory import rss
from server.config import Settings
from server.sessions import SessionStore
n, d, dtype = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = Settings(snapshot_dir=Path(sys.argv[5]), max_device_sessions=n + 16, max_sessions=n + 16,
             tenant_max_sessions=n + 16, head_dtype=dtype, history_versions=1)
store = SessionStore(s, d, torch.zeros(5, d), torch.zeros(5), [str(i) for i in range(5)], "cpu", "mem")
classes = [str(i) for i in range(10)]
points, made = [], 0
for level in (n // 4, n // 2, 3 * n // 4, n):
    while made < level:
        store.create("sgd", classes, {}, session_id=f"m{made}")
        made += 1
    gc.collect()
    points.append((made, rss(__import__("os").getpid()), store.pool.nbytes(), store.counts()["device"]))
print(json.dumps(points))
"""


def _fit(points: list[tuple[int, int]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def slope(n: int, d: int, dtype: str, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", _SLOPE, str(ROOT), str(n), str(d), dtype, tmp], capture_output=True,
                           text=True, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    points = json.loads(r.stdout.strip().splitlines()[-1])
    total = _fit([(m, b) for m, b, _, _ in points])
    # the pools' bytes at the top level over its sessions: with the unused tail a grown pool holds
    # (on a GPU that memory is allocated; on the host untouched rows are not resident)
    device = points[-1][2] / points[-1][0]
    out = {"d": d, "head_dtype": dtype, "points": points, "bytes_per_session": total,
           "device_bytes_per_session": device, "host_bytes_per_session": total - device,
           "million_gib": 1e6 * total / 2**30, "million_device_gb": 1e6 * device / 1e9,
           "million_host_gib": 1e6 * (total - device) / 2**30}
    log(f"slope d={d} {dtype}: {total / 1000:.2f} KB per session ({device / 1000:.2f} KB slot pools + "
        f"{(total - device) / 1000:.2f} KB host), 1M sessions -> {out['million_gib']:.1f} GiB "
        f"(pools {out['million_device_gb']:.1f} GB, host {out['million_host_gib']:.1f} GiB); all "
        f"{points[-1][3]} on the device tier")
    return out


# ---- 3. latency with many resident ---------------------------------------------------------------


def latency(many: int, log=print) -> dict:
    import torch

    from loadtests.gpu_check import _predict_latencies
    from models import load_backbone
    from server.config import Settings
    from server.engine import Engine, Input

    torch.set_num_threads(1)
    bb = load_backbone("fwserve-mnist-vit", random_init=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(snapshot_dir=Path(tmp) / "s", max_device_sessions=many + 16, max_sessions=many + 16,
                            tenant_max_sessions=many + 16, warmup=False, max_wait_ms=0.5, device="cpu")
        engine = Engine(settings, backbone=bb)
        engine.start()
        if not engine.wait_loaded(300):
            raise RuntimeError(engine.load_error)
        try:
            x = Input("img:resident-probe", torch.zeros(1, 28, 28))
            made = 0
            for level in (100, many):
                while made < level:
                    engine.store.create("sgd", CLASSES, {}, session_id=f"r{made}")
                    made += 1
                lat = asyncio.run(_predict_latencies(engine, x, made, 400))
                out[level] = {"p50_ms": 1e3 * statistics.median(lat),
                              "p99_ms": 1e3 * sorted(lat)[int(0.99 * len(lat))],
                              "device": engine.store.counts()["device"]}
        finally:
            engine.stop()
    out["p50_ratio"] = out[many]["p50_ms"] / out[100]["p50_ms"]
    log(f"predict p50 with {many} vs 100 resident: {out[many]['p50_ms']:.3f} vs {out[100]['p50_ms']:.3f} ms "
        f"= {out['p50_ratio']:.2f}x (target <= 1.5x)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.session_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20_000, help="sessions in the real server")
    p.add_argument("--slope", type=int, default=100_000, help="sessions at the top of the slope and latency runs")
    p.add_argument("--compare-root", type=Path, help="another checkout to measure the same way (e.g. an earlier commit)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: server, slope, latency")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"command": "python -m loadtests.session_memory " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "server" not in skip:
        # the target counts no history: without a log, each session's version history (predict at
        # a version, rollback) is kept in memory, measured on its own next
        res["server"] = server_per_session(ROOT, args.sessions, ("--history-versions", "1"))
        res["server_default_history"] = h = server_per_session(ROOT, args.sessions)
        print(f"the in-memory version history (--history-versions 64, the default) adds "
              f"{h['kb_per_session'] - res['server']['kb_per_session']:.2f} KB per new session")
        if args.compare_root:
            res["server_compare"] = server_per_session(args.compare_root.resolve(), args.sessions)
            print(f"ratio: {res['server']['kb_per_session'] / res['server_compare']['kb_per_session']:.2f}x the "
                  "compared checkout's memory per session")
        print(f"target <= {TARGET_KB} KB per 10-class sgd session at d=128 float32: "
              f"{'met' if res['server']['kb_per_session'] <= TARGET_KB else 'MISSED'}")
    if "slope" not in skip:
        res["slope_d128_fp32"] = s128 = slope(args.slope, 128, "float32")
        res["slope_d768_bf16"] = s768 = slope(args.slope, 768, "bfloat16")
        print(f"1M sessions at d=128 float32: {s128['million_gib']:.1f} GiB of this machine's "
              f"{MACHINE_BYTES / 2**30:.1f} GiB ({'fits' if 1e6 * s128['bytes_per_session'] < MACHINE_BYTES else 'does NOT fit'})")
        print(f"1M sessions at d=768 bfloat16: {s768['million_device_gb']:.1f} GB of slot pools on one H200's "
              f"{H200_BYTES / 1e9:.0f} GB ({'fits' if 1e6 * s768['device_bytes_per_session'] < H200_BYTES else 'does NOT fit'}),"
              f" {s768['million_host_gib']:.1f} GiB of host memory beside it")
    if "latency" not in skip:
        res["latency"] = latency(args.slope)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving benchmark, side by side in one run: fwserve vs a plain baseline server vs two floors.

    python -m loadtests.serving_bench [--duration 8] [--repeats 3] [--json FILE] [--markdown FILE]

Servers (each started here, pinned to core 0 with taskset; the load generator is this process,
pinned to core 1):
    fwserve            fwserve serve --torch-threads 1 (dynamic batching)
    fwserve-bs1        the same with --max-batch-size 1
    fwserve-workers2   the same with --api-workers 2
    baseline           loadtests/baseline_server.py: FastAPI, one request at a time, per-session
                       nn.Linear + autograd + torch.optim.SGD, the same backbone and preprocessing
    http-floor         loadtests/echo_server.py: uvicorn and a bare app that reads the body and
                       answers a fixed JSON (what HTTP alone costs in Python)
and the model floor: the bundled backbone in-process, per image at its best batch size (also on
core 0, one thread).

A transaction is: predict one (or 8) real MNIST digits on a session, then adapt that session on
the same images with their labels; 64 sgd sessions; closed loop at concurrency 8 and 32; JSON
bodies with base64 PNGs, identical bytes for every server; every image made unique per
transaction by a seeded perturbation of a few pixels, so the feature cache helps only where a
real client would benefit (the adapt of the images just predicted).

Per level: server CPU per transaction, counted over the server's whole process tree from /proc
(utime + stime of every descendant), cross-checked against the machine's busy time minus this
process's; transactions/s; p50 and p99 of a transaction; fwserve's mean micro-batch rows and
feature-cache hit rate from /metrics. Repeats alternate the servers; a figure is the median of
the repeats with their range. A level is marked invalid when the load generator's core was over
80% busy (it, not the server, was the limit). The ratios of the targets are printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]
SESSIONS = 64
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CORE, CLIENT_CORE = 0, 1
WARMUP = 1.5  # seconds of load before each level's counters are read


# ---- requests ------------------------------------------------------------------------------------


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real MNIST digits (uint8 28x28) and labels, each made unique by a seeded perturbation."""
    try:
        from models.data import mnist_splits

        split = mnist_splits()["held_out"]
        base_x, base_y = split.images, split.labels
    except Exception:  # without the data extra: seeded strokes
        rng = np.random.default_rng(seed)
        base_x = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
        base_y = rng.integers(0, 10, 100)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base_x), n)
    xs = base_x[idx].copy()
    r, c = rng.integers(0, 28, (n, 4)), rng.integers(0, 28, (n, 4))
    for i in range(n):
        xs[i, r[i], c[i]] = rng.integers(0, 256, 4)
    return xs, np.asarray(base_y)[idx]


def png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def transactions(n: int, images: int, seed: int) -> list[tuple[bytes, bytes]]:
    """n predict-then-adapt pairs, every image unique; the same seed gives the same bytes."""
    xs, ys = digits(n * images, seed)
    out = []
    for t in range(n):
        sid = f"bench-{t % SESSIONS}"
        imgs = [png_b64(x) for x in xs[t * images:(t + 1) * images]]
        labels = [str(int(y)) for y in ys[t * images:(t + 1) * images]]
        pred = json.dumps({"session_id": sid, "instances": [{"image": i} for i in imgs]}).encode()
        adapt = json.dumps({"session_id": sid, "instances": [{"image": i, "label": y}
                                                             for i, y in zip(imgs, labels)]}).encode()
        out.append((http_request("/v1/predict", pred), http_request("/v1/adapt", adapt)))
    return out


# ---- a lean HTTP/1.1 client (the load generator must cost little) ---------------------------------


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> "Conn":
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def call(self, raw: bytes) -> int:
        self.w.write(raw)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.r.readexactly(length)
        return status

    def close(self) -> None:
        self.w.close()


# ---- CPU accounting from /proc -------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """Seconds of CPU used by a process and every descendant alive now (plus the children it reaped)."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(d)], stats[int(d)] = int(fields[1]), fields
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        tree.update(kids)
        frontier += kids
    total = 0
    for p in tree:
        f = stats.get(p)
        if f:
            total += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if p == pid else 0)
    return total / TICK


def machine_busy() -> tuple[float, float]:
    """(seconds busy over all cores, seconds busy on the client core) since boot."""
    busy_all, busy_client = 0.0, 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        v = [int(x) for x in vals]
        busy = (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait
        busy_all += busy
        if name == f"cpu{CLIENT_CORE}":
            busy_client = busy
    return busy_all, busy_client


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Spec:
    name: str
    cmd: list[str]
    sessions: bool = True
    metrics: bool = False


def specs() -> list[Spec]:
    py = sys.executable
    fw = [py, "-m", "server.cli", "serve", "--torch-threads", "1", "--log-level", "warning"]
    return [
        Spec("fwserve", fw, metrics=True),
        Spec("fwserve-bs1", fw + ["--max-batch-size", "1"], metrics=True),
        Spec("fwserve-workers2", fw + ["--api-workers", "2"], metrics=True),
        Spec("baseline", [py, "-m", "loadtests.baseline_server", "--torch-threads", "1", "--device", "cpu"]),
        Spec("http-floor", [py, "-m", "loadtests.echo_server"], sessions=False),
    ]


class Running:
    def __init__(self, spec: Spec, work: Path) -> None:
        self.spec, self.port = spec, free_port()
        self.log = work / f"{spec.name}-{self.port}.log"
        args = spec.cmd + ["--port", str(self.port)]
        if spec.name.startswith("fwserve"):
            args += ["--snapshot-dir", str(work / f"snap-{self.port}")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env = {k: v for k, v in env.items() if not k.startswith("FWSERVE_")}
        self.proc = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), *args], cwd=ROOT, env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        path = "/v2/health/ready" if self.spec.name != "http-floor" else "/"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.spec.name} did not start:\n" + self.log.read_text()[-2000:])

    def create_sessions(self) -> None:
        import httpx

        if not self.spec.sessions:
            return
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30) as c:
            for i in range(SESSIONS):
                r = c.post("/v1/sessions", json={"rule": "sgd", "classes": CLASSES, "id": f"bench-{i}"})
                assert r.status_code in (200, 201), r.text

    def scrape(self) -> dict:
        import httpx

        if not self.spec.metrics:
            return {}
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        out = {}
        for name in ("fwserve_batch_size_sum", "fwserve_batch_size_count", "fwserve_feature_cache_hits_total",
                     "fwserve_feature_cache_misses_total"):
            out[name] = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                            or line.startswith(name + "{"))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- one level -----------------------------------------------------------------------------------


@dataclass
class Level:
    server: str
    images: int
    concurrency: int
    transactions: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    crosscheck_cpu: float = 0.0
    client_core_busy: float = 0.0
    latencies: list = field(default_factory=list)
    batch_rows: Optional[float] = None
    cache_hit_rate: Optional[float] = None
    errors: int = 0
    wrapped: bool = False
    repeat: int = 0

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.server_cpu / self.transactions if self.transactions else float("nan")

    @property
    def valid(self) -> bool:
        return self.client_core_busy <= 0.8 and self.errors == 0 and self.transactions > 0 and not self.wrapped


async def drive(port: int, txs: list, concurrency: int, seconds: float, warmup: float) -> tuple[int, list, int, bool]:
    conns = [await Conn(port).open() for _ in range(concurrency)]
    nxt = [0]
    state = {"measure": False, "stop": False, "done": 0, "errors": 0}
    lat: list[float] = []

    async def user(conn: Conn) -> None:
        while not state["stop"]:
            i = nxt[0] % len(txs)
            nxt[0] += 1
            t0 = time.perf_counter()
            s1 = await conn.call(txs[i][0])
            s2 = await conn.call(txs[i][1])
            if state["measure"]:
                state["done"] += 1
                lat.append(time.perf_counter() - t0)
                if s1 != 200 or s2 != 200:
                    state["errors"] += 1

    tasks = [asyncio.create_task(user(c)) for c in conns]
    await asyncio.sleep(warmup)
    state["measure"] = True
    await asyncio.sleep(seconds)
    state["measure"] = False
    state["stop"] = True
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return state["done"], lat, state["errors"], nxt[0] > len(txs)


def run_level(srv: Running, images: int, concurrency: int, seconds: float, txs: list) -> Level:
    lv = Level(srv.spec.name, images, concurrency)
    m0 = srv.scrape()
    warmup = WARMUP
    # counters are read around the measured part only: drive() waits out the warm-up first
    loop = asyncio.new_event_loop()

    async def measured():
        task = asyncio.create_task(drive(srv.port, txs, concurrency, seconds, warmup))
        await asyncio.sleep(warmup)
        c0, b0, s0, t0 = tree_cpu(srv.proc.pid), machine_busy(), self_cpu(), time.perf_counter()
        out = await task
        return out, (c0, b0, s0, t0)

    (done, lat, errors, wrapped), (c0, b0, s0, t0) = loop.run_until_complete(measured())
    c1, b1, s1, t1 = tree_cpu(srv.proc.pid), machine_busy(), self_cpu(), time.perf_counter()
    loop.close()
    m1 = srv.scrape()
    lv.transactions, lv.latencies, lv.errors, lv.seconds = done, lat, errors, t1 - t0
    # images seen again would be answered from the feature cache: only a cacheless server may wrap
    lv.wrapped = wrapped and srv.spec.sessions
    lv.server_cpu = c1 - c0
    lv.crosscheck_cpu = (b1[0] - b0[0]) - (s1 - s0)
    lv.client_core_busy = (b1[1] - b0[1]) / max(1e-9, t1 - t0)
    if m1:
        n = m1["fwserve_batch_size_count"] - m0["fwserve_batch_size_count"]
        lv.batch_rows = (m1["fwserve_batch_size_sum"] - m0["fwserve_batch_size_sum"]) / n if n else None
        hits = m1["fwserve_feature_cache_hits_total"] - m0["fwserve_feature_cache_hits_total"]
        miss = m1["fwserve_feature_cache_misses_total"] - m0["fwserve_feature_cache_misses_total"]
        lv.cache_hit_rate = hits / (hits + miss) if hits + miss else None
    return lv


def backbone_floor() -> dict:
    """ms per image of the bundled backbone in-process, one thread, on the server core, per batch size."""
    code = r"""
import json, time, torch
torch.set_num_threads(1)
from models import bundled_weights, load_backbone
bb = load_backbone("fwserve-mnist-vit", random_init=bundled_weights("fwserve-mnist-vit") is None)
out = {}
for b in (1, 2, 4, 8, 16, 32, 64):
    x = torch.rand(b, 1, 28, 28)
    for _ in range(5): bb.features(x)
    n = max(4, 400 // b); t0 = time.perf_counter()
    for _ in range(n): bb.features(x)
    out[b] = 1000 * (time.perf_counter() - t0) / (n * b)
print(json.dumps(out))
"""
    r = subprocess.run(["taskset", "-c", str(SERVER_CORE), sys.executable, "-c", code], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


# ---- the run -------------------------------------------------------------------------------------

PLAN = {  # server -> levels (images per request, concurrency)
    "fwserve": [(1, 8), (1, 32), (8, 8), (8, 32)],
    "baseline": [(1, 8), (1, 32), (8, 8), (8, 32)],
    "fwserve-bs1": [(1, 32)],
    "fwserve-workers2": [(1, 8), (1, 32)],
    "http-floor": [(1, 8), (8, 8)],
}


def run(duration: float, repeats: int, servers: Optional[list[str]] = None, log=print) -> dict:
    os.sched_setaffinity(0, {CLIENT_CORE})
    work = Path(tempfile.mkdtemp(prefix="fwserve-bench-"))
    chosen = [s for s in specs() if servers is None or s.name in servers]
    # one set of transactions per level, so no level meets images an earlier level cached; sized
    # for the fastest fwserve level seen on two cores with room to spare (a level that runs out is
    # marked invalid rather than served from the cache)
    levels_needed = sorted({lvl for s in chosen for lvl in PLAN[s.name]})
    budget = lambda images: int((duration + WARMUP) * (900 if images == 1 else 150))
    txs = {lvl: transactions(budget(lvl[0]), lvl[0], seed=1000 * lvl[0] + lvl[1]) for lvl in levels_needed}
    levels: list[Level] = []
    try:
        floor = backbone_floor()
        log(f"backbone in-process, ms per image by batch size: { {k: round(v, 3) for k, v in floor.items()} }")
        for rep in range(repeats):
            order = chosen if rep % 2 == 0 else list(reversed(chosen))  # alternate: drift hits every server
            for spec in order:
                srv = Running(spec, work)
                try:
                    srv.wait_ready()
                    srv.create_sessions()
                    for images, conc in PLAN[spec.name]:
                        lv = run_level(srv, images, conc, duration, txs[(images, conc)])
                        lv.repeat = rep
                        levels.append(lv)
                        log(f"rep {rep} {spec.name:17s} {images} img c={conc:2d}: {lv.tps:7.1f} tx/s "
                            f"{lv.cpu_ms:6.2f} ms CPU/tx (machine-check {1000 * lv.crosscheck_cpu / max(1, lv.transactions):6.2f})"
                            f" client core {lv.client_core_busy:4.0%}" + ("" if lv.valid else "  INVALID")
                            + ("  (ran out of unique images)" if lv.wrapped else ""))
                finally:
                    srv.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarize(levels, floor, duration, repeats)


def summarize(levels: list[Level], floor: dict, duration: float, repeats: int) -> dict:
    rows = {}
    for lv in levels:
        rows.setdefault((lv.server, lv.images, lv.concurrency), []).append(lv)

    def med(vals):
        vals = [v for v in vals if v is not None and v == v]
        return (statistics.median(vals), min(vals), max(vals)) if vals else (None, None, None)

    table = []
    for (server, images, conc), lvs in rows.items():
        ok = [lv for lv in lvs if lv.valid]
        use = ok or lvs
        lat = sorted(x for lv in use for x in lv.latencies)
        table.append({
            "server": server, "images": images, "concurrency": conc, "repeats": len(lvs), "valid_repeats": len(ok),
            "cpu_ms_per_tx": med([lv.cpu_ms for lv in use]),
            "crosscheck_cpu_ms_per_tx": med([1000 * lv.crosscheck_cpu / lv.transactions for lv in use
                                             if lv.transactions]),
            "tx_per_s": med([lv.tps for lv in use]),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "batch_rows": med([lv.batch_rows for lv in use])[0],
            "cache_hit_rate": med([lv.cache_hit_rate for lv in use])[0],
            "client_core_busy": max(lv.client_core_busy for lv in lvs),
            "valid": bool(ok),
        })
    best = min(floor.values())
    get = {(r["server"], r["images"], r["concurrency"]): r for r in table}

    def ratio(a, b, key="cpu_ms_per_tx"):
        ra, rb = get.get(a), get.get(b)
        if not ra or not rb or ra[key][0] is None or rb[key][0] is None:
            return None
        return ra[key][0] / rb[key][0]

    fw18 = get.get(("fwserve", 1, 8))
    ratios = {
        "cpu_1img_c8_vs_baseline (target <= 0.3)": ratio(("fwserve", 1, 8), ("baseline", 1, 8)),
        "cpu_1img_c8_vs_backbone_floor_per_image (target <= 1.8)":
            (fw18["cpu_ms_per_tx"][0] / best) if fw18 and fw18["cpu_ms_per_tx"][0] else None,
        "cpu_8img_c8_vs_baseline (target <= 0.2)": ratio(("fwserve", 8, 8), ("baseline", 8, 8)),
        "cpu_8img_c32_vs_baseline": ratio(("fwserve", 8, 32), ("baseline", 8, 32)),
        "tps_dynamic_vs_bs1_1img_c32 (target >= 1.4)": ratio(("fwserve", 1, 32), ("fwserve-bs1", 1, 32), "tx_per_s"),
        "cpu_workers2_vs_workers1_1img_c8 (target: no worse beyond the spread)":
            ratio(("fwserve-workers2", 1, 8), ("fwserve", 1, 8)),
        "tps_vs_baseline_1img_c8": ratio(("fwserve", 1, 8), ("baseline", 1, 8), "tx_per_s"),
        "cpu_1img_c8_vs_http_floor": ratio(("fwserve", 1, 8), ("http-floor", 1, 8)),
    }
    def paired(a, b):
        """The ratio within each repeat where both levels are valid: a repeat runs every server
        within minutes, so the machine's drift between repeats cancels -> (median, min, max)."""
        by = {}
        for lv in levels:
            if lv.valid and (lv.server, lv.images, lv.concurrency) in (a, b):
                by.setdefault(lv.repeat, {})[(lv.server, lv.images, lv.concurrency)] = lv.cpu_ms
        return med([r[a] / r[b] for r in by.values() if a in r and b in r])

    paired_ratios = {
        "cpu_1img_c8_vs_baseline": paired(("fwserve", 1, 8), ("baseline", 1, 8)),
        "cpu_8img_c8_vs_baseline": paired(("fwserve", 8, 8), ("baseline", 8, 8)),
        "cpu_workers2_vs_workers1_1img_c8": paired(("fwserve-workers2", 1, 8), ("fwserve", 1, 8)),
    }
    return {"duration_s": duration, "repeats": repeats, "backbone_ms_per_image": floor,
            "backbone_best_ms_per_image": best, "levels": table, "ratios": ratios, "paired_ratios": paired_ratios}


def markdown(res: dict) -> str:
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    def spread(t, d=2):
        m, lo, hi = t
        return "-" if m is None else f"{m:.{d}f} ({lo:.{d}f}-{hi:.{d}f})"

    lines = ["| server | images/req | concurrency | server CPU ms / tx (range) | machine cross-check ms / tx | tx/s (range) "
             "| p50 ms | p99 ms | batch rows | cache hits | client core | valid |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["levels"]:
        lines.append(f"| {r['server']} | {r['images']} | {r['concurrency']} | {spread(r['cpu_ms_per_tx'])} | "
                     f"{spread(r['crosscheck_cpu_ms_per_tx'])} | {spread(r['tx_per_s'], 1)} | {f(r['p50_ms'], 1)} | "
                     f"{f(r['p99_ms'], 1)} | {f(r['batch_rows'])} | {f(r['cache_hit_rate'])} | "
                     f"{r['client_core_busy']:.0%} | {'yes' if r['valid'] else 'NO'} |")
    lines += ["", f"Backbone in-process (core {SERVER_CORE}, one thread), ms per image by batch size: "
              + ", ".join(f"{k}: {v:.3f}" for k, v in res["backbone_ms_per_image"].items()), "",
              "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {f(v)} |" for k, v in res["ratios"].items()]
    lines += ["", "| CPU ratio within each repeat | median (range) |", "|---|---|"]
    lines += [f"| {k} | {spread(v)} |" for k, v in res.get("paired_ratios", {}).items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.serving_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default=None, help="comma-separated subset of " + ", ".join(PLAN))
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    if shutil.which("taskset") is None or os.cpu_count() < 2:
        print("serving_bench needs taskset and two cores", file=sys.stderr)
        return 2
    res = run(args.duration, args.repeats, args.servers.split(",") if args.servers else None)
    res["command"] = "python -m loadtests.serving_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(res)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.markdown:
        args.markdown.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

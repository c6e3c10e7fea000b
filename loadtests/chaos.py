"""Chaos runs: real processes, real faults, clients that retry under their Idempotency-Keys.

    python -m loadtests.chaos [--scenario all|redis-restart|replica-kill|slow-store|disk-full|hostile]
                              [--sessions 4] [--adapts 8] [--json FILE]

Every scenario streams *logical* adapts: client c owns session c and sends adapt i of it with the
key ``<session>-<i>``, retrying whatever fails (5xx, 429, a dropped connection) with that same
key until it is answered 200, within a bounded number of attempts. Then it checks, per session,
what the server holds:

    acknowledged    logical adapts answered 200 (first answer or a replayed one)
    unacknowledged  logical adapts never answered 200 within the retries (must be 0)
    lost            acknowledged adapts missing from the session (its version below them; must be 0)
    doubled         adapts applied more than once (its version above the logical count; must be 0)
    head_ok         the session's head equals the same adapts applied one by one without faults
    healthy_errors  non-200 answers the clients saw before a retry went through (expected in the
                    fault scenarios; must be 0 where nothing fails: slow-store, hostile)

Scenarios:
    redis-restart   one server on a Redis store (wal); Redis is killed with SIGKILL mid-stream
                    and restarted from its append-only file
    replica-kill    two replicas on Redis behind nginx (consistent hashing on X-Session-ID);
                    the busiest replica is killed with SIGKILL mid-stream
    slow-store      one server on Redis reached through a proxy that delays every packet
    disk-full       one server on a size-capped directory store (--store-max-bytes) that fills
                    mid-stream; an operator then deletes other sessions to make room
    hostile         hostile clients (malformed ids, huge shapes, NaN, bombs, oversized bodies,
                    forged imports, reused keys) alongside the healthy ones

Needs redis-server (and nginx for replica-kill). Bounded in requests and time; exits 0 when
every check of every scenario passes. tests/loadtests/test_chaos.py runs it small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx
import numpy as np

from loadtests import hostile
from loadtests.serverproc import ROOT, ServerProcess, free_port

CLASSES = ["a", "b", "c"]
RULE = "prototype"  # running class sums: the head does not depend on how adapts were batched
MAX_ATTEMPTS = 80


def which(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


# ---- processes -----------------------------------------------------------------------------------


class Redis:
    """redis-server with the settings the wal mode documents; restartable on the same port and data."""

    def __init__(self, work: Path, port: Optional[int] = None) -> None:
        self.dir, self.port = work / f"redis-{port or 'x'}", port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Redis":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class DelayProxy:
    """A TCP proxy that holds every chunk it forwards for `delay` seconds (a slow network to the store)."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target, self.delay = target_port, delay
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class Nginx:
    def __init__(self, work: Path, upstreams: list[str]) -> None:
        self.dir = work / "nginx"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        conf = (ROOT / "deploy" / "local" / "nginx.conf.template").read_text()
        servers = "\n".join(f"        server {a} max_fails=1 fail_timeout=60s;" for a in upstreams)
        conf = (conf.replace("@PREFIX@", str(self.dir)).replace("@PORT@", str(self.port))
                .replace("@SERVERS@", servers).replace("@USER@", "user root;" if os.geteuid() == 0 else ""))
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([which("nginx"), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=open(self.dir / "stderr.log", "wb"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def server(*args: str, env: Optional[dict] = None) -> ServerProcess:
    weights = (ROOT / "models" / "weights" / "fwserve-mnist-vit.safetensors").is_file()
    extra = [] if weights else ["--random-init"]
    return ServerProcess("--torch-threads", "1", "--decode-workers", "1", "--max-wait-ms", "2", *extra, *args,
                         env=env).start()


# ---- the workload --------------------------------------------------------------------------------


def adapt_body(sid: str, s: int, i: int) -> dict:
    rng = np.random.default_rng(1000 * s + i)
    label = CLASSES[(s + i) % len(CLASSES)]
    return {"session_id": sid, "instances": [{"array": rng.integers(0, 256, (28, 28)).tolist(), "label": label}]}


@dataclass
class Tally:
    logical: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    lost: int = 0
    doubled: int = 0
    head_ok: bool = True
    healthy_errors: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def saw(self, what: str) -> None:
        self.healthy_errors[what] = self.healthy_errors.get(what, 0) + 1

    @property
    def ok_with_faults(self) -> bool:
        return self.unacknowledged == self.lost == self.doubled == 0 and self.head_ok

    @property
    def ok_without_faults(self) -> bool:
        return self.ok_with_faults and not self.healthy_errors


def stream(url: str, sessions: list[str], adapts: int, tally: Tally, progress: Callable[[int], None],
           deadline: float) -> dict[str, int]:
    """One client thread per session, each sending its logical adapts in order, retrying with
    their keys. -> acknowledged adapts per session."""
    acked = {sid: 0 for sid in sessions}
    lock = threading.Lock()

    def client(s: int, sid: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(adapts):
                body, key = adapt_body(sid, s, i), f"{sid}-{i}"
                for attempt in range(MAX_ATTEMPTS):
                    if time.monotonic() > deadline:
                        break
                    try:
                        r = c.post("/v1/adapt", json=body, headers={"Idempotency-Key": key, "X-Session-ID": sid})
                    except httpx.TransportError as e:
                        with lock:
                            tally.saw(type(e).__name__)
                        time.sleep(min(1.0, 0.05 * (attempt + 1)))
                        continue
                    if r.status_code == 200:
                        with lock:
                            acked[sid] += 1
                            tally.acknowledged += 1
                            progress(tally.acknowledged)
                        break
                    with lock:
                        tally.saw(str(r.status_code))
                    if 400 <= r.status_code < 500 and r.status_code != 429:
                        tally.notes.append(f"{sid}#{i}: {r.status_code} {r.text[:200]}")
                        break  # a client error: retrying the same request cannot help
                    time.sleep(min(1.0, 0.05 * (attempt + 1)))
                if acked[sid] < i + 1:  # out of attempts or time: what is left stays unacknowledged
                    with lock:
                        tally.unacknowledged += adapts - i
                    return

    threads = [threading.Thread(target=client, args=(s, sid)) for s, sid in enumerate(sessions)]
    tally.logical += len(sessions) * adapts
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked


def verify(url: str, sessions: list[str], adapts: int, acked: dict[str, int], tally: Tally,
           make_room: bool = False) -> None:
    """Versions against acknowledgements; heads against the same adapts applied one by one on
    fresh sessions (with `make_room`, the checked sessions are deleted first: a full store)."""
    from safetensors.torch import load

    with httpx.Client(base_url=url, timeout=30) as c:
        held = {}
        for sid in sessions:
            r = c.get(f"/v1/sessions/{sid}")
            version = r.json()["version"] if r.status_code == 200 else 0
            tally.lost += max(0, acked[sid] - version)
            tally.doubled += max(0, version - adapts)
            held[sid] = (version, load(c.get(f"/v1/sessions/{sid}/export").content) if r.status_code == 200 else {})
            if make_room:
                c.delete(f"/v1/sessions/{sid}")
        for s, sid in enumerate(sessions):
            version, a = held[sid]
            ref = f"ref-{sid}"
            r = c.post("/v1/sessions", json={"rule": RULE, "classes": CLASSES, "id": ref})
            assert r.status_code == 201, r.text
            for i in range(version):
                r = c.post("/v1/adapt", json={**adapt_body(sid, s, i), "session_id": ref})
                assert r.status_code == 200, r.text
            b = load(c.get(f"/v1/sessions/{ref}/export").content)
            if a.keys() != b.keys() or not all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-5)
                                               for k in a):
                tally.head_ok = False
                tally.notes.append(f"{sid}: head differs from its {version} adapts applied one by one")
            if make_room:
                c.delete(f"/v1/sessions/{ref}")


def create(url: str, sessions: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        for sid in sessions:
            for _ in range(MAX_ATTEMPTS):
                r = c.post("/v1/sessions", json={"rule": RULE, "classes": CLASSES, "id": sid},
                           headers={"Idempotency-Key": f"create-{sid}", "X-Session-ID": sid})
                if r.status_code == 201:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"could not create {sid}: {r.status_code} {r.text}")


def fault_at(fraction: float, total: int, fault: Callable[[], None]) -> Callable[[int], None]:
    """A progress callback that runs `fault` once, in its own thread, when acknowledgements pass a share."""
    fired = threading.Event()

    def progress(n: int) -> None:
        if not fired.is_set() and n >= fraction * total:
            fired.set()
            threading.Thread(target=fault, daemon=True).start()

    return progress


# ---- scenarios -----------------------------------------------------------------------------------


def redis_restart(work: Path, n: int, adapts: int, budget: float) -> Tally:
    redis = Redis(work).start()
    srv = server("--store", redis.url, "--durability", "wal")
    tally = Tally()
    try:
        sessions = [f"rr-{s}" for s in range(n)]
        create(srv.url, sessions)

        def fault():
            redis.kill()
            time.sleep(1.0)
            redis.start()

        acked = stream(srv.url, sessions, adapts, tally, fault_at(0.3, n * adapts, fault), time.monotonic() + budget)
        verify(srv.url, sessions, adapts, acked, tally)
    finally:
        srv.close()
        redis.stop()
    return tally


def replica_kill(work: Path, n: int, adapts: int, budget: float) -> Tally:
    redis = Redis(work).start()
    replicas = [server("--store", redis.url, "--durability", "wal") for _ in range(2)]
    lb = Nginx(work, [f"127.0.0.1:{r.port}" for r in replicas])
    tally = Tally()
    try:
        _wait(lb.url)
        sessions = [f"rk-{s}" for s in range(n)]
        create(lb.url, sessions)

        def fault():
            busiest = max(replicas, key=lambda r: _served(r.url))
            busiest.proc.send_signal(signal.SIGKILL)
            tally.notes.append(f"killed the replica on port {busiest.port}")

        acked = stream(lb.url, sessions, adapts, tally, fault_at(0.3, n * adapts, fault), time.monotonic() + budget)
        verify(lb.url, sessions, adapts, acked, tally)
    finally:
        lb.stop()
        for r in replicas:
            r.close()
        redis.stop()
    return tally


def slow_store(work: Path, n: int, adapts: int, budget: float) -> Tally:
    redis = Redis(work).start()
    proxy = DelayProxy(redis.port, delay=0.02)
    srv = server("--store", proxy.url, "--durability", "wal")
    tally = Tally()
    try:
        sessions = [f"ss-{s}" for s in range(n)]
        create(srv.url, sessions)
        acked = stream(srv.url, sessions, adapts, tally, lambda _: None, time.monotonic() + budget)
        verify(srv.url, sessions, adapts, acked, tally)
    finally:
        srv.close()
        proxy.close()
        redis.stop()
    return tally


def disk_full(work: Path, n: int, adapts: int, budget: float) -> Tally:
    """The store is capped at what the sessions take plus room for their adapts; filler sessions
    take that room until, mid-stream, an operator deletes them."""
    store = work / "store"
    sessions = [f"df-{s}" for s in range(n)]
    srv = server("--durability", "wal", "--snapshot-dir", str(store), "--wal-compact-records", "1000")
    try:  # measure what a session and one adapt record take on disk (on a probe session, then gone)
        create(srv.url, sessions + ["df-probe"])
        base = _du(store)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            c.post("/v1/adapt", json=adapt_body("probe", 0, 0) | {"session_id": "df-probe"},
                   headers={"Idempotency-Key": "probe-key-00000"})
            record = max(1, _du(store) - base)
            c.delete("/v1/sessions/df-probe")
    finally:
        srv.close()
    cap = _du(store) + int(1.25 * n * record * adapts)  # room for every adapt, once the fillers are gone
    srv = server("--durability", "wal", "--snapshot-dir", str(store), "--wal-compact-records", "1000",
                 "--store-max-bytes", str(cap))
    tally = Tally()
    try:
        fillers = []
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while c.post("/v1/sessions", json={"rule": RULE, "classes": CLASSES,
                                               "id": f"filler-{len(fillers)}"}).status_code == 201:
                fillers.append(f"filler-{len(fillers)}")

        def make_room():
            time.sleep(1.0)  # the clients meet a full store for a while
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for f in fillers:
                    c.delete(f"/v1/sessions/{f}")

        threading.Thread(target=make_room, daemon=True).start()
        acked = stream(srv.url, sessions, adapts, tally, lambda _: None, time.monotonic() + budget)
        verify(srv.url, sessions, adapts, acked, tally, make_room=True)
        tally.notes.append(f"a store of {cap} bytes; {len(fillers)} filler sessions filled it")
    finally:
        srv.close()
    return tally


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != ".lock")


def hostile_clients(work: Path, n: int, adapts: int, budget: float) -> Tally:
    srv = server("--durability", "wal", "--snapshot-dir", str(work / "store"))
    tally = Tally()
    stop = threading.Event()
    seen: dict = {}
    try:
        sessions = [f"hc-{s}" for s in range(n)]
        create(srv.url, sessions)
        started = [threading.Event() for _ in range(2)]
        threads = [threading.Thread(target=hostile.attack, args=(srv.url, stop, seen, k, started[k]))
                   for k in range(2)]
        for t in threads:
            t.start()
        for e in started:
            e.wait(120)
        acked = stream(srv.url, sessions, adapts, tally, lambda _: None, time.monotonic() + budget)
        stop.set()
        for t in threads:
            t.join(60)
        verify(srv.url, sessions, adapts, acked, tally)
        bad = {k: v for k, v in seen.items() if not k.startswith("4")}
        if bad:
            tally.notes.append(f"hostile requests answered {bad}")
            tally.head_ok = False
        tally.notes.append(f"hostile requests: {sum(seen.values())} answered {dict(sorted(seen.items()))}")
    finally:
        stop.set()
        srv.close()
    return tally


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def _served(url: str) -> float:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.TransportError:
        return -1
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("fwserve_adapted_examples_total"))


SCENARIOS = {
    "redis-restart": (redis_restart, True, ("redis-server",)),
    "replica-kill": (replica_kill, True, ("redis-server", "nginx")),
    "slow-store": (slow_store, False, ("redis-server",)),
    "disk-full": (disk_full, True, ()),
    "hostile": (hostile_clients, False, ()),
}


def run(names: list[str], sessions: int, adapts: int, budget: float) -> dict:
    results = {}
    for name in names:
        fn, faults, needs = SCENARIOS[name]
        missing = [t for t in needs if which(t) is None]
        if missing:
            results[name] = {"skipped": f"needs {', '.join(missing)}"}
            continue
        work = Path(tempfile.mkdtemp(prefix=f"fwserve-chaos-{name}-"))
        t0 = time.monotonic()
        try:
            tally = fn(work, sessions, adapts, budget)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ok = tally.ok_with_faults if faults else tally.ok_without_faults
        results[name] = {**asdict(tally), "ok": ok, "seconds": round(time.monotonic() - t0, 1)}
    return results


def markdown(results: dict) -> str:
    rows = ["| scenario | logical adapts | acknowledged | unacknowledged | lost | doubled | head ok | "
            "errors seen by healthy clients (retried) | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} |||||||| |")
            continue
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["healthy_errors"].items())) or "none"
        rows.append(f"| {name} | {r['logical']} | {r['acknowledged']} | {r['unacknowledged']} | {r['lost']} | "
                    f"{r['doubled']} | {r['head_ok']} | {errs} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="all", help=f"all or one of {', '.join(SCENARIOS)} (comma-separated)")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--adapts", type=int, default=8, help="logical adapts per session")
    p.add_argument("--budget", type=float, default=120.0, help="seconds the clients may take per scenario")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}")
    results = run(names, args.sessions, args.adapts, args.budget)
    print(markdown(results))
    for name, r in results.items():
        for note in r.get("notes", []):
            print(f"  {name}: {note}")
    if args.json:
        args.json.write_text(json.dumps({"command": "python -m loadtests.chaos " + " ".join(argv or sys.argv[1:]),
                                         "results": results}, indent=2))
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

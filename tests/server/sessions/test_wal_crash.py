"""kill -9 in the middle of an adapt stream (``--durability wal``): after a restart every
acknowledged version is there, and an adapt that was in flight is either wholly applied or
not at all (the head equals applying exactly the first `version` requests). And SIGTERM:
stop accepting, drain, flush, exit; nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load as st_load

from tests.server.conftest import arr, digits
from tests.server.redis_server import needs_redis, redis_server, redis_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[3]
SESSIONS = {"k-sgd": "sgd", "k-rls": "rls", "k-proto": "prototype"}
CLASSES = ["a", "b", "c"]
XS = digits(16, seed=80)


def request(i: int) -> dict:
    """The i-th adapt request of every session (deterministic, so it can be replayed)."""
    k = 1 + i % 3
    return {"instances": [{**arr(XS[(i + j) % len(XS)]), "label": CLASSES[(i * 7 + j) % 3]} for j in range(k)]}


class Server:
    def __init__(self, tmp: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = tmp / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FWSERVE_SNAPSHOT_DIR": str(tmp / "store")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--random-init", "--port", str(self.port),
             "--torch-threads", "1", "--durability", "wal", "--max-wait-ms", "2", "--log-level", "warning", *args],
            env=env, stdout=open(self.logfile, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready:\n" + self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


def stream(url: str, acked: dict, stop: threading.Event) -> None:
    """Each session: requests 0, 1, 2, ... one at a time; acked[sid] = last acknowledged version."""
    def one(sid):
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.post("/v1/adapt", json={"session_id": sid, **request(i)})
                except httpx.TransportError:
                    return  # the server died: this request is unacknowledged
                if r.status_code != 200:
                    return
                assert r.json()["version"] == i + 1
                acked[sid] = i + 1
                i += 1

    threads = [threading.Thread(target=one, args=(sid,)) for sid in SESSIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check_recovered(url: str, acked: dict) -> dict:
    """Every acknowledged version is present; the head equals a fresh session fed exactly the
    first `version` requests (so an unacknowledged one is all or nothing)."""
    found = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for sid, rule in SESSIONS.items():
            info = c.get(f"/v1/sessions/{sid}").json()
            v = info["version"]
            assert acked.get(sid, 0) <= v <= acked.get(sid, 0) + 1, (sid, acked.get(sid), v)
            ref = f"ref-{sid}"
            c.post("/v1/sessions", json={"rule": rule, "classes": CLASSES, "id": ref})
            for i in range(v):
                assert c.post("/v1/adapt", json={"session_id": ref, **request(i)}).status_code == 200
            got, want = (st_load(c.get(f"/v1/sessions/{s}/export").content) for s in (sid, ref))
            assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got), sid
            ref_info = c.get(f"/v1/sessions/{ref}").json()
            assert (info["examples_seen"], info["prequential"]) == (ref_info["examples_seen"], ref_info["prequential"])
            c.delete(f"/v1/sessions/{ref}")
            found[sid] = v
    return found


def run_crash(tmp_path: Path, *args: str, acks: int = 15) -> None:
    srv = Server(tmp_path, *args)
    acked: dict = {}
    stop = threading.Event()
    try:
        with httpx.Client(base_url=srv.url) as c:
            for sid, rule in SESSIONS.items():
                assert c.post("/v1/sessions", json={"rule": rule, "classes": CLASSES, "id": sid}).status_code == 201
        t = threading.Thread(target=stream, args=(srv.url, acked, stop))
        t.start()
        deadline = time.monotonic() + 60
        while min(acked.get(s, 0) for s in SESSIONS) < acks:
            assert time.monotonic() < deadline and t.is_alive(), (acked, srv.log())
            time.sleep(0.005)
        srv.stop(signal.SIGKILL)  # in the middle of the stream: requests are in flight
        stop.set()
        t.join(30)
    finally:
        stop.set()
        srv.stop(signal.SIGKILL)
    srv2 = Server(tmp_path, *args)
    try:
        check_recovered(srv2.url, acked)
    finally:
        assert srv2.stop() in (0, -signal.SIGTERM)


WORKERS = pytest.mark.parametrize("workers", [[], ["--api-workers", "2"]], ids=["one-process", "api-workers-2"])


@WORKERS
def test_kill_9_mid_stream_directory_store(tmp_path, workers):
    run_crash(tmp_path, "--wal-compact-records", "8", "--snapshot-interval-s", "0.2", *workers)


@needs_redis
def test_kill_9_mid_stream_redis_store(tmp_path, redis_url):
    run_crash(tmp_path, "--store", redis_url, acks=8)


@WORKERS
def test_sigterm_drains_and_flushes(tmp_path, workers):
    srv = Server(tmp_path, *workers)
    acked: dict = {}
    stop = threading.Event()
    try:
        with httpx.Client(base_url=srv.url) as c:
            for sid, rule in SESSIONS.items():
                c.post("/v1/sessions", json={"rule": rule, "classes": CLASSES, "id": sid})
        t = threading.Thread(target=stream, args=(srv.url, acked, stop))
        t.start()
        while min(acked.get(s, 0) for s in SESSIONS) < 5:
            assert t.is_alive()
            time.sleep(0.005)
        rc = srv.stop(signal.SIGTERM)
        stop.set()
        t.join(30)
    finally:
        stop.set()
        srv.stop(signal.SIGKILL)
    assert rc in (0, -signal.SIGTERM), srv.log()
    assert_compacted(tmp_path / "store")
    srv2 = Server(tmp_path, *workers)
    try:
        found = check_recovered(srv2.url, acked)
        assert found == {s: acked[s] for s in SESSIONS}  # drained: nothing in flight was dropped half-way
    finally:
        srv2.stop()


def test_a_killed_api_worker_is_replaced_and_loses_nothing(tmp_path):
    """SIGKILL one of two API worker processes mid-stream: it is replaced, and clients retrying
    under their Idempotency-Keys end with every logical adapt applied exactly once."""
    srv = Server(tmp_path, "--api-workers", "2")
    try:
        pids = _children(srv.proc.pid)
        assert len(pids) == 2
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for sid, rule in SESSIONS.items():
                assert c.post("/v1/sessions", json={"rule": rule, "classes": CLASSES, "id": sid}).status_code == 201
            n, killed = 12, False
            for i in range(n):
                for sid in SESSIONS:
                    for _ in range(100):  # retry through the kill with the same key
                        try:
                            r = c.post("/v1/adapt", json={"session_id": sid, **request(i)},
                                       headers={"Idempotency-Key": f"{sid}-{i}"})
                            if r.status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        time.sleep(0.05)
                    else:
                        raise AssertionError(f"{sid} adapt {i} never acknowledged:\n{srv.log()}")
                if i == n // 2 and not killed:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = True
            deadline = time.monotonic() + 60
            while len([p for p in _children(srv.proc.pid) if p not in pids]) < 1:
                assert time.monotonic() < deadline, "the killed worker was not replaced"
                time.sleep(0.1)
        found = check_recovered(srv.url, {sid: n for sid in SESSIONS})
        assert found == {sid: n for sid in SESSIONS}  # none lost, none doubled
        assert len(_children(srv.proc.pid)) == 2
    finally:
        srv.stop(signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """The server's API worker processes (its other children: multiprocessing's resource tracker)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # children are listed under the thread that made them
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    out = []
    for k in kids:
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(k)
    return out


def assert_compacted(root: Path) -> None:
    """Logs are compacted at shutdown: every snapshot is at its session's last version (what its
    log still holds is retained history, before the snapshot)."""
    from server.sessions import codec
    from server.sessions.backends.directory import _NAME, read_frames

    snaps = [p for p in root.glob("*.safetensors") if _NAME.match(p.name)]
    assert snaps
    for snap in snaps:
        _, version = codec.snapshot_head(snap.read_bytes())
        wal = snap.with_suffix(".wal")
        logged = [codec.record_head(r)[1] for r in read_frames(wal.read_bytes())[0]] if wal.exists() else []
        assert all(v <= version for v in logged), f"{snap.name}: records after the snapshot at shutdown"

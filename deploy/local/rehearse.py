"""Local rehearsal of a multi-replica deployment: Redis as the shared session store, three
fwserve replicas (--store redis://... --durability wal), nginx hashing consistently on
X-Session-ID in front. Drives sessions through nginx, kills one replica (SIGKILL), and checks
that every session continues on the others at its latest acknowledged version.

    python deploy/local/rehearse.py [--sessions 24] [--adapts 3] [--keep]

Needs redis-server and nginx on PATH (or /usr/sbin), the project importable (run it from the
repository root with the project's environment). Exits 0 when every check passes; prints a
JSON summary. tests/deploy/test_rehearsal.py runs it.
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
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMG = 28  # fwserve-mnist-vit input size


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        sys.exit(f"rehearse: {name} not found (Debian packages redis-server, nginx)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body=None, session: str | None = None, timeout: float = 30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if session:
        req.add_header("X-Session-ID", session)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers.get("X-Upstream")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers.get("X-Upstream")


def wait_ready(url: str, procs, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before {url} was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready in time")
        time.sleep(0.3)


def image(label: int, seed: int) -> list[list[int]]:
    """A deterministic 28x28 pattern per label (the heads only need something separable)."""
    return [[(37 * (r + label) + 11 * c * (label + 1) + seed) % 256 for c in range(IMG)] for r in range(IMG)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--adapts", type=int, default=3, help="adapt requests per session before the kill")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=150, help="seconds for start-up")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fwserve-rehearsal-"))
    procs: list[subprocess.Popen] = []
    summary: dict = {"work": str(work), "checks": {}}
    ok = False
    try:
        # Redis, with the durability the wal mode documents
        rport = free_port()
        (work / "redis").mkdir()
        procs.append(subprocess.Popen(
            [which("redis-server"), "--port", str(rport), "--bind", "127.0.0.1", "--dir", str(work / "redis"),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=(work / "redis.log").open("w"), stderr=subprocess.STDOUT))

        # replicas
        weights = (REPO / "models" / "weights" / "fwserve-mnist-vit.safetensors").is_file()
        ports = [free_port() for _ in range(args.replicas)]
        replicas = {}
        for i, port in enumerate(ports):
            env = {k: v for k, v in os.environ.items() if not k.startswith("FWSERVE_")} | {
                "FWSERVE_HOST": "127.0.0.1", "FWSERVE_PORT": str(port), "FWSERVE_DEVICE": "cpu",
                "FWSERVE_TORCH_THREADS": "1", "FWSERVE_DECODE_WORKERS": "1",
                "FWSERVE_SNAPSHOT_DIR": str(work / f"replica{i}"),
                "FWSERVE_STORE": f"redis://127.0.0.1:{rport}/0", "FWSERVE_DURABILITY": "wal",
                "PYTHONPATH": str(REPO),
            }
            if not weights:
                env["FWSERVE_RANDOM_INIT"] = "true"
            p = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=work,
                                 stdout=(work / f"replica{i}.log").open("w"), stderr=subprocess.STDOUT)
            procs.append(p)
            replicas[f"127.0.0.1:{port}"] = p

        # nginx
        nport = free_port()
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / d).mkdir()
        conf = (HERE / "nginx.conf.template").read_text()
        servers = "\n".join(f"        server {a} max_fails=1 fail_timeout=60s;" for a in replicas)
        user = "user root;" if os.geteuid() == 0 else ""  # workers need the (private) work directory
        conf = (conf.replace("@PREFIX@", str(work)).replace("@PORT@", str(nport))
                .replace("@SERVERS@", servers).replace("@USER@", user))
        (work / "nginx.conf").write_text(conf)
        procs.append(subprocess.Popen([which("nginx"), "-p", str(work), "-c", str(work / "nginx.conf")],
                                      stdout=(work / "nginx.stderr.log").open("w"), stderr=subprocess.STDOUT))

        deadline = time.monotonic() + args.timeout
        for addr in replicas:
            wait_ready(f"http://{addr}/v2/health/ready", procs, deadline)
        base = f"http://127.0.0.1:{nport}"
        wait_ready(base + "/v2/health/ready", procs, deadline)

        # sessions through nginx; remember the latest acknowledged version and where it lives
        latest, home, seen = {}, {}, {}
        for s in range(args.sessions):
            sid = f"rehearsal-{s:03d}"
            st, body, up = call(base + "/v1/sessions", "POST", {"id": sid, "rule": "prototype"}, sid)
            assert st == 201, (st, body)
            seen[sid] = {up}
            for a in range(args.adapts):
                label = (s + a) % 5
                st, body, up = call(base + "/v1/adapt", "POST", {"session_id": sid, "instances": [
                    {"array": image(label, a), "label": str(label)}]}, sid)
                assert st == 200, (st, body)
                latest[sid], home[sid] = body["version"], up
                seen[sid].add(up)
        summary["sessions_per_replica"] = {a: sum(1 for h in home.values() if h == a) for a in replicas}
        summary["checks"]["one_replica_per_session"] = all(len(seen[s]) == 1 and home[s] in replicas for s in latest)
        summary["checks"]["spread_over_replicas"] = sum(1 for n in summary["sessions_per_replica"].values() if n) > 1

        # kill the replica holding the most sessions, without warning
        victim = max(summary["sessions_per_replica"], key=summary["sessions_per_replica"].get)
        replicas[victim].send_signal(signal.SIGKILL)
        replicas[victim].wait(timeout=10)
        moved = [s for s in latest if home[s] == victim]
        summary["killed"], summary["moved_sessions"] = victim, len(moved)

        # every session continues elsewhere, at its latest acknowledged version
        versions_ok, continued_ok, stayed_ok = True, True, True
        for sid, v in latest.items():
            st, info, up = call(base + f"/v1/sessions/{sid}", session=sid)
            if st != 200 or info.get("version") != v or up == victim:
                versions_ok = False
                summary.setdefault("errors", []).append({"session": sid, "status": st, "body": info, "want": v})
                continue
            if home[sid] != victim and up != home[sid]:
                stayed_ok = False  # consistent hashing: sessions of the survivors do not move
            st, body, _ = call(base + "/v1/adapt", "POST", {"session_id": sid, "instances": [
                {"array": image(1, 99), "label": "1"}]}, sid)
            if st != 200 or body.get("version") != v + 1:
                continued_ok = False
                summary.setdefault("errors", []).append({"session": sid, "adapt_status": st, "body": body})
        summary["checks"]["latest_acknowledged_version_after_kill"] = versions_ok
        summary["checks"]["adapt_continues_after_kill"] = continued_ok
        summary["checks"]["survivors_keep_their_sessions"] = stayed_ok
        ok = all(summary["checks"].values()) and len(moved) > 0
    except Exception as e:  # report, then clean up
        summary["exception"] = f"{type(e).__name__}: {e}"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        summary["ok"] = ok
        if not ok:
            for log in sorted(work.glob("*.log")):
                summary.setdefault("log_tails", {})[log.name] = log.read_text()[-1500:]
        print(json.dumps(summary, indent=2))
        if not args.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

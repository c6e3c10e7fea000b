"""A stand-in for the fwserve API for the load-generator tests: the same routes and body shapes,
with configurable service time, a one-off stall, periodic errors and a Prometheus text that
counts requests. It runs in a subprocess (uvicorn) on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse


@dataclass
class StubState:
    delay_s: float = 0.0  # service time of predict / adapt
    serial: bool = False  # one request at a time (a single-worker server)
    stall_after: int = -1  # the request with this number (0-based) holds the server for stall_s
    stall_s: float = 0.0
    error_every: int = 0  # every n-th predict/adapt answers 503
    requests: int = 0
    inflight: int = 0
    peak_inflight: int = 0
    sessions: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: int = 0
    deleted: int = 0
    paths: list = field(default_factory=list)


def make_app(state: StubState) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    async def serve(kind: str, body: dict):
        n = state.requests
        state.requests += 1
        state.inflight += 1
        state.peak_inflight = max(state.peak_inflight, state.inflight)
        try:
            if state.error_every and (n + 1) % state.error_every == 0:
                return JSONResponse({"error": {"code": "queue_full", "message": "full"}}, status_code=503)
            wait = state.delay_s + (state.stall_s if n == state.stall_after else 0.0)
            if state.serial:
                async with lock:
                    await asyncio.sleep(wait)
            else:
                await asyncio.sleep(wait)
            return None
        finally:
            state.inflight -= 1

    @app.post("/v1/sessions", status_code=201)
    async def create(request: Request):
        body = await request.json()
        sid = body.get("id") or f"s{len(state.sessions)}"
        if sid in state.sessions:
            return JSONResponse({"error": {"code": "conflict", "message": "taken"}}, status_code=409)
        state.sessions[sid] = body
        state.versions[sid] = 0
        state.created += 1
        return {"id": sid, "version": 0}

    @app.delete("/v1/sessions/{sid}", status_code=204)
    async def delete(sid: str):
        state.sessions.pop(sid, None)
        state.deleted += 1
        return PlainTextResponse("", status_code=204)

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = await request.json()
        state.paths.append("predict")
        err = await serve("predict", body)
        if err is not None:
            return err
        sid = body.get("session_id")
        if sid is not None and sid not in state.sessions:
            return JSONResponse({"error": {"code": "not_found", "message": sid}}, status_code=404)
        preds = [{"label": "5", "index": 0, "score": 0.5, "top_k": [{"label": "5", "index": 0, "score": 0.5}]}
                 for _ in body["instances"]]
        return {"head": "session" if sid else "base", "session_id": sid,
                "version": state.versions.get(sid), "predictions": preds}

    @app.post("/v1/adapt")
    async def adapt(request: Request):
        body = await request.json()
        state.paths.append("adapt")
        err = await serve("adapt", body)
        if err is not None:
            return err
        sid = body["session_id"]
        if sid not in state.sessions:
            return JSONResponse({"error": {"code": "not_found", "message": sid}}, status_code=404)
        state.versions[sid] += 1
        preds = [{"label": "5", "index": 0, "score": 0.5, "top_k": [], "true_label": str(x["label"]),
                  "correct": str(x["label"]) == "5"} for x in body["instances"]]
        return {"session_id": sid, "version": state.versions[sid], "applied": len(preds), "predictions": preds,
                "update_seconds": 0.0001, "latency_seconds": 0.001}

    @app.post("/_reset")
    async def reset(request: Request):
        fresh = StubState(**(await request.json()))
        for k in fresh.__dataclass_fields__:
            setattr(state, k, getattr(fresh, k))
        return {}

    @app.get("/_state")
    async def get_state():
        return {k: getattr(state, k) for k in ("requests", "peak_inflight", "created", "deleted")} | {
            "sessions": len(state.sessions), "paths": state.paths}

    @app.get("/metrics")
    async def metrics():
        n = state.requests
        return PlainTextResponse(
            "# TYPE fwserve_batch_size histogram\n"
            f'fwserve_batch_size_bucket{{le="1.0"}} {n}\nfwserve_batch_size_bucket{{le="+Inf"}} {n}\n'
            f"fwserve_batch_size_sum {2 * n}\nfwserve_batch_size_count {n}\n"
            f"fwserve_queue_wait_seconds_sum {0.001 * n}\nfwserve_queue_wait_seconds_count {n}\n"
            f'fwserve_head_update_seconds_sum{{rule="prototype"}} {0.0002 * n}\n'
            f'fwserve_head_update_seconds_count{{rule="prototype"}} {n}\n'
        )

    return app


class StubServer:
    """The stub in its own process (so that its work does not share the test's interpreter lock),
    configured and inspected over HTTP: ``reset(**StubState fields)``, ``state()``."""

    def __init__(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StubServer":
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.loadtests.stub", str(self.port)],
                                     cwd=str(Path(__file__).resolve().parents[2]))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/_state", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("stub server did not start")
            time.sleep(0.05)

    def reset(self, **kw) -> None:
        httpx.post(self.url + "/_reset", json=kw, timeout=5).raise_for_status()

    def state(self) -> dict:
        return httpx.get(self.url + "/_state", timeout=5).json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    uvicorn.run(make_app(StubState()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

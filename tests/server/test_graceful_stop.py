"""SIGTERM with adapts in flight, in a served process whose micro-batches run on its event loop:
every acknowledged adapt is applied and written, nothing else is (real process, real signal)."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np

from tests.server.conftest import ProcessServer


def serve(tmp_path) -> ProcessServer:
    """`fwserve serve` with one torch thread (ProcessServer's default) and durability snapshot."""
    return ProcessServer(tmp_path, durability="snapshot", snapshot_dir=tmp_path / "store", log_level="info").start()


def test_sigterm_keeps_every_acknowledged_adapt_and_only_those(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28)).tolist()
    srv = serve(tmp_path)
    proc, url = srv.proc, srv.url
    try:
        assert "batches on the event loop" in srv.log.read_text()  # auto: one torch thread, a directory store
        sid = httpx.post(url + "/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"]}).json()["id"]
        acked: list[int] = []

        async def user(client: httpx.AsyncClient, label: str) -> None:
            while True:
                try:
                    r = await client.post("/v1/adapt", json={"session_id": sid,
                                                             "instances": [{"array": image, "label": label}]})
                except httpx.TransportError:
                    return  # the server stopped taking requests: this one was never read
                if r.status_code != 200:
                    assert r.status_code == 503, r.text  # shutting down: refused, not applied
                    return
                acked.append(r.json()["version"])

        async def main() -> None:
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)  # a connection per request
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
                users = [asyncio.create_task(user(client, "ab"[i % 2])) for i in range(6)]
                while len(acked) < 20:
                    await asyncio.sleep(0.01)
                    assert not all(u.done() for u in users)
                proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*users)

        asyncio.run(main())
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert sorted(acked) == list(range(1, len(acked) + 1))  # each acknowledged adapt was one version

    again = serve(tmp_path)
    try:
        info = httpx.get(f"{again.url}/v1/sessions/{sid}").json()
        assert info["version"] == len(acked) and info["examples_seen"] == len(acked)
    finally:
        again.stop()

"""server.client: X-Session-ID on session-scoped calls, an Idempotency-Key on every adapt (the same
on its retries), retries of 429/503 after Retry-After with jitter, binary /v2 calls."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from server import client as client_mod
from server.client import AsyncClient, Client, FwserveError
from tests.server.conftest import BACKBONE, digits

ADAPTED = {"session_id": "s", "version": 1, "applied": 1, "update_seconds": 0.0, "latency_seconds": 0.0,
           "predictions": [{"label": "a", "index": 0, "score": 1.0, "top_k": [{"label": "a", "index": 0, "score": 1.0}],
                            "true_label": "a", "correct": True}]}
X = digits(2, seed=180)


class Recorder:
    """A scripted server: answers in turn, remembers every request."""

    def __init__(self, *answers) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, Exception):
            raise a
        return a


def busy(status: int, retry_after: str = "2") -> httpx.Response:
    return httpx.Response(status, headers={"retry-after": retry_after},
                          json={"error": {"code": "busy", "message": "later"}})


def test_adapt_retries_with_one_idempotency_key_after_retry_after(monkeypatch):
    waits = []
    monkeypatch.setattr(client_mod.time, "sleep", waits.append)
    rec = Recorder(busy(429), busy(503), httpx.ConnectError("down"), httpx.Response(200, json=ADAPTED))
    with Client("http://t", retries=3, transport=httpx.MockTransport(rec)) as c:
        assert c.adapt("s", X[:1], ["a"]).version == 1
        assert len(rec.requests) == 4
        keys = {r.headers["idempotency-key"] for r in rec.requests}
        assert len(keys) == 1 and len(keys.pop()) >= 16  # one key for the call and all its retries
        assert all(r.headers["x-session-id"] == "s" for r in rec.requests)
        assert 2 <= waits[0] <= 2 * 1.25 + 0.1 and 2 <= waits[1] <= 2 * 1.25 + 0.1  # Retry-After plus jitter
        rec.answers = [httpx.Response(200, json=ADAPTED)]
        c.adapt("s", X[:1], ["a"])
        assert rec.requests[-1].headers["idempotency-key"] not in {r.headers["idempotency-key"]
                                                                     for r in rec.requests[:4]}
        c.adapt("s", X[:1], ["a"], idempotency_key="mine")
        assert rec.requests[-1].headers["idempotency-key"] == "mine"


def test_retries_stop_and_unsafe_calls_are_not_resent(monkeypatch):
    monkeypatch.setattr(client_mod.time, "sleep", lambda s: None)
    rec = Recorder(busy(503, "0"))
    with Client("http://t", retries=2, transport=httpx.MockTransport(rec)) as c:
        with pytest.raises(FwserveError) as ei:
            c.predict(X[:1])
        assert ei.value.status == 503 and ei.value.retry_after == 0 and len(rec.requests) == 3
    rec = Recorder(httpx.ConnectError("down"))
    with Client("http://t", retries=2, transport=httpx.MockTransport(rec)) as c:
        with pytest.raises(httpx.ConnectError):
            c.predict(X[:1], session_id="s")  # a POST without an Idempotency-Key: not resent
        assert len(rec.requests) == 1 and rec.requests[0].headers["x-session-id"] == "s"
    rec = Recorder(busy(422))
    with Client("http://t", retries=2, transport=httpx.MockTransport(rec)) as c:
        with pytest.raises(FwserveError):
            c.get_session("s")
        assert len(rec.requests) == 1  # a 4xx other than 429 is final
    with pytest.raises(ValueError):
        Client("http://t", v1_encoding="carrier-pigeon")


def test_async_client_retries(monkeypatch):
    async def no_sleep(s):
        pass

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    rec = Recorder(busy(429, "1"), httpx.Response(200, json=ADAPTED))

    async def main():
        async with AsyncClient("http://t", retries=1, transport=httpx.MockTransport(rec)) as c:
            return await c.adapt("s", X[:1], ["a"])

    assert asyncio.run(main()).version == 1
    assert len({r.headers["idempotency-key"] for r in rec.requests}) == 1 and len(rec.requests) == 2


def test_session_header_on_session_calls(server):
    seen = []

    def hook(request):
        seen.append((request.method, request.url.path, request.headers.get("x-session-id")))

    with Client(server.url, event_hooks={"request": [hook]}) as c:
        c.create_session("prototype", classes=["a", "b"], session_id="hdr")
        c.adapt("hdr", X, ["a", "b"])
        c.predict(X, session_id="hdr")
        c.get_session("hdr")
        c.infer(BACKBONE, np.stack(X), session_id="hdr")
        c.export_session("hdr")
        c.predict(X)  # base head: no session header
        c.delete_session("hdr")
    assert all(sid == "hdr" for _, _, sid in seen[:-2]) and seen[-2][2] is None and seen[-1][2] == "hdr"


def test_binary_and_json_v2_calls_agree_and_adapt(server):
    xs = np.stack(X)
    with Client(server.url) as c:
        base = [p.label for p in c.predict(X).predictions]
        for binary in (True, False):
            for batch, dt in ((xs, "FP32"), (xs.astype(np.uint8), "UINT8")):
                r = c.infer(BACKBONE, batch, datatype=dt, binary=binary)
                assert r.outputs[0].name == "label" and r.outputs[0].data == base, (binary, dt)
        c.create_session("prototype", classes=["u", "v"], session_id="cli-oip")
        a = c.infer(BACKBONE, xs, session_id="cli-oip", labels=["v", "u"])
        assert a.parameters["session_version"] == 1 and a.parameters["applied"] == 2
        assert {o.name for o in a.outputs} == {"label", "label_index", "score", "correct"}
        j = c.infer(BACKBONE, xs, session_id="cli-oip", labels=[1, 0], binary=False)
        assert j.parameters["session_version"] == 2
        p = c.infer(BACKBONE, xs, session_id="cli-oip", top_k=2)
        assert p.outputs[0].data == ["v", "u"] and {o.name: o.shape for o in p.outputs}["top_k_label"] == [2, 2]
        assert c.model_config(BACKBONE)["name"] == BACKBONE
        assert [s.id for s in c.list_sessions(limit=1000).sessions if s.id == "cli-oip"] == ["cli-oip"]
        with pytest.raises(FwserveError) as ei:
            c.infer("other", xs)
        assert ei.value.status == 404 and ei.value.code == "model_not_found" and "unknown model" in ei.value.message
        with pytest.raises(FwserveError) as ei:
            c.infer(BACKBONE, xs, session_id="cli-oip", labels=["v", "zebra"])
        assert ei.value.status == 422 and ei.value.code == "unknown_label"

"""The engine seam across processes (server/engine/wire.py, server/engine/remote.py): values
survive the wire exactly, and many calls in flight on one channel each get their own answer."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq

from server.config import Settings
from server.engine import wire
from server.engine.messages import AdaptJob, AdaptResult, Input, Prediction, PredictJob, PredictResult, Scored
from server.engine.remote import Channel, EngineServer, RemoteEngine
from server.errors import DomainError, InvalidInput, NotFound


def round_trip(value):
    header, buffers = wire.encode(value)
    return wire.decode(header, [bytes(memoryview(b)) for b in buffers])  # as received: bytes frames


def test_values_cross_the_wire_unchanged():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(1, 28, 28, generator=g)
    large = torch.rand(3, 64, 64, 8, generator=g)  # above the small-frame size: used in place
    half = torch.rand(5, 7, generator=g).to(torch.bfloat16)
    job = AdaptJob("t|s", [Input("k1", small), Input(None, large)], ["3", None], idempotency=("key", "fp"))
    value = ([job, (1, "two", None), {"a": [1.5, True]}, b"\x00raw", half, torch.empty(0)], {"kw": 3})
    (got, kwargs) = round_trip(value)
    assert kwargs == {"kw": 3}
    got_job, tup, d, raw, got_half, empty = got
    assert isinstance(got_job, AdaptJob) and got_job.labels == ["3", None] and got_job.idempotency == ("key", "fp")
    for sent, received in zip(job.inputs, got_job.inputs):
        assert received.key == sent.key and received.pixels.dtype == sent.pixels.dtype
        assert torch.equal(received.pixels, sent.pixels)
    assert tup == (1, "two", None) and d == {"a": [1.5, True]} and raw == b"\x00raw"
    assert got_half.dtype == torch.bfloat16 and torch.equal(got_half, half) and empty.numel() == 0
    res = PredictResult("session", "s", 4, [Prediction("b", 1, 0.75, [Scored("b", 1, 0.75), Scored("a", 0, 0.25)])])
    assert round_trip(res) == res


def test_a_small_tensor_received_is_writable():
    t = round_trip(torch.arange(6, dtype=torch.float32).view(2, 3))
    t += 1  # no read-only frame underneath
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_what_cannot_cross_is_refused():
    class Other:
        """Not part of the engine's vocabulary."""

    with pytest.raises(TypeError, match="Other"):
        wire.encode(Other())
    err = wire.decode_error(wire.encode_error(NotFound("session_not_found", "no session 's'")))
    assert isinstance(err, NotFound) and err.code == "session_not_found"
    hidden = wire.decode_error(wire.encode_error(RuntimeError("secret detail")))
    assert hidden.code == "internal" and "secret" not in hidden.message


class FakeEngine:
    """Answers predict with the job's session and the sum of its pixels; refuses adapt."""

    ready, load_error, model = True, None, None

    async def predict(self, job: PredictJob) -> PredictResult:
        await asyncio.sleep(0)
        total = float(sum(float(i.pixels.sum()) for i in job.inputs))
        return PredictResult("session", job.session, int(total), [])

    async def adapt(self, job: AdaptJob) -> AdaptResult:
        raise InvalidInput("unknown_label", f"no label {job.labels[0]!r}")


def test_many_calls_in_flight_each_get_their_own_answer(tmp_path):
    async def main():
        server = EngineServer(FakeEngine(), f"ipc://{tmp_path / 'e.sock'}")
        stop = asyncio.Event()
        serving = asyncio.create_task(server.serve(stop))
        remote = RemoteEngine(Settings(snapshot_dir=tmp_path), server.address)
        remote.start()
        try:
            jobs = [PredictJob([Input(None, torch.full((1, 4, 4), float(i)))], session=f"s{i}") for i in range(300)]
            results = await asyncio.wait_for(asyncio.gather(*(remote.predict(j) for j in jobs)), 60)
            assert [(r.session_id, r.version) for r in results] == [(f"s{i}", 16 * i) for i in range(300)]
            with pytest.raises(InvalidInput, match="no label 'x'") as e:
                await remote.adapt(AdaptJob("s", [Input(None, torch.zeros(1, 4, 4))], ["x"]))
            assert isinstance(e.value, DomainError) and e.value.code == "unknown_label"
        finally:
            remote.stop()
            stop.set()
            await serving
            server.close()

    asyncio.run(main())


def test_a_channel_queues_what_the_socket_cannot_take_and_sends_it_in_order(tmp_path):
    """With no peer and a send queue of one message, sends are kept by the channel and all
    arrive, in order, once the peer is there."""
    address = f"ipc://{tmp_path / 'q.sock'}"

    async def main():
        ctx = zmq.Context()
        got: list[bytes] = []
        arrived = asyncio.Event()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.SNDHWM, 1)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address)
        sender = Channel(dealer, lambda frames: None)
        for i in range(50):
            sender.send([b"%d" % i])
        assert sender._out, "the socket took every message: nothing was left to queue"
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(address)

        def received(frames):
            got.append(frames[1])
            if len(got) == 50:
                arrived.set()

        receiver = Channel(router, received)
        await asyncio.wait_for(arrived.wait(), 30)
        assert got == [b"%d" % i for i in range(50)] and not sender._out
        sender.close()
        receiver.close()
        ctx.term()

    asyncio.run(main())

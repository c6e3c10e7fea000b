"""Versions, ordering and batching under concurrent load (real HTTP, async client)."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load as st_load

from server.client import AsyncClient
from tests.server.conftest import digits, live_server

N = 64


@pytest.fixture(scope="module", params=[(1, "thread"), (1, "loop"), (2, "auto")],
                ids=["one-process", "one-process-batches-on-loop", "api-workers-2"])
def busy_server(backbone, tmp_path_factory, request):
    # a longer batching window so concurrent requests reliably share micro-batches
    workers, runner = request.param
    with live_server(backbone, tmp_path_factory.mktemp("busy"), api_workers=workers, max_wait_ms=20.0,
                     max_batch_size=32, batch_runner=runner) as srv:
        yield srv


@pytest.mark.parametrize("rule", ["sgd", "delta", "prototype", "rls"])
def test_concurrent_adapts_equal_sequential(busy_server, rule):
    """64 concurrent adapts of one session: version 64, none lost, and the head equals applying
    the same requests one by one in the order the server applied them."""
    xs = digits(N, seed=10)
    labels = [i % 3 for i in range(N)]

    async def main():
        async with AsyncClient(busy_server.url) as c:
            a = (await c.create_session(rule, classes=["x", "y", "z"])).id
            b = (await c.create_session(rule, classes=["x", "y", "z"])).id
            outs = await asyncio.gather(*(c.adapt(a, [xs[i]], [labels[i]]) for i in range(N)))
            versions = [o.version for o in outs]
            assert sorted(versions) == list(range(1, N + 1))
            order = sorted(range(N), key=lambda i: versions[i])
            seq = []
            for i in order:  # one at a time, in the server's order
                seq.append(await c.adapt(b, [xs[i]], [labels[i]]))
            info_a, info_b = await c.get_session(a), await c.get_session(b)
            assert info_a.version == info_b.version == N
            assert info_a.examples_seen == N
            assert info_a.prequential == info_b.prequential
            for i, s in zip(order, seq):  # same pre-update predictions
                assert outs[i].predictions[0].index == s.predictions[0].index
            ta, tb = st_load(await c.export_session(a)), st_load(await c.export_session(b))
            for k in ta:
                assert ta[k].equal(tb[k]), f"{rule}: {k} differs"

    asyncio.run(main())


def test_one_request_many_instances_is_one_sgd_step(busy_server):
    """An sgd adapt request is one mini-batch step; two requests are two steps."""
    xs = digits(2, seed=11)

    async def main():
        async with AsyncClient(busy_server.url) as c:
            one = (await c.create_session("sgd", classes=["x", "y"])).id
            two = (await c.create_session("sgd", classes=["x", "y"])).id
            assert (await c.adapt(one, xs, ["x", "y"])).version == 1
            await asyncio.gather(c.adapt(two, [xs[0]], ["x"]), c.adapt(two, [xs[1]], ["y"]))
            assert (await c.get_session(two)).version == 2
            w1, w2 = st_load(await c.export_session(one))["W"], st_load(await c.export_session(two))["W"]
            assert not w1.equal(w2)

    asyncio.run(main())


def test_read_your_writes(busy_server):
    """An adapt acknowledged before a predict is sent is visible to that predict, while other
    sessions keep the batcher busy."""
    xs = digits(12, seed=12)
    noise = digits(8, seed=13)

    async def main():
        async with AsyncClient(busy_server.url) as c:
            sid = (await c.create_session("delta", classes=["p", "q", "r"], hyperparameters={"beta": 1.0})).id
            others = [(await c.create_session("prototype", classes=["u", "v"])).id for _ in range(3)]
            stop = asyncio.Event()

            async def background():
                k = 0
                while not stop.is_set():
                    o = others[k % 3]
                    await asyncio.gather(c.adapt(o, [noise[k % 8]], ["u"]), c.predict([noise[(k + 1) % 8]], o))
                    k += 1

            bg = asyncio.create_task(background())
            try:
                for i, x in enumerate(xs):
                    label = "pqr"[i % 3]
                    ack = await c.adapt(sid, [x], [label])
                    assert ack.version == i + 1
                    pred = await c.predict([x], session_id=sid)
                    assert pred.version == ack.version
                    assert pred.predictions[0].label == label  # beta = 1: the last row is stored exactly
            finally:
                stop.set()
                await bg

    asyncio.run(main())


def test_batching_under_concurrent_load(busy_server):
    """Concurrent requests of different sessions share micro-batches (metrics show it)."""
    xs = digits(16, seed=14)

    async def main():
        async with AsyncClient(busy_server.url) as c:
            sids = [(await c.create_session("prototype", classes=["a", "b"])).id for _ in range(4)]
            calls = []
            for i, x in enumerate(xs):
                s = sids[i % 4]
                calls.append(c.adapt(s, [x], ["ab"[i % 2]]) if i % 2 else c.predict([x], session_id=s))
            await asyncio.gather(*calls)
            return await c.metrics()

    text = asyncio.run(main())
    from tests.server.conftest import metric_value

    def above_one(name):
        return metric_value(text, f"{name}_count") - metric_value(text, f"{name}_bucket", 'le="1.0"')

    assert above_one("fwserve_batch_size") > 0
    assert above_one("fwserve_batch_sessions") > 0  # different sessions in one batch

"""Session tiers: device slots -> host memory -> disk snapshots and back, bit for bit."""

from __future__ import annotations

from safetensors.torch import load as st_load

from server.client import Client
from tests.server.conftest import digits, live_server

RULES = ["sgd", "delta", "prototype", "rls"]


def test_eviction_round_trip_is_bit_exact(backbone, tmp_path):
    xs = digits(8, seed=20)
    with live_server(backbone, tmp_path, max_device_sessions=2, max_host_sessions=1) as srv, Client(srv.url) as c:
        ids, before, preds = [], {}, {}
        for rule in RULES:
            sid = c.create_session(rule, classes=["a", "b", "c"], session_id=f"tier-{rule}").id
            c.adapt(sid, xs[:3], ["a", "b", "c"])
            c.adapt(sid, xs[3:5], ["c", "a"])
            before[sid] = st_load(c.export_session(sid))
            preds[sid] = c.predict(xs[5:8], session_id=sid, top_k=3)
            ids.append(sid)
        tiers = {sid: c.get_session(sid).tier for sid in ids}
        assert sorted(tiers.values()) == ["device", "device", "disk", "host"]
        snap_files = list((tmp_path / "snapshots").glob("*.safetensors"))
        assert len(snap_files) == 1
        assert srv.metric("fwserve_sessions", 'tier="disk"') == 1
        assert srv.metric("fwserve_sessions", 'tier="device"') == 2
        assert srv.metric("fwserve_session_evictions_total", 'to_tier="disk"') >= 1

        # export straight from the host and disk tiers is exact too
        for sid in ids:
            for k, v in st_load(c.export_session(sid)).items():
                assert v.equal(before[sid][k]), (sid, k, tiers[sid])
        # touching each one (host tier first) brings it back to the device, heads and predictions unchanged
        for sid in sorted(ids, key=lambda s: tiers[s] != "host"):
            p = c.predict(xs[5:8], session_id=sid, top_k=3)
            assert c.get_session(sid).tier == "device"
            assert p.version == preds[sid].version == 2
            assert p.predictions == preds[sid].predictions
            for k, v in st_load(c.export_session(sid)).items():
                assert v.equal(before[sid][k]), (sid, k)
        assert srv.metric("fwserve_session_restores_total", 'from_tier="disk"') >= 1
        assert srv.metric("fwserve_session_restores_total", 'from_tier="host"') >= 1

        # an evicted session keeps learning where it left off
        first = ids[0]
        assert c.get_session(first).tier != "device"
        a = c.adapt(first, xs[5:6], ["b"])
        assert a.version == 3 and c.get_session(first).tier == "device"

        # deleting a disk-tier session removes its snapshot
        on_disk = [sid for sid in ids if c.get_session(sid).tier == "disk"]
        assert on_disk
        c.delete_session(on_disk[0])
        assert len(list((tmp_path / "snapshots").glob("*.safetensors"))) == srv.metric(
            "fwserve_sessions", 'tier="disk"')


def test_more_sessions_in_one_batch_than_slots(backbone, tmp_path):
    """A burst touching more sessions than device slots still completes (batches split)."""
    import asyncio

    from server.client import AsyncClient

    xs = digits(6, seed=21)
    with live_server(backbone, tmp_path, max_device_sessions=2, max_host_sessions=2, max_wait_ms=20.0) as srv:
        async def main():
            async with AsyncClient(srv.url) as c:
                ids = [(await c.create_session("prototype", classes=["a", "b"])).id for _ in range(6)]
                outs = await asyncio.gather(*(c.adapt(s, [x], ["a"]) for s, x in zip(ids, xs)))
                assert all(o.version == 1 for o in outs)
                infos = [await c.get_session(s) for s in ids]
                assert sorted(i.tier for i in infos).count("device") == 2

        asyncio.run(main())

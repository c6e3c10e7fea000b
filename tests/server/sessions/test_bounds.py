"""State stays bounded: idle sessions expire (and used ones do not), logs compact by bytes,
a size-capped store refuses writes (503, nothing acknowledged) and recovers when room is made,
Idempotency-Key answers leave memory with the session they belong to and come back with it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from server.config import Settings
from server.errors import NotFound, Unavailable
from server.rules import get_rule
from server.sessions import SessionStore, upkeep
from tests.server.conftest import digits, live_server

D = 4


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


def store(root: Path, **kw) -> SessionStore:
    s = Settings(snapshot_dir=root, **{"max_device_sessions": 4, "max_host_sessions": 2, **kw})
    return SessionStore(s, D, torch.zeros(2, D), torch.zeros(2), ["0", "1"], "cpu", "test")


def adapt(st: SessionStore, key: str, idem=None) -> int:
    with st.batch([key]) as txn:
        txn.apply(get_rule("sgd"), torch.ones(1, D), torch.tensor([1]), torch.tensor([txn.slot(key)]), None,
                  txn.width(key))
        v = txn.commit(key, 1, 0, 1)
        txn.remember(key, idem, {"version": v})
    assert not txn.errors
    return v


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_idle_sessions_expire_and_used_ones_stay(tmp_path, monkeypatch, durability):
    clock = Clock()
    monkeypatch.setattr(upkeep, "time", clock)
    st = store(tmp_path, durability=durability)
    for sid in ("idle", "used", "changed"):
        st.create("sgd", ["a", "b"], {}, session_id=sid)
    clock.now += 100
    st.info("used")
    adapt(st, "changed")
    clock.now += 50
    assert st.expire(120) == 1
    with pytest.raises(NotFound):
        st.info("idle")
    assert st.info("used").version == 0
    st.close()
    if durability == "wal":  # sessions in the store that no process holds expire too
        clock.now += 1000
        again = store(tmp_path, durability=durability)
        assert again.expire(120) == 2  # used and changed, no longer used
        with pytest.raises(NotFound):
            again.info("used")
        again.close()


def test_logs_compact_by_bytes(tmp_path):
    # without history (--history-versions 1) compaction drops the whole log
    st = store(tmp_path, durability="wal", wal_compact_records=1000, wal_compact_bytes=1024, history_versions=1)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    while st.sync_state("s")["version"] < 20:
        adapt(st, "s")
    assert st.checkpoint() == 1 and st.sync_state("s")["snapshot"] == 20
    assert not list(tmp_path.glob("*.wal"))
    st.close()


def test_a_full_store_refuses_writes_and_recovers(tmp_path):
    st = store(tmp_path, durability="wal", store_max_bytes=6000)
    created = []
    with pytest.raises(Unavailable) as e:
        for i in range(100):
            st.create("sgd", ["a", "b"], {}, session_id=f"s{i}")
            created.append(f"s{i}")
    assert e.value.code == "store_unavailable" and created
    key = created[0]
    before = st.info(key).version
    with st.batch([key]) as txn:  # fills what is left: a log append that does not fit is not acknowledged
        for _ in range(50):
            txn.apply(get_rule("sgd"), torch.ones(1, D), torch.tensor([1]), torch.tensor([txn.slot(key)]), None,
                  txn.width(key))
            txn.commit(key, 1, 0, 1)
    assert txn.errors[key].code == "store_unavailable"
    assert st.info(key).version == before  # dropped and reloaded at its durable version
    for sid in created[1:]:
        st.delete(sid)  # room again
    assert adapt(st, key) == before + 1
    st.create("sgd", ["a"], {}, session_id="after")
    st.close()


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_answers_leave_memory_with_their_session_and_come_back(tmp_path, durability):
    st = store(tmp_path, durability=durability, max_device_sessions=1, max_host_sessions=0)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    assert adapt(st, "s", ("k", "fp")) == 1
    st.create("sgd", ["a", "b"], {}, session_id="other")  # s goes to the disk tier
    assert st.info("s").tier == "disk"
    with st.batch(["s"]) as txn:  # back on the device: its answer with it
        assert txn.lookup("s", ("k", "fp")) == {"version": 1}
    st.close()


def test_idle_sessions_expire_in_a_running_server(backbone, tmp_path):
    x = digits(1, seed=3)[0]
    with live_server(backbone, tmp_path, session_ttl_s=1.0, snapshot_interval_s=0.05) as srv, srv.client() as c:
        assert c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a"], "id": "brief"}).status_code == 201
        deadline = time.monotonic() + 30
        while srv.metric("fwserve_sessions_expired_total") < 1:  # (asking for the session would use it)
            assert time.monotonic() < deadline, "the idle session was never expired"
            time.sleep(0.1)
        assert c.get("/v1/sessions/brief").status_code == 404
        assert c.post("/v1/predict", json={"instances": [{"array": x.tolist()}]}).status_code == 200

"""One micro-batch as a sessions transaction: commit books versions, the log is written before
the transaction ends, a failure inside it or a failed log append leaves every session at its
last durable state, and management calls wait for it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from kernels import SlotBatch
from server.config import Settings
from server.errors import InvalidInput
from server.rules import get_rule
from server.sessions import SessionStore, StoreError
from server.sessions.backends import DirectoryBackend

D = 4


def store(root: Path, durability="wal", backend=None) -> SessionStore:
    s = Settings(snapshot_dir=root, durability=durability, max_device_sessions=4, max_host_sessions=2)
    return SessionStore(s, D, torch.zeros(2, D), torch.zeros(2), ["0", "1"], "cpu", "test", backend=backend)


def adapt(txn, key: str, value: float) -> int:
    rule = get_rule("sgd")
    x = torch.full((1, D), value)
    slots = torch.tensor([txn.slot(key)])
    txn.apply(rule, x, torch.tensor([1]), slots, None, txn.width(key))
    return txn.commit(key, 1, 0, 1)


def head(st: SessionStore, key: str) -> torch.Tensor:
    return st_load(st.export(key))["W"]


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_commit_books_versions_and_the_log_is_written(tmp_path, durability):
    st = store(tmp_path, durability)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    with st.batch(["s", "nobody"]) as txn:
        assert set(txn.found) == {"s"} and txn.missing == {"nobody"}
        assert adapt(txn, "s", 1.0) == 1 and adapt(txn, "s", 2.0) == 2
    assert txn.errors == {} and st.info("s").version == 2
    assert st.sync_state("s")["synced"] == (2 if durability == "wal" else 0)
    st.close()


def test_a_failure_inside_the_transaction_keeps_the_durable_state(tmp_path):
    st = store(tmp_path)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    with st.batch(["s"]) as txn:
        adapt(txn, "s", 1.0)
    durable = head(st, "s")
    with pytest.raises(RuntimeError):
        with st.batch(["s"]) as txn:
            adapt(txn, "s", 5.0)
            raise RuntimeError("a kernel failed half-way")
    assert st.info("s").version == 1 and head(st, "s").equal(durable)  # reloaded from the store
    st.close()


def test_a_failed_log_append_is_reported_per_session_and_applies_nothing(tmp_path):
    backend = DirectoryBackend(tmp_path)
    st = store(tmp_path, backend=backend)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    before = head(st, "s")
    real = backend.append
    backend.append = lambda batch: (_ for _ in ()).throw(StoreError("disk full"))
    with st.batch(["s"]) as txn:
        adapt(txn, "s", 1.0)
    assert txn.errors["s"].code == "store_unavailable"
    backend.append = real
    assert st.info("s").version == 0 and head(st, "s").equal(before)
    st.close()


def test_idempotency_records_within_a_transaction(tmp_path):
    st = store(tmp_path, "none")
    st.create("sgd", ["a", "b"], {}, session_id="s")
    with st.batch(["s"]) as txn:
        assert txn.lookup("s", ("k1", "fp")) is None
        txn.remember("s", ("k1", "fp"), {"version": 1})
    with st.batch(["s"]) as txn:
        assert txn.lookup("s", ("k1", "fp")) == {"version": 1}
        with pytest.raises(InvalidInput):
            txn.lookup("s", ("k1", "other body"))
    st.close()


def test_management_calls_wait_for_an_open_transaction(tmp_path):
    st = store(tmp_path, "none")
    st.create("sgd", ["a", "b"], {}, session_id="s")
    seen = []
    done = threading.Event()

    def reset():
        seen.append(st.reset("s").version)
        done.set()

    with st.batch(["s"]) as txn:
        t = threading.Thread(target=reset)
        t.start()
        adapt(txn, "s", 1.0)
        assert not done.is_set() and st.info("s").version == 1  # the reset has not run inside the batch
    t.join(30)
    # the reset came after the adapt: version 2 (a reset is a new version), statistics back to 0
    assert seen == [2] and st.info("s").version == 2 and st.info("s").examples_seen == 0
    st.close()


@pytest.mark.parametrize("rule_name", ["sgd", "rls"])
def test_the_copy_before_an_update_is_the_same_from_host_groups(tmp_path, rule_name):
    st = store(tmp_path, "none")
    for sid in ("s", "t", "u"):
        st.create(rule_name, ["a", "b"], {}, session_id=sid)
    rule = get_rule(rule_name)
    with st.batch(["s", "t", "u"]) as txn:
        width = txn.width("s")
        host = [txn.slot("t"), -1, txn.slot("s"), txn.slot("t"), txn.slot("u")]
        state_rows = torch.tensor([(txn.state_row(k) or 0) if k else 0 for k in ("t", None, "s", "t", "u")])
        copies = [txn._copy(rule, torch.tensor(host), state_rows if rule.state else None, width, g)
                  for g in (None, SlotBatch.from_list(host).host_groups())]
    tensor_copy, host_copy = copies
    assert tensor_copy.keys == host_copy.keys and sorted(tensor_copy.keys) == ["s", "t", "u"]
    for name in ("slots", "W", "b", "rows"):
        a, b = getattr(tensor_copy, name), getattr(host_copy, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert tensor_copy.state.keys() == host_copy.state.keys()
    assert all(torch.equal(tensor_copy.state[k], host_copy.state[k]) for k in tensor_copy.state)
    assert (tensor_copy.rows is not None) == bool(rule.state)
    st.close()

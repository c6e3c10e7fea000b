"""Data that outlives a release: a store and exports written by the first release (formats /1,
tests/server/sessions/fixtures/format1, made by that release's code) load into this one with
every version, head and idempotency record; what this release writes carries its format version
and the backbone weights' sha256, and a session made for other weights is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from server.config import Settings
from server.errors import Conflict, InvalidInput
from server.rules import get_rule
from server.sessions import SessionStore, codec
from server.sessions.backends.directory import read_frames

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
SESSIONS = {"s-sgd": "sgd", "s-rls": "rls", "s-proto": "prototype", "s-t3a": "t3a"}
D = 8


def store(root: Path, fingerprint=None, **kw) -> SessionStore:
    s = Settings(snapshot_dir=root, durability="wal", max_device_sessions=4, max_host_sessions=2, max_classes=6, **kw)
    g = torch.Generator().manual_seed(0)
    return SessionStore(s, D, torch.randn(3, D, generator=g), torch.randn(3, generator=g), ["0", "1", "2"], "cpu",
                        "fixture", fingerprint=fingerprint)


def test_a_first_release_store_loads_with_every_adapt(tmp_path):
    shutil.copytree(FIXTURES / "store", tmp_path / "store")
    st = store(tmp_path / "store", fingerprint="f" * 64)
    try:
        for sid, rule in SESSIONS.items():
            info = st.info(sid)
            assert (info.rule, info.version, info.examples_seen) == (rule, 3, 6)
            expected = st_load((FIXTURES / f"{sid}.export.safetensors").read_bytes())
            got = st_load(st.export(sid))
            assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got), sid
            with st.batch([sid]) as txn:  # the Idempotency-Key answers logged by that release
                assert txn.lookup(sid, (f"adapt-{sid}-2", "fp")) == {"version": 3, "r": 2}
        assert st.create("sgd", ["a"], {}, session_id="s-sgd", idem=("create-s-sgd", "fp"))[1] is True
    finally:
        st.close()


def test_a_first_release_export_imports(tmp_path):
    st = store(tmp_path, fingerprint="f" * 64)
    data = (FIXTURES / "s-rls.export.safetensors").read_bytes()
    assert codec.read_meta(data)["format"] == "fwserve-session/1"
    info, created = st.import_("copy", data)
    # a new session's first version is 0 (versions number one session's states); the export's
    # statistics and its version come with it (the latter as the history entry's source)
    assert created and info.version == 0 and info.rule == "rls" and info.examples_seen == 6
    (entry,) = st.versions("copy")[0]
    assert entry["kind"] == "import" and entry["source"]["version"] == 3
    st.close()


def test_what_this_release_writes_carries_format_and_weights(tmp_path):
    st = store(tmp_path, fingerprint="a" * 64)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    meta = codec.read_meta(st.export("s"))
    assert meta["format"] == codec.EXPORT_FORMAT == "fwserve-session/2" and meta["weights"] == "a" * 64
    with st.batch(["s"]) as txn:
        txn.apply(get_rule("sgd"), torch.ones(1, D), torch.tensor([1]), torch.tensor([txn.slot("s")]), None,
                  txn.width("s"))
        txn.commit("s", 1, 0, 1)
    (log_file,) = tmp_path.glob("*.wal")
    (record,) = read_frames(log_file.read_bytes())[0]
    rec_meta = codec.read_meta(record)
    assert rec_meta["format"] == codec.RECORD_FORMAT == "fwserve-wal/2" and rec_meta["w"] == "a" * 64
    st.close()


def test_sessions_made_for_other_weights_are_refused(tmp_path):
    st = store(tmp_path / "a", fingerprint="a" * 64)
    st.create("sgd", ["a", "b"], {}, session_id="s")
    exported = st.export("s")
    st.close()
    other = store(tmp_path / "a", fingerprint="b" * 64)  # the same store, the backbone retrained
    with pytest.raises(Conflict) as e:
        other.info("s")
    assert e.value.code == "weights_mismatch"
    with pytest.raises(InvalidInput) as e:
        other.import_("t", exported)
    assert e.value.code == "weights_mismatch"
    other.close()

"""Byte formats: exports and log records round-trip exactly; anything else is a CodecError."""

from __future__ import annotations

import math

import pytest
import torch

from server.sessions import codec


def test_export_round_trip_is_bit_exact_with_any_float():
    W = torch.tensor([[math.inf, -math.inf, math.nan, -0.0], [1e-45, 3.4e38, 1.0, 2.0]])
    meta = {"format": codec.EXPORT_FORMAT, "incarnation": "i1", "version": 7, "x": [1, 2]}
    data = codec.encode({"W": W, "b": torch.zeros(2)}, meta)
    got_meta, got = codec.decode(data)
    assert got_meta == meta and got["W"].view(torch.int32).equal(W.view(torch.int32))
    assert codec.snapshot_head(data) == ("i1", 7)


def test_record_round_trip():
    steps = [(torch.randn(2, 4), torch.tensor([0, 1]), [3, 1]), (torch.randn(1, 4), torch.tensor([-1]), [])]
    idem = {"key": "k", "fp": "f", "expires": 1e12, "response": {"version": 5}}
    rec = codec.Record(5, 3, 2, 2, 123.5, steps, idem)
    data = rec.encode("inc")
    assert codec.record_head(data) == ("inc", 5)
    inc, back = codec.Record.decode(data)
    assert inc == "inc" and (back.version, back.n, back.correct, back.labelled, back.t) == (5, 3, 2, 2, 123.5)
    assert back.idem == idem and len(back.steps) == 2
    for (x, y, o), (x2, y2, o2) in zip(steps, back.steps):
        assert x.equal(x2) and y.equal(y2) and o == o2


@pytest.mark.parametrize("data", [b"", b"garbage", (8).to_bytes(8, "little") + b"{}"])
def test_garbage_is_a_codec_error(data):
    with pytest.raises(codec.CodecError):
        codec.decode(data)
    with pytest.raises(codec.CodecError):
        codec.Record.decode(data)


def test_a_session_export_is_not_a_log_record():
    data = codec.encode({"W": torch.zeros(1, 1)}, {"format": codec.EXPORT_FORMAT})
    with pytest.raises(codec.CodecError):
        codec.Record.decode(data)

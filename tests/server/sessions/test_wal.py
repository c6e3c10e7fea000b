"""WalBuffer.log_steps: each session's exact rows of an update call, and the other sessions'
row counts (server/sessions/wal.py)."""

from __future__ import annotations

import torch

from kernels import SlotBatch
from server.sessions.wal import WalBuffer


def test_each_session_keeps_its_own_rows_and_the_others_counts_with_or_without_host_groups():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.arange(7)
    slots = [4, 4, -1, 2, 9, 2, 4]  # slot 2's rows are not consecutive; row 2 is skipped
    owner = {4: "a", 2: "b", 9: "c"}
    logs = []
    for groups in (None, SlotBatch.from_list(slots).host_groups()):
        wal = WalBuffer()
        wal.log_steps(x, y, torch.tensor(slots), owner, groups)
        logs.append(wal.steps)
    for steps in logs:
        assert set(steps) == {"a", "b", "c"}
        for key, rows, others in (("a", [0, 1, 6], [2, 1]), ("b", [3, 5], [3, 1]), ("c", [4], [3, 2])):
            (xs, ys, got_others), = steps[key]
            assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows]) and got_others == others
            assert xs.untyped_storage().nbytes() == xs.numel() * 4, "a copy of its own, not a view of the call"
    x.zero_()
    assert logs[1]["c"][0][0].abs().sum() > 0, "the log does not alias the call's rows"


def test_without_steps_nothing_is_kept():
    wal = WalBuffer(keep_steps=False)
    wal.log_steps(torch.ones(2, 3), torch.zeros(2), torch.tensor([0, 1]), {0: "a", 1: "b"},
                  SlotBatch.from_list([0, 1]).host_groups())
    assert wal.steps == {}

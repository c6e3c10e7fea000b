"""loadtests/session_memory.py on a small store: the measurement's parts return what the report
reads (no figure is asserted beyond what the layout fixes: the slot pools' bytes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from loadtests import session_memory as sm


def test_rss_counts_the_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        alone = sm.rss(os.getpid())
        for _ in range(100):  # until the child has touched its 64 MiB
            if sm.rss(os.getpid()) - alone > 0 and sm.rss(child.pid) > 64 << 20:
                break
            time.sleep(0.1)
        assert sm.rss(child.pid) > 64 << 20
        assert sm.rss(os.getpid()) >= alone - (8 << 20) + sm.rss(child.pid) - (8 << 20)
    finally:
        child.kill()
        child.wait()


def test_fit_is_the_least_squares_slope():
    assert abs(sm._fit([(0, 10), (10, 30), (20, 50), (30, 70)]) - 2.0) < 1e-12


def test_slope_reads_the_pools_of_a_real_store():
    out = sm.slope(400, 128, "float32", log=lambda *_: None)
    assert [p[0] for p in out["points"]] == [100, 200, 300, 400]
    assert all(p[3] == p[0] for p in out["points"])  # every session on the device tier
    head = 12 * 128 * 4 + 12 * 4  # a 10-class session lives in the 12-class pool
    # pools grow by half when full: between one head and 1.5 heads (plus the minimum rows) each
    assert head <= out["device_bytes_per_session"] <= 1.5 * head * (1 + 16 / 400)
    bf16 = sm.slope(400, 128, "bfloat16", log=lambda *_: None)
    assert abs(bf16["device_bytes_per_session"] - out["device_bytes_per_session"] / 2) < 0.01 * head

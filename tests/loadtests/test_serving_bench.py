"""The side-by-side serving benchmark's machinery (loadtests/serving_bench.py), small: its
requests, its CPU accounting over a process tree, one short level against a real server, and
the summary. The figures themselves live in BENCHMARKS.md; nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from loadtests import serving_bench as sb


def test_transactions_are_reproducible_and_every_image_is_unique():
    a, b = sb.transactions(20, 2, seed=7), sb.transactions(20, 2, seed=7)
    assert a == b  # identical bytes for every server
    images = set()
    for predict, adapt in a:
        assert predict.startswith(b"POST /v1/predict ") and adapt.startswith(b"POST /v1/adapt ")
        body = json.loads(predict.split(b"\r\n\r\n", 1)[1])
        labelled = json.loads(adapt.split(b"\r\n\r\n", 1)[1])
        assert [i["image"] for i in body["instances"]] == [i["image"] for i in labelled["instances"]]
        assert all(i["label"] in sb.CLASSES for i in labelled["instances"])
        images.update(i["image"] for i in body["instances"])
    assert len(images) == 40
    assert sb.transactions(20, 2, seed=8) != a


def test_tree_cpu_counts_every_descendant():
    # a parent whose grandchild burns CPU: the tree's total includes it
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import sys\\nwhile True: pass'])")
    parent = subprocess.Popen([sys.executable, "-c", code])
    grandchild = None
    try:
        while grandchild is None:
            kids = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
            grandchild = int(kids[0]) if kids else None
        burnt = 0.0
        while burnt < 0.2:
            fields = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()
            burnt = (int(fields[11]) + int(fields[12])) / sb.TICK
        assert sb.tree_cpu(parent.pid) >= burnt
    finally:
        if grandchild is not None:
            os.kill(grandchild, 9)
        parent.kill()
        parent.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_one_level_against_the_http_floor():
    spec = next(s for s in sb.specs() if s.name == "http-floor")
    srv = sb.Running(spec, Path(tempfile.mkdtemp()))
    try:
        srv.wait_ready()
        level = sb.run_level(srv, 1, 2, 0.3, sb.transactions(50, 1, seed=1))
    finally:
        srv.stop()
    assert level.errors == 0 and level.transactions > 0 and level.server_cpu > 0
    assert len(level.latencies) == level.transactions
    assert level.batch_rows is None  # no /metrics on the floor


def _level(server, images, conc, cpu, n=100, client=0.5, **kw):
    lv = sb.Level(server, images, conc, transactions=n, seconds=1.0, server_cpu=cpu, crosscheck_cpu=cpu,
                  client_core_busy=client, latencies=[0.01] * n, **kw)
    return lv


def test_summary_ratios_medians_and_invalid_rows():
    levels = [_level("fwserve", 1, 8, c) for c in (0.2, 0.3, 0.4)]
    levels += [_level("baseline", 1, 8, c) for c in (0.8, 1.0, 1.2)]
    levels += [_level("fwserve-bs1", 1, 32, 0.5, client=0.95), _level("fwserve", 1, 32, 0.3, n=200)]
    levels += [_level("fwserve", 8, 8, 0.9, wrapped=True)]
    res = sb.summarize(levels, {1: 2.0, 8: 1.0}, 1.0, 3)
    rows = {(r["server"], r["images"], r["concurrency"]): r for r in res["levels"]}
    assert rows[("fwserve", 1, 8)]["cpu_ms_per_tx"] == (3.0, 2.0, 4.0)  # ms per transaction, median and range
    assert rows[("fwserve", 1, 8)]["valid"] and rows[("fwserve", 1, 8)]["valid_repeats"] == 3
    assert not rows[("fwserve-bs1", 1, 32)]["valid"]  # the load generator's core was the limit
    assert not rows[("fwserve", 8, 8)]["valid"]  # it ran out of unique images
    assert res["ratios"]["cpu_1img_c8_vs_baseline (target <= 0.3)"] == pytest.approx(0.3)
    assert res["ratios"]["cpu_1img_c8_vs_backbone_floor_per_image (target <= 1.8)"] == pytest.approx(3.0)
    assert res["ratios"]["tps_dynamic_vs_bs1_1img_c32 (target >= 1.4)"] == pytest.approx(2.0)
    table = sb.markdown(res)
    assert "| fwserve-bs1 | 1 | 32 |" in table and "| NO |" in table


def test_paired_ratios_divide_within_each_repeat():
    """The machine slows down from one repeat to the next: the ratio of medians moves with it, the
    ratios within a repeat do not; a repeat where one side is invalid is left out."""
    levels = [_level("fwserve", 1, 8, c, repeat=r) for r, c in enumerate((0.2, 0.4, 0.6, 0.3))]
    levels += [_level("baseline", 1, 8, c, repeat=r) for r, c in enumerate((1.0, 2.0, 3.0, 1.0))]
    levels[3].client_core_busy = 0.95  # the load generator's core was the limit in repeat 3
    res = sb.summarize(levels, {1: 2.0}, 1.0, 4)
    assert res["paired_ratios"]["cpu_1img_c8_vs_baseline"] == pytest.approx((0.2, 0.2, 0.2))
    assert res["ratios"]["cpu_1img_c8_vs_baseline (target <= 0.3)"] == pytest.approx(0.4 / 1.5)
    assert res["paired_ratios"]["cpu_8img_c8_vs_baseline"] == (None, None, None)
    assert "| cpu_1img_c8_vs_baseline | 0.20 (0.20-0.20) |" in sb.markdown(res)


def test_refuses_a_machine_without_two_cores(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert sb.main(["--duration", "0.1"]) == 2
    assert "two cores" in capsys.readouterr().err

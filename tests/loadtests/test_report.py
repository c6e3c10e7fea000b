"""Percentile math, /metrics parsing and diffing, and the report formats."""

import csv
import io
import json
import math

import pytest

from loadtests import promscrape, report
from loadtests.report import latency_summary, percentile


def test_nearest_rank_percentiles():
    xs = list(range(1, 101))  # 1..100
    assert percentile(xs, 50) == 50
    assert percentile(xs, 90) == 90
    assert percentile(xs, 99) == 99
    assert percentile(xs, 99.9) == 100
    assert percentile(xs, 100) == 100
    assert percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2  # smallest value with >= 50% at or below it
    assert percentile([1, 2, 3, 4], 51) == 3
    assert percentile(list(range(1, 1001)), 99.9) == 999
    with pytest.raises(ValueError):
        percentile(xs, 0)


def test_latency_summary_in_ms():
    s = latency_summary([0.001 * k for k in range(1, 1001)])  # 1..1000 ms
    assert s["count"] == 1000
    assert s["p50"] == pytest.approx(500) and s["p90"] == pytest.approx(900)
    assert s["p95"] == pytest.approx(950) and s["p99"] == pytest.approx(990)
    assert s["p99_9"] == pytest.approx(999) and s["max"] == pytest.approx(1000)
    assert s["mean"] == pytest.approx(500.5)
    assert latency_summary([])["p99"] is None


BEFORE = """# HELP fwserve_queue_wait_seconds x
# TYPE fwserve_queue_wait_seconds histogram
fwserve_queue_wait_seconds_bucket{le="0.001"} 10.0
fwserve_queue_wait_seconds_bucket{le="0.01"} 10.0
fwserve_queue_wait_seconds_bucket{le="+Inf"} 10.0
fwserve_queue_wait_seconds_sum 0.005
fwserve_queue_wait_seconds_count 10.0
fwserve_queue_wait_seconds_created 1.7e9
fwserve_batch_size_sum 40.0
fwserve_batch_size_count 10.0
fwserve_head_update_seconds_sum{rule="sgd"} 0.01
fwserve_head_update_seconds_count{rule="sgd"} 10.0
fwserve_feature_cache_hits_total 3.0
fwserve_sessions{tier="device"} 4.0
fwserve_build_info{backbone="a \\"quoted\\" name",device="cpu"} 1.0
"""

AFTER = """fwserve_queue_wait_seconds_bucket{le="0.001"} 10.0
fwserve_queue_wait_seconds_bucket{le="0.01"} 110.0
fwserve_queue_wait_seconds_bucket{le="+Inf"} 110.0
fwserve_queue_wait_seconds_sum 0.505
fwserve_queue_wait_seconds_count 110.0
fwserve_batch_size_sum 840.0
fwserve_batch_size_count 110.0
fwserve_head_update_seconds_sum{rule="sgd"} 0.03
fwserve_head_update_seconds_count{rule="sgd"} 20.0
fwserve_head_update_seconds_sum{rule="rls"} 0.5
fwserve_head_update_seconds_count{rule="rls"} 100.0
fwserve_feature_cache_hits_total 13.0
fwserve_sessions{tier="device"} 9.0
"""


def test_parse_and_diff():
    b, a = promscrape.parse(BEFORE), promscrape.parse(AFTER)
    assert b.get("fwserve_queue_wait_seconds_count") == 10
    assert b.get("fwserve_build_info", device="cpu") == 1
    assert dict(next(ls for (n, ls) in b.samples if n == "fwserve_build_info"))["backbone"] == 'a "quoted" name'
    assert not b.has("fwserve_queue_wait_seconds_created")
    d = promscrape.diff(b, a)
    assert d.get("fwserve_queue_wait_seconds_count") == 100
    assert d.buckets("fwserve_queue_wait_seconds") == [(0.001, 0.0), (0.01, 100.0), (math.inf, 100.0)]


def test_histogram_quantile_interpolates_like_prometheus():
    b = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert promscrape.histogram_quantile(0.5, b) == pytest.approx(0.1)
    assert promscrape.histogram_quantile(0.75, b) == pytest.approx(0.15)
    assert promscrape.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert promscrape.histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 10.0)]) == 0.1


def test_server_split():
    s = promscrape.server_split(promscrape.parse(BEFORE), promscrape.parse(AFTER))
    assert s["queue_wait_mean_ms"] == pytest.approx(5.0)  # 0.5 s over 100 requests
    assert s["batch_size_mean"] == pytest.approx(8.0)
    assert s["head_update_mean_ms"] == {"sgd": pytest.approx(2.0), "rls": pytest.approx(5.0)}
    assert s["cache_hits"] == 10
    assert s["sessions"] == {"device": 9}
    assert s["backbone_forward_mean_ms"] is None  # no forward in the window


def _run():
    lv = {
        "scenario": "predict", "mode": "closed", "arrival": None, "offered": 8, "duration_s": 2.0,
        "scheduled": 10, "sent": 10, "completed": 10, "ok": 9, "errors": {"503": 1}, "dropped": 0,
        "late_sends": 0, "throughput_rps": 4.5, "requests_per_s": 5.0, "images_per_s": 4.5,
        "latency_ms": latency_summary([0.01] * 10), "latencies_ms": [10.0] * 10,
        "server": {"queue_wait_mean_ms": 1.0, "head_update_mean_ms": {"sgd": 0.1}, "batch_size_mean": 3.0},
        "extras": {"prequential_accuracy": 0.5},
    }
    return {"config": {"scenario": "predict", "command": "python -m loadtests ..."}, "levels": [lv, dict(lv, offered=16)]}


def test_formats(tmp_path):
    run = _run()
    rows = list(csv.DictReader(io.StringIO(report.to_csv(run["levels"]))))
    assert [r["offered"] for r in rows] == ["8", "16"]
    assert rows[0]["errors"] == "1" and rows[0]["errors_by_status"] == "503=1"
    assert rows[0]["lat_p99_ms"] == "10.0" and rows[0]["server_head_update_mean_ms"] == "sgd=0.1000"
    assert set(report.CSV_COLUMNS) == set(rows[0])
    assert json.loads(report.to_json(run))["levels"][1]["offered"] == 16
    md = report.to_markdown(run)
    assert "| c=8 | 4.5 |" in md and "503: 1" in md and "prequential_accuracy = 0.5" in md
    assert "python -m loadtests ..." in md
    warns = report.write_outputs(run, tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "r.png")
    for ext in ("json", "csv", "md"):
        assert (tmp_path / f"r.{ext}").stat().st_size > 0
    if not warns:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

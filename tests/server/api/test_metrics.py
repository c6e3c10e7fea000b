"""/metrics: names, labels, the feature cache, and `promtool check metrics`."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.server.conftest import arr, digits, metric_value

EXPECTED = [
    "fwserve_request_duration_seconds_bucket",
    "fwserve_queue_wait_seconds_bucket",
    "fwserve_batch_size_bucket",
    "fwserve_backbone_forward_seconds_bucket",
    "fwserve_head_predict_seconds_bucket",
    "fwserve_head_update_seconds_bucket",
    "fwserve_sessions",
    "fwserve_session_evictions_total",
    "fwserve_feature_cache_hits_total",
    "fwserve_feature_cache_misses_total",
    "fwserve_prequential_correct_total",
    "fwserve_prequential_predictions_total",
    "fwserve_adapted_examples_total",
    "fwserve_build_info",
]


@pytest.fixture(scope="module")
def scrape(server):
    xs = digits(3, seed=40)
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"rule": "rls", "classes": ["a", "b"], "id": "metrics-secret-id"}).json()["id"]
        c.post("/v1/adapt", json={"session_id": sid, "instances": [{**arr(xs[0]), "label": "a"}]})
        c.post("/v1/predict", json={"session_id": sid, "instances": [arr(xs[1])]})
        c.post("/v1/predict", json={"session_id": "missing", "instances": [arr(xs[1])]})
        return c.get("/metrics").text


def test_metric_names_and_labels(scrape):
    for name in EXPECTED:
        assert re.search(rf"^{name}(\{{| )", scrape, re.M), name
    assert "metrics-secret-id" not in scrape  # never a session id as a label
    assert metric_value(scrape, "fwserve_head_update_seconds_count", 'rule="rls"') >= 1
    assert metric_value(scrape, "fwserve_prequential_predictions_total", 'rule="rls"') >= 1
    assert metric_value(scrape, "fwserve_request_duration_seconds_count",
                        'route="/v1/predict",method="POST",status="404"') >= 1
    assert 'route="/v1/sessions/{session_id}' in scrape or "route=\"/v1/adapt\"" in scrape
    assert metric_value(scrape, "fwserve_build_info") == 1
    # No silent kernel path: the head ops' implementation on the server's device is a label.
    assert re.search(r'^fwserve_build_info\{[^}]*kernels="torch"', scrape, re.M), "kernels label missing"


def test_feature_cache_predict_then_adapt_runs_backbone_once(server):
    x = digits(1, seed=41)[0]
    with server.client() as c:
        sid = c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"]}).json()["id"]
        forwards = server.metric("fwserve_backbone_forward_seconds_count")
        hits = server.metric("fwserve_feature_cache_hits_total")
        c.post("/v1/predict", json={"session_id": sid, "instances": [arr(x)]})
        c.post("/v1/adapt", json={"session_id": sid, "instances": [{**arr(x), "label": "a"}]})
        assert server.metric("fwserve_backbone_forward_seconds_count") == forwards + 1
        assert server.metric("fwserve_feature_cache_hits_total") == hits + 1


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus); CI installs it")
def test_promtool_check_metrics(scrape):
    proc = subprocess.run(["promtool", "check", "metrics"], input=scrape.encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()

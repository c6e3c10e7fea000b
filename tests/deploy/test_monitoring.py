"""Monitoring: the alerting rules pass promtool (syntax and unit tests), the Grafana dashboard
is the generator's output, covers what operators need, and every query parses and names only
metrics the server exports (server/metrics.py)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from tests.deploy.helpers import MONITORING, exported_metric_names, promql_metric_names, promtool_check_exprs, run, tool

ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "fwserve-dashboard.json"
# series that come from Prometheus itself, not from the server
NON_SERVER_METRICS = {"up"}


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _dashboard_exprs() -> dict[str, str]:
    d = json.loads(DASHBOARD.read_text())
    out = {}
    for p in d["panels"]:
        for t in p.get("targets", []):
            out[f"{p['title']} {t['refId']}"] = t["expr"]
    return out


def _grafana_to_promql(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_promtool_check_rules():
    promtool = tool("promtool", "prometheus")
    p = run([promtool, "check", "rules", str(ALERTS)])
    assert p.returncode == 0, p.stdout + p.stderr


def test_promtool_rule_unit_tests():
    promtool = tool("promtool", "prometheus")
    p = run([promtool, "test", "rules", str(MONITORING / "alerts.test.yaml")], cwd=MONITORING)
    assert p.returncode == 0, p.stdout + p.stderr


def test_alerts_name_exported_metrics():
    exported = exported_metric_names()
    for r in _alert_rules():
        assert r["alert"].startswith("Fwserve") and r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        names = promql_metric_names(r["expr"])
        assert names, r["alert"]
        missing = names - exported - NON_SERVER_METRICS
        assert not missing, f"alert {r['alert']} uses metrics the server does not export: {missing}"


def test_dashboard_is_generated(tmp_path):
    sys.path.insert(0, str(MONITORING))
    try:
        import make_dashboard
    finally:
        sys.path.remove(str(MONITORING))
    assert make_dashboard.render() == DASHBOARD.read_text(), (
        "fwserve-dashboard.json is stale: run python deploy/monitoring/make_dashboard.py")


def test_dashboard_covers_operations():
    d = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for needed in ("adapt request latency p50 / p99", "head update latency", "throughput", "queue depth",
                   "batch size", "sessions by tier", "prequential accuracy"):
        assert needed in titles, f"dashboard lacks a panel on {needed!r}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "namespace", "pod"}


def test_dashboard_queries_parse_and_name_exported_metrics(tmp_path):
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    exported = exported_metric_names()
    for title, e in exprs.items():
        missing = promql_metric_names(e) - exported - NON_SERVER_METRICS
        assert not missing, f"panel {title!r} uses metrics the server does not export: {missing}"
    d = json.loads(DASHBOARD.read_text())
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            inner = re.search(r"label_values\((.*),\s*\w+\)$", v["query"]["query"]).group(1)
            exprs[f"variable {v['name']}"] = inner
    promtool_check_exprs({k: _grafana_to_promql(v) for k, v in exprs.items()}, tmp_path)


def test_prometheus_adapter_query_parses(tmp_path):
    rule = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    q = (rule["metricsQuery"].replace("<<.Series>>", "fwserve_queue_depth")
         .replace("<<.LabelMatchers>>", 'namespace="fwserve",pod=~"fwserve-a|fwserve-b"')
         .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in q
    promtool_check_exprs({"adapter": q, "series": rule["seriesQuery"]}, tmp_path)


def test_metric_name_parser():
    assert promql_metric_names('sum by (rule) (rate(fwserve_x_total{a="fwserve_y"}[5m])) / up') == {"fwserve_x_total"}
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(foo_bucket{}[5m])))') == {"foo_bucket"}

"""Write the Grafana dashboard for fwserve: python deploy/monitoring/make_dashboard.py

The committed fwserve-dashboard.json is this script's output (tests/deploy checks that they
agree, that every query parses, and that it names only metrics the server exports). Import it
in Grafana (Dashboards > New > Import) or load it with the sidecar of kube-prometheus-stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("fwserve-dashboard.json")
SEL = 'namespace=~"$namespace", pod=~"$pod"'
RATE = "$__rate_interval"


def q(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
            "legendFormat": legend, "refId": ref, "range": True}


def quantiles(metric: str, by: str, extra: str = "", qs=(0.5, 0.99)) -> list[dict]:
    sel = SEL + (", " + extra if extra else "")
    by_ = f"{by}, le" if by else "le"
    out = []
    for i, qq in enumerate(qs):
        label = f"p{int(qq * 100)}"
        legend = f"{{{{{by}}}}} {label}" if by else label
        out.append(q(f"histogram_quantile({qq}, sum by ({by_}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
                     legend, chr(65 + i)))
    return out


def panel(pid: int, title: str, targets: list[dict], x: int, y: int, unit: str, desc: str,
          w: int = 12, h: int = 8, kind: str = "timeseries", **field) -> dict:
    defaults = {"unit": unit, **field}
    p = {"id": pid, "type": kind, "title": title, "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
         "fieldConfig": {"defaults": defaults, "overrides": []}}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    return p


def row(pid: int, title: str, y: int) -> dict:
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def var(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def dashboard() -> dict:
    panels = [
        row(1, "Overview", 0),
        panel(2, "Ready replicas", [q(f"sum(fwserve_ready{{{SEL}}})", "ready", "A")], 0, 1, "none",
              "Pods whose backbone is loaded and warmed up (fwserve_ready).", w=4, h=4, kind="stat"),
        panel(3, "Requests / s", [q(f"sum(rate(fwserve_request_duration_seconds_count{{{SEL}}}[{RATE}]))", "req/s", "A")],
              4, 1, "reqps", "All HTTP requests.", w=4, h=4, kind="stat"),
        panel(4, "5xx ratio", [q(f'sum(rate(fwserve_request_duration_seconds_count{{{SEL}, status=~"5.."}}[{RATE}]))'
                                 f" / sum(rate(fwserve_request_duration_seconds_count{{{SEL}}}[{RATE}]))", "5xx", "A")],
              8, 1, "percentunit", "Share of requests answered 5xx (503 backpressure, 504 queue timeout).",
              w=4, h=4, kind="stat"),
        panel(5, "Sessions", [q(f"sum(fwserve_sessions{{{SEL}}})", "sessions", "A")], 12, 1, "none",
              "Sessions in all tiers, all pods.", w=4, h=4, kind="stat"),
        panel(6, "Prequential accuracy", [q(f"sum(rate(fwserve_prequential_correct_total{{{SEL}}}[{RATE}]))"
                                            f" / sum(rate(fwserve_prequential_predictions_total{{{SEL}}}[{RATE}]))",
                                            "accuracy", "A")],
              16, 1, "percentunit", "Adapt examples predicted correctly before their update, all rules.",
              w=4, h=4, kind="stat", min=0, max=1),
        panel(7, "Queue depth (max)", [q(f"max(fwserve_queue_depth{{{SEL}}})", "queue", "A")], 20, 1, "none",
              "Deepest batch queue of any pod (the autoscaler's metric).", w=4, h=4, kind="stat"),

        row(10, "Adaptation", 5),
        panel(11, "Adapt request latency p50 / p99",
              quantiles("fwserve_request_duration_seconds", "", 'route="/v1/adapt"'), 0, 6, "s",
              "End-to-end /v1/adapt: decode, queue wait, backbone, head update."),
        panel(12, "Head update latency p50 / p99 by rule", quantiles("fwserve_head_update_seconds", "rule"),
              12, 6, "s", "One grouped update kernel call per rule and micro-batch (the adaptation itself)."),
        panel(13, "Adapted examples / s by rule",
              [q(f"sum by (rule) (rate(fwserve_adapted_examples_total{{{SEL}}}[{RATE}]))", "{{rule}}", "A")],
              0, 14, "none", "Labelled examples applied to session heads."),
        panel(14, "Prequential accuracy by rule",
              [q(f"sum by (rule) (rate(fwserve_prequential_correct_total{{{SEL}}}[{RATE}]))"
                 f" / sum by (rule) (rate(fwserve_prequential_predictions_total{{{SEL}}}[{RATE}]))", "{{rule}}", "A")],
              12, 14, "percentunit", "Test-then-train accuracy: each adapt example predicted before learning from it.",
              min=0, max=1),

        row(20, "Throughput and latency", 22),
        panel(21, "Throughput by route",
              [q(f"sum by (route) (rate(fwserve_request_duration_seconds_count{{{SEL}}}[{RATE}]))", "{{route}}", "A")],
              0, 23, "reqps", "HTTP requests per second by route template."),
        panel(22, "Predict request latency p50 / p99",
              quantiles("fwserve_request_duration_seconds", "", 'route="/v1/predict"'), 12, 23, "s",
              "End-to-end /v1/predict."),
        panel(23, "Responses by status",
              [q(f"sum by (status) (rate(fwserve_request_duration_seconds_count{{{SEL}}}[{RATE}]))", "{{status}}", "A")],
              0, 31, "reqps", "HTTP responses per second by status code."),
        panel(24, "Rejected requests by reason",
              [q(f"sum by (reason) (rate(fwserve_rejected_requests_total{{{SEL}}}[{RATE}]))", "{{reason}}", "A")],
              12, 31, "reqps", "queue_full (503) and timeout (504, adapt not applied)."),

        row(30, "Batching", 39),
        panel(31, "Queue depth by pod", [q(f"fwserve_queue_depth{{{SEL}}}", "{{pod}}", "A")], 0, 40, "none",
              "Requests waiting in each pod's batch queue."),
        panel(32, "Queue wait p50 / p99", quantiles("fwserve_queue_wait_seconds", ""), 12, 40, "s",
              "Time from enqueue to the start of the request's micro-batch."),
        panel(33, "Batch size p50 / p99 and mean",
              quantiles("fwserve_batch_size", "")
              + [q(f"sum(rate(fwserve_batch_size_sum{{{SEL}}}[{RATE}])) / sum(rate(fwserve_batch_size_count{{{SEL}}}[{RATE}]))",
                   "mean", "C")],
              0, 48, "none", "Rows (instances and support examples) per micro-batch."),
        panel(34, "Backbone forward p50 / p99", quantiles("fwserve_backbone_forward_seconds", ""), 12, 48, "s",
              "One backbone forward over a micro-batch's feature-cache misses."),

        row(40, "Sessions", 56),
        panel(41, "Sessions by tier", [q(f"sum by (tier) (fwserve_sessions{{{SEL}}})", "{{tier}}", "A")], 0, 57, "none",
              "Where session heads live: device slots, host memory, disk snapshots."),
        panel(42, "Evictions and restores",
              [q(f"sum by (to_tier) (rate(fwserve_session_evictions_total{{{SEL}}}[{RATE}]))", "evicted to {{to_tier}}", "A"),
               q(f"sum by (from_tier) (rate(fwserve_session_restores_total{{{SEL}}}[{RATE}]))", "restored from {{from_tier}}", "B")],
              12, 57, "ops", "Sessions moved down a tier, and brought back to the device."),
        panel(43, "Feature cache hit ratio",
              [q(f"sum(rate(fwserve_feature_cache_hits_total{{{SEL}}}[{RATE}])) / (sum(rate(fwserve_feature_cache_hits_total{{{SEL}}}[{RATE}]))"
                 f" + sum(rate(fwserve_feature_cache_misses_total{{{SEL}}}[{RATE}])))", "hit ratio", "A")],
              0, 65, "percentunit", "Requests whose backbone features came from the content-hash cache.", min=0, max=1),
        panel(44, "Sessions by pod", [q(f"sum by (pod) (fwserve_sessions{{{SEL}}})", "{{pod}}", "A")], 12, 65, "none",
              "Sessions per replica: consistent hashing on X-Session-ID should keep these even."),
    ]
    return {
        "uid": "fwserve-overview",
        "title": "fwserve",
        "description": "fwserve online-adaptation server: adaptation latency, throughput, batching, sessions, prequential accuracy.",
        "tags": ["fwserve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            var("namespace", "label_values(fwserve_ready, namespace)", "Namespace"),
            var("pod", 'label_values(fwserve_ready{namespace=~"$namespace"}, pod)', "Pod"),
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)

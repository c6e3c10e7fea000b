"""The HTTP side's own metrics. In one process they join the engine's registry, so /metrics is one
scrape; with API worker processes each worker's values go to prometheus_client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR) and any worker's /metrics joins all of them to the engine's scrape."""

from __future__ import annotations

import os
from typing import Optional

from prometheus_client import CollectorRegistry, Histogram, generate_latest

LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "fwserve_request_duration_seconds",
            "HTTP request duration by route template, method and status code.",
            ["route", "method", "status"],
            buckets=LATENCY,
            registry=self.registry,
        )


def workers_scrape() -> bytes:
    """Every API worker's metrics, summed over processes (multiprocess mode only)."""
    from prometheus_client import multiprocess

    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return generate_latest(reg)

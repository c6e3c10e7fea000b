"""Every Prometheus metric of the server, in one per-app ``CollectorRegistry``.

The engine observes most of them; the API layer observes request durations; the session store
reports tier moves through the ``StoreEvents`` methods below.

Names carry the ``fwserve_`` prefix and base units (seconds, bytes); labels are bounded
(route templates, status codes, rule names, tiers) and never a session id.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server import __version__
from server.rules import RULES
from server.sessions import StoreEvents

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(StoreEvents):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.queue_wait = Histogram(
            "fwserve_queue_wait_seconds",
            "Time a request waited in the batch queue before its micro-batch started.",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_depth = Gauge("fwserve_queue_depth", "Requests waiting in the batch queue.", registry=r)
        self.rejected = Counter(
            "fwserve_rejected_requests",
            "Requests refused or dropped by the batcher, by reason (queue_full, fair_share, timeout).",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "fwserve_batch_size",
            "Rows (instances and support examples) per micro-batch.",
            buckets=_BATCH,
            registry=r,
        )
        self.batch_requests = Histogram(
            "fwserve_batch_requests",
            "Requests per micro-batch.",
            buckets=_BATCH,
            registry=r,
        )
        self.batch_sessions = Histogram(
            "fwserve_batch_sessions",
            "Distinct sessions per micro-batch (requests of different sessions share batches).",
            buckets=_BATCH,
            registry=r,
        )
        self.backbone_forward = Histogram(
            "fwserve_backbone_forward_seconds",
            "One backbone forward over a micro-batch's feature-cache misses.",
            buckets=_LATENCY,
            registry=r,
        )
        self.head_predict = Histogram(
            "fwserve_head_predict_seconds",
            "One grouped head_forward kernel call.",
            buckets=_FAST,
            registry=r,
        )
        self.head_update = Histogram(
            "fwserve_head_update_seconds",
            "One grouped head update kernel call (the adaptation latency), by rule.",
            ["rule"],
            buckets=_FAST,
            registry=r,
        )
        self.sessions = Gauge("fwserve_sessions", "Sessions by tier (device, host, disk).", ["tier"], registry=r)
        for tier in ("device", "host", "disk"):
            self.sessions.labels(tier=tier).set(0)
        self.evictions = Counter(
            "fwserve_session_evictions",
            "Sessions moved down a tier (to host or to disk).",
            ["to_tier"],
            registry=r,
        )
        self.restores = Counter(
            "fwserve_session_restores",
            "Evicted sessions brought back to the device, by the tier they came from.",
            ["from_tier"],
            registry=r,
        )
        self.cache_hits = Counter("fwserve_feature_cache_hits", "Feature-cache hits.", registry=r)
        self.cache_misses = Counter("fwserve_feature_cache_misses", "Feature-cache misses.", registry=r)
        self.cache_entries = Gauge("fwserve_feature_cache_entries", "Entries in the feature cache.", registry=r)
        self.prequential_correct = Counter(
            "fwserve_prequential_correct",
            "Adapt examples whose pre-update prediction was correct, by rule.",
            ["rule"],
            registry=r,
        )
        self.prequential_total = Counter(
            "fwserve_prequential_predictions",
            "Adapt examples predicted before their update, by rule.",
            ["rule"],
            registry=r,
        )
        self.adapted = Counter(
            "fwserve_adapted_examples", "Labelled examples applied to session heads, by rule.", ["rule"], registry=r
        )
        self.idempotency_evictions = Counter(
            "fwserve_idempotency_evictions",
            "Idempotency-Key answers dropped before their time (a session over --idempotency-max-bytes).",
            registry=r,
        )
        self.sessions_expired = Counter(
            "fwserve_sessions_expired", "Sessions deleted after --session-ttl-s without use.", registry=r,
        )
        self.label_free_resets = Counter(
            "fwserve_label_free_resets",
            "Sessions of label-free rules reset to their initial head by the collapse guard, by rule.",
            ["rule"],
            registry=r,
        )
        self.guard_trips = Counter(
            "fwserve_guard_trips",
            "Session guards that acted, by rule and action (rollback, freeze, alert; reset: the tent rule's own "
            "collapse reset).",
            ["rule", "action"],
            registry=r,
        )
        # expose every labelled series from the start (0 until observed)
        for tier in ("host", "disk"):
            self.evictions.labels(to_tier=tier)
            self.restores.labels(from_tier=tier)
        for reason in ("queue_full", "fair_share", "timeout"):
            self.rejected.labels(reason=reason)
        for rule in RULES:
            for metric in (self.head_update, self.prequential_correct, self.prequential_total, self.adapted,
                           self.label_free_resets):
                metric.labels(rule=rule)
            for action in ("rollback", "freeze", "alert"):
                self.guard_trips.labels(rule=rule, action=action)
        self.ready = Gauge("fwserve_ready", "1 once the backbone is loaded and warmed up.", registry=r)
        self.build_info = Info("fwserve_build", "Build and runtime information.", registry=r)

    # ---- StoreEvents ----------------------------------------------------------------------

    def tier_counts(self, counts: dict[str, int]) -> None:
        for tier, n in counts.items():
            self.sessions.labels(tier=tier).set(n)

    def moved(self, kind: str, tier: str) -> None:
        if kind == "evict":
            self.evictions.labels(to_tier=tier).inc()
        else:
            self.restores.labels(from_tier=tier).inc()

    def expired(self, n: int) -> None:
        self.sessions_expired.inc(n)

    def idempotency_evicted(self, n: int) -> None:
        self.idempotency_evictions.inc(n)

    def set_build_info(self, backbone: str, device: str, kernels: str = "", weights: str = "") -> None:
        """kernels: the head ops' implementation on this device (kernels.dispatch.describe_implementations);
        weights: the start of the backbone weights' sha256."""
        import torch

        self.build_info.info(
            {
                "version": __version__,
                "backbone": backbone,
                "weights_sha256": weights,
                "device": device,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "kernels": kernels,
            }
        )

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

"""Parse the server's Prometheus text exposition and turn two scrapes (before and after a load
level) into the server-side split of that level: queue wait, backbone forward, head update by
rule, batch sizes, cache and tier traffic.

Only the text format's sample lines are read (``name{labels} value [timestamp]``); comments and
``_created`` samples are ignored. Counters and histograms are differenced, gauges are read from
the second scrape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Key = tuple[str, tuple[tuple[str, str], ...]]


def _unescape(v: str) -> str:
    return v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _float(s: str) -> float:
    s = s.strip()
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    return float(s)


@dataclass
class Scrape:
    """Samples of one scrape: ``{(name, sorted label pairs): value}``."""

    samples: dict[Key, float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        """Sum over every sample of `name` whose labels include `labels` (0 when none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def label_values(self, name: str, label: str) -> list[str]:
        out = {dict(ls).get(label) for (n, ls), _ in self.samples.items() if n == name}
        return sorted(v for v in out if v is not None)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` pairs of histogram `name`, summed over other labels."""
        acc: dict[float, float] = {}
        want = set(labels.items())
        for (n, ls), v in self.samples.items():
            if n != name + "_bucket" or not want <= set(ls):
                continue
            le = _float(dict(ls)["le"])
            acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())

    def has(self, name: str) -> bool:
        return any(n == name for (n, _) in self.samples)


def parse(text: str) -> Scrape:
    out: dict[Key, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, _, labels, value = m.group(1), m.group(2), m.group(3), m.group(4)
        if name.endswith("_created"):
            continue
        try:
            val = _float(value)
        except ValueError:
            continue
        pairs = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(labels or "")))
        out[(name, pairs)] = out.get((name, pairs), 0.0) + val
    return Scrape(out)


def diff(before: Scrape, after: Scrape) -> Scrape:
    """after - before, sample by sample (a sample missing before counts as 0). Gauges come out
    as differences too; read them from `after` directly."""
    out = dict(after.samples)
    for k, v in before.samples.items():
        out[k] = out.get(k, 0.0) - v
    return Scrape(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> Optional[float]:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank
    q * count; the +Inf bucket answers with the largest finite bound. None without samples."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def _mean(d: Scrape, name: str, **labels: str) -> Optional[float]:
    n = d.get(name + "_count", **labels)
    return d.get(name + "_sum", **labels) / n if n > 0 else None


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else v * 1000.0


def server_split(before: Scrape, after: Scrape) -> dict:
    """The server-side picture of one level, from two scrapes of ``/metrics``.

    Times are means per observation in milliseconds: queue wait per request, backbone forward per
    micro-batch, head forward / update per kernel call; batch sizes are means per micro-batch.
    """
    d = diff(before, after)
    out: dict = {
        "batches": d.get("fwserve_batch_size_count"),
        "queue_wait_mean_ms": _ms(_mean(d, "fwserve_queue_wait_seconds")),
        "queue_wait_p99_ms": _ms(histogram_quantile(0.99, d.buckets("fwserve_queue_wait_seconds"))),
        "backbone_forward_mean_ms": _ms(_mean(d, "fwserve_backbone_forward_seconds")),
        "backbone_forwards": d.get("fwserve_backbone_forward_seconds_count"),
        "backbone_seconds": d.get("fwserve_backbone_forward_seconds_sum"),
        "head_predict_mean_ms": _ms(_mean(d, "fwserve_head_predict_seconds")),
        "batch_size_mean": _mean(d, "fwserve_batch_size"),
        "batch_requests_mean": _mean(d, "fwserve_batch_requests"),
        "head_update_mean_ms": {},
        "cache_hits": d.get("fwserve_feature_cache_hits_total") or d.get("fwserve_feature_cache_hits"),
        "cache_misses": d.get("fwserve_feature_cache_misses_total") or d.get("fwserve_feature_cache_misses"),
        "evictions": d.get("fwserve_session_evictions_total") or d.get("fwserve_session_evictions"),
        "restores": d.get("fwserve_session_restores_total") or d.get("fwserve_session_restores"),
        "rejected": d.get("fwserve_rejected_requests_total") or d.get("fwserve_rejected_requests"),
        "sessions": {t: after.get("fwserve_sessions", tier=t) for t in after.label_values("fwserve_sessions", "tier")},
    }
    for rule in after.label_values("fwserve_head_update_seconds_count", "rule"):
        m = _mean(d, "fwserve_head_update_seconds", rule=rule)
        if m is not None:
            out["head_update_mean_ms"][rule] = m * 1000.0
    rss = after.get("process_resident_memory_bytes")
    out["resident_memory_bytes"] = rss if rss > 0 else None
    return out

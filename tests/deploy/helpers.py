"""Shared helpers for the deployment tests: paths, external tools, rendering, metric names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = DEPLOY / "monitoring"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())


def tool(name: str, package: str) -> str:
    """Path of an external tool, or skip the test saying how to get it (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install the Debian package {package} (.ci/run does)")
    return path


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@lru_cache(maxsize=None)
def render_dir(path: str) -> tuple[dict, ...]:
    """`kubectl kustomize PATH` as a tuple of resource dicts."""
    kubectl = tool("kubectl", "kubectl")
    p = run([kubectl, "kustomize", path])
    assert p.returncode == 0, f"kubectl kustomize {path} failed:\n{p.stderr}"
    return tuple(d for d in yaml.safe_load_all(p.stdout) if d)


def render(overlay: str) -> tuple[dict, ...]:
    return render_dir(str(K8S / "overlays" / overlay))


def by_kind(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = by_kind(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---- metric names -------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


@lru_cache(maxsize=None)
def exported_metric_names() -> frozenset[str]:
    """Every sample name the server's registry exposes on /metrics (server/metrics.py), with the
    suffixes the text format adds (_total, _bucket, _count, _sum, _info, ...)."""
    sys.path.insert(0, str(REPO))
    from server.api.metrics import ApiMetrics
    from server.engine.metrics import Metrics

    names = set()
    registry = Metrics().registry
    ApiMetrics(registry)
    for fam in registry.collect():
        names.update(fam.name + s for s in _SUFFIXES[fam.type])
    assert names, "server.engine.metrics.Metrics registers no metrics"
    return frozenset(names)


# PromQL functions, keywords and aggregation words that look like metric names
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "rate", "irate", "increase", "histogram_quantile", "avg_over_time", "max_over_time", "min_over_time",
    "sum_over_time", "label_values", "and", "or", "unless", "offset", "bool", "absent", "topk", "bottomk",
    "clamp_min", "clamp_max", "le", "quantile", "vector", "scalar", "time",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers followed by a selector or range, plus
    every fwserve_* identifier (label names and strings are removed first)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "{}", stripped)
    stripped = re.sub(r"\bby\s*\([^)]*\)|\bwithout\s*\([^)]*\)", "", stripped)
    names = set(re.findall(r"\b(fwserve_[A-Za-z0-9_:]+)", stripped))
    for m in re.finditer(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*(?=\{|\[)", stripped):
        if m.group(1) not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def promtool_check_exprs(exprs: dict[str, str], tmp_path: Path) -> None:
    """Parse PromQL expressions with promtool (as recording rules in a scratch file)."""
    promtool = tool("promtool", "prometheus")
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"check:{re.sub(r'[^a-zA-Z0-9_]', '_', k)}", "expr": v} for k, v in exprs.items()]}]}
    f = tmp_path / "exprs.rules.yaml"
    f.write_text(yaml.safe_dump(rules, sort_keys=False))
    p = run([promtool, "check", "rules", str(f)])
    assert p.returncode == 0, f"promtool rejects an expression:\n{p.stdout}\n{p.stderr}"


def settings_fields() -> dict:
    sys.path.insert(0, str(REPO))
    from server.config import Settings

    return dict(Settings.model_fields)


def env_name(field: str) -> str:
    return "FWSERVE_" + field.upper()


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1)


def python_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env

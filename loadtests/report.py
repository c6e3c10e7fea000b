"""Percentiles and the three report formats (CSV, JSON, Markdown) of a load run, plus an
optional latency plot (matplotlib, only when asked for)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> Optional[float]:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least p% of
    the values at or below it (p in (0, 100]); None for an empty sequence. No interpolation, so
    every reported figure is a latency some request really had."""
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = math.ceil(p / 100.0 * n - 1e-9)
    return float(sorted_values[max(rank, 1) - 1])


def pct_key(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_") if p != int(p) else str(int(p)))


def latency_summary(latencies_s: Iterable[float]) -> dict:
    """{count, mean, p50, p90, p95, p99, p99_9, max} in milliseconds (None when empty)."""
    xs = sorted(float(x) * 1000.0 for x in latencies_s)
    out: dict = {"count": len(xs), "mean": (sum(xs) / len(xs)) if xs else None}
    for p in PERCENTILES:
        out[pct_key(p)] = percentile(xs, p)
    out["max"] = xs[-1] if xs else None
    return out


# --- formats ---------------------------------------------------------------------------------

CSV_COLUMNS = [
    "scenario", "mode", "arrival", "offered", "duration_s", "scheduled", "sent", "completed", "ok",
    "errors", "dropped", "late_sends", "throughput_rps", "requests_per_s", "images_per_s",
    "lat_p50_ms", "lat_p90_ms", "lat_p95_ms", "lat_p99_ms", "lat_p99_9_ms", "lat_max_ms", "lat_mean_ms",
    "server_queue_wait_mean_ms", "server_backbone_forward_mean_ms", "server_head_predict_mean_ms",
    "server_head_update_mean_ms", "server_batch_size_mean", "server_batch_requests_mean",
    "server_cache_hits", "server_cache_misses", "server_evictions", "server_restores", "errors_by_status",
]


def _r(v, nd=3):
    if v is None:
        return None
    if isinstance(v, float):
        return round(v, nd)
    return v


def level_row(level: dict) -> dict:
    lat = level.get("latency_ms") or {}
    srv = level.get("server") or {}
    upd = srv.get("head_update_mean_ms") or {}
    row = {
        "scenario": level.get("scenario"),
        "mode": level.get("mode"),
        "arrival": level.get("arrival"),
        "offered": level.get("offered"),
        "duration_s": _r(level.get("duration_s")),
        "scheduled": level.get("scheduled"),
        "sent": level.get("sent"),
        "completed": level.get("completed"),
        "ok": level.get("ok"),
        "errors": sum((level.get("errors") or {}).values()),
        "dropped": level.get("dropped"),
        "late_sends": level.get("late_sends"),
        "throughput_rps": _r(level.get("throughput_rps")),
        "requests_per_s": _r(level.get("requests_per_s")),
        "images_per_s": _r(level.get("images_per_s")),
        "lat_p50_ms": _r(lat.get("p50")),
        "lat_p90_ms": _r(lat.get("p90")),
        "lat_p95_ms": _r(lat.get("p95")),
        "lat_p99_ms": _r(lat.get("p99")),
        "lat_p99_9_ms": _r(lat.get("p99_9")),
        "lat_max_ms": _r(lat.get("max")),
        "lat_mean_ms": _r(lat.get("mean")),
        "server_queue_wait_mean_ms": _r(srv.get("queue_wait_mean_ms")),
        "server_backbone_forward_mean_ms": _r(srv.get("backbone_forward_mean_ms")),
        "server_head_predict_mean_ms": _r(srv.get("head_predict_mean_ms")),
        "server_head_update_mean_ms": ";".join(f"{k}={v:.4f}" for k, v in sorted(upd.items())) or None,
        "server_batch_size_mean": _r(srv.get("batch_size_mean")),
        "server_batch_requests_mean": _r(srv.get("batch_requests_mean")),
        "server_cache_hits": srv.get("cache_hits"),
        "server_cache_misses": srv.get("cache_misses"),
        "server_evictions": srv.get("evictions"),
        "server_restores": srv.get("restores"),
        "errors_by_status": ";".join(f"{k}={v}" for k, v in sorted((level.get("errors") or {}).items())) or None,
    }
    return row


def to_csv(levels: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for lv in levels:
        w.writerow({k: ("" if v is None else v) for k, v in level_row(lv).items()})
    return buf.getvalue()


def to_json(run: dict) -> str:
    return json.dumps(run, indent=2, sort_keys=False, default=str)


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def to_markdown(run: dict) -> str:
    """A summary: one row per level, client view then server view."""
    levels = run.get("levels") or []
    cfg = run.get("config") or {}
    lines = []
    title = f"### {cfg.get('scenario', '?')} ({levels[0]['mode'] if levels else '?'} loop)"
    lines.append(title)
    lines.append("")
    if cfg.get("command"):
        lines.append(f"`{cfg['command']}`")
        lines.append("")
    lines.append("| offered | achieved/s | img/s | ok | errors | dropped | late | p50 ms | p90 ms | p95 ms "
                 "| p99 ms | p99.9 ms | max ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        lat = lv.get("latency_ms") or {}
        offered = (f"{lv['offered']:g}/s" if lv["mode"] == "open" else f"c={lv['offered']}")
        errs = lv.get("errors") or {}
        err_s = ", ".join(f"{k}: {v}" for k, v in sorted(errs.items())) or "0"
        lines.append(
            f"| {offered} | {_f(lv.get('throughput_rps'))} | {_f(lv.get('images_per_s'))} | {lv.get('ok')} "
            f"| {err_s} | {lv.get('dropped', 0)} | {lv.get('late_sends', 0)} | {_f(lat.get('p50'))} "
            f"| {_f(lat.get('p90'))} | {_f(lat.get('p95'))} | {_f(lat.get('p99'))} | {_f(lat.get('p99_9'))} "
            f"| {_f(lat.get('max'))} |"
        )
    if any(lv.get("server") for lv in levels):
        lines.append("")
        lines.append("| offered | queue wait ms | backbone ms/batch | head predict ms | head update ms "
                     "| batch rows | batch reqs | cache hit/miss | evict/restore |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for lv in levels:
            s = lv.get("server")
            if not s:
                continue
            offered = (f"{lv['offered']:g}/s" if lv["mode"] == "open" else f"c={lv['offered']}")
            upd = ", ".join(f"{k} {v:.3f}" for k, v in sorted((s.get("head_update_mean_ms") or {}).items())) or "-"
            lines.append(
                f"| {offered} | {_f(s.get('queue_wait_mean_ms'), '{:.2f}')} "
                f"| {_f(s.get('backbone_forward_mean_ms'), '{:.2f}')} | {_f(s.get('head_predict_mean_ms'), '{:.3f}')} "
                f"| {upd} | {_f(s.get('batch_size_mean'), '{:.2f}')} | {_f(s.get('batch_requests_mean'), '{:.2f}')} "
                f"| {_f(s.get('cache_hits'), '{:.0f}')}/{_f(s.get('cache_misses'), '{:.0f}')} "
                f"| {_f(s.get('evictions'), '{:.0f}')}/{_f(s.get('restores'), '{:.0f}')} |"
            )
    notes = []
    for lv in levels:
        if lv.get("extras"):
            notes.append(f"- {lv['offered']}: " + ", ".join(f"{k} = {v}" for k, v in lv["extras"].items()))
    if notes:
        lines.append("")
        lines.extend(notes)
    lines.append("")
    lines.append("Latency is measured from each request's scheduled send time in open loop "
                 "(no coordinated omission), from its send time in closed loop.")
    return "\n".join(lines) + "\n"


def plot(run: dict, path: str | Path) -> Optional[str]:
    """Latency percentiles per level and each level's latency CDF, as an image; returns an error
    message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    levels = run.get("levels") or []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [lv["offered"] for lv in levels]
    for key in ("p50", "p90", "p99", "p99_9", "max"):
        ys = [(lv.get("latency_ms") or {}).get(key) for lv in levels]
        ax1.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=key)
    mode = levels[0]["mode"] if levels else "open"
    ax1.set_xlabel("offered rate (req/s)" if mode == "open" else "concurrency")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    for lv in levels:
        lat = sorted(lv.get("latencies_ms") or [])
        if lat:
            ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=str(lv["offered"]))
    ax2.set_xscale("log")
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("fraction of requests")
    ax2.legend(title="level")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"{(run.get('config') or {}).get('scenario', '')}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return None


def write_outputs(run: dict, json_path=None, csv_path=None, md_path=None, plot_path=None) -> list[str]:
    """Write the asked-for files; returns warnings."""
    warns = []
    if json_path:
        Path(json_path).write_text(to_json(run))
    if csv_path:
        Path(csv_path).write_text(to_csv(run.get("levels") or []))
    if md_path:
        Path(md_path).write_text(to_markdown(run))
    if plot_path:
        err = plot(run, plot_path)
        if err:
            warns.append(err)
    return warns

"""Serving benchmarks, every figure measured side by side in one run:

    python -m loadtests.bench [--backbones fwserve-mnist-vit,vit_small_patch16_224] [--duration 5]
                              [--reps 2] [--markdown PATH] [--json PATH]

Per backbone (random weights, so any named config runs without a checkpoint):
  (a) dynamic batching vs batch size 1: predict on session heads, closed loop, concurrency 32,
      one server with --max-batch-size 64 --max-wait-ms 2 and one with --max-batch-size 1;
      target >= 3x;
  (b) per-session fast-weight heads vs a static shared head: the same load, with 64 sessions
      vs without a session (the backbone's base head); target >= 0.95;
  (c) adapt latency with cached features (prequential: the adapt follows a predict of the same
      image, a feature-cache hit) vs without (every adapt image new), concurrency 1;
  (d) server images/s (best of predict without session at c=32 x 1 image and c=8 x 16 images)
      vs the in-process backbone (``Backbone.features``) at its best batch size; target >= 0.8;
  (e) the head kernels' CPU ratios at the backbone's width (loadtests.kernel_bench: batched torch path
      vs a per-session Python loop; grouped forward vs one shared matmul).

Both servers run at once and the measurements of (a) and (b) alternate, ``--reps`` rounds,
medians reported, so drift of a shared machine hits every side alike. The load generator runs
on the same machine as the server and competes with it for CPU; figures say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from loadtests import generator, scenarios
from loadtests.serverproc import ServerProcess

TARGETS = {"a": 3.0, "b": 0.95, "d": 0.8}
LARGE = {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- in-process backbone -----------------------------------------------------------------------


def inprocess_backbone(name: str, batch_sizes: Sequence[int], min_seconds: float = 2.0,
                       threads: Optional[int] = None) -> dict:
    """images/s of Backbone.features per batch size (preprocessed inputs, no HTTP, no decode)."""
    import torch

    from models import load_backbone

    if threads:
        torch.set_num_threads(threads)
    bb = load_backbone(name, random_init=True, device="cpu")
    cfg = bb.config
    out = {}
    for bs in batch_sizes:
        x = torch.randn(bs, cfg.in_chans, cfg.img_size, cfg.img_size)
        bb.features(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            bb.features(x)
            n += 1
            el = time.perf_counter() - t0
            if el >= min_seconds or n >= 200:
                break
        out[bs] = bs * n / el
        log(f"in-process {name} batch {bs}: {out[bs]:.1f} images/s")
    return {"images_per_s": out, "best_batch": max(out, key=out.get), "best": max(out.values()),
            "embed_dim": bb.embed_dim, "torch_threads": torch.get_num_threads()}


# --- one load measurement --------------------------------------------------------------------


def measure(url: str, scenario: str, concurrency: int, duration: float, *, sessions: Optional[int], encoding: str,
            instances: int = 1, repeat: bool = False, warmup: float = 1.0, timeout: float = 120.0,
            pid: Optional[int] = None) -> dict:
    pool = scenarios.ImagePool(unique=not repeat, encoding=encoding)
    sc = scenarios.make(scenario, pool, scenarios.Options(sessions=sessions, instances=instances))
    cfg = generator.RunConfig(url=url, scenario=scenario, mode="closed", levels=[concurrency], duration=duration,
                              warmup_s=warmup, drain_s=timeout, timeout_s=timeout, progress=False,
                              server_pid=pid)
    run = asyncio.run(generator.run_levels(cfg, sc, log=lambda s: None))
    lv = run["levels"][0]
    lv.pop("latencies_ms", None)
    log(f"  {scenario:<11} c={concurrency:<3} sessions={sessions} x{instances}: {lv['throughput_rps']:.1f}/s "
        f"({lv['images_per_s']:.1f} img/s), p50 {lv['latency_ms']['p50'] or float('nan'):.1f} ms, "
        f"errors {lv['errors'] or 0}, batch {((lv.get('server') or {}).get('batch_size_mean') or 0):.1f}, "
        f"CPU ms/request client {_per(lv['client_cpu_s'], lv['ok'])} server {_per(lv.get('server_cpu_s'), lv['ok'])}")
    return lv


def _per(cpu_s, n):
    return "-" if cpu_s is None or not n else f"{1000 * cpu_s / n:.1f}"


def _median(xs):
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    return a / b if a and b else None


# --- kernels -----------------------------------------------------------------------------------


def kernel_ratios(d: int, sessions: int = 64, C: int = 10) -> dict:
    from loadtests import kernel_bench as kb

    rows = kb.run(dict(d=(d,), C=(C,), sessions=(sessions,)), ("loop", "torch"), min_seconds=0.1, log=None)
    t = {(r["op"], r["impl"]): r["seconds_per_call"] for r in rows}
    out = {"shape": {"d": d, "C": C, "sessions": sessions, "rows": kb.ROWS}, "loop_over_torch": {},
           "torch_ms": {}}
    for op in kb.OPS:
        if (op, "loop") in t and (op, "torch") in t:
            out["loop_over_torch"][op] = t[(op, "loop")] / t[(op, "torch")]
            out["torch_ms"][op] = t[(op, "torch")] * 1000
    shared = t.get(("head_forward_shared", "torch"))
    out["grouped_over_shared"] = t[("head_forward", "torch")] / shared if shared else None
    return out


# --- one backbone ------------------------------------------------------------------------------


def bench_backbone(name: str, duration: float, reps: int, extra_server_args: Sequence[str],
                   threads: Optional[int] = None) -> dict:
    large = name in LARGE
    encoding = "png" if large else "array"
    batch_sizes = (1, 8, 32) if large else (1, 8, 32, 64, 128)
    res: dict = {"backbone": name, "duration_s": duration, "reps": reps, "encoding": encoding}
    log(f"== {name}: in-process backbone")
    res["inprocess"] = inprocess_backbone(name, batch_sizes, min_seconds=3.0 if large else 2.0, threads=threads)
    common = ["--backbone", name, "--random-init", *(["--torch-threads", str(threads)] if threads else []),
              *extra_server_args]
    dyn_args = [*common, "--max-batch-size", "64", "--max-wait-ms", "2"]
    bs1_args = [*common, "--max-batch-size", "1"]
    res["servers"] = {"dynamic": "fwserve serve " + " ".join(dyn_args), "batch1": "fwserve serve " + " ".join(bs1_args)}
    timeout = 300.0 if large else 60.0
    m = lambda url, *a, **k: measure(url, *a, encoding=encoding, timeout=timeout, **k)  # noqa: E731
    with ServerProcess(*dyn_args) as dyn, ServerProcess(*bs1_args) as bs1:
        log(f"servers up: dynamic {dyn.url}, batch-1 {bs1.url}")
        runs: dict[str, list] = {"dyn_sessions": [], "dyn_static": [], "bs1_sessions": []}
        for r in range(reps):
            log(f"round {r + 1}/{reps}: (a) and (b), predict, closed loop c=32")
            runs["dyn_sessions"].append(m(dyn.url, "predict", 32, duration, sessions=64, pid=dyn.pid))
            runs["bs1_sessions"].append(m(bs1.url, "predict", 32, duration, sessions=64, pid=bs1.pid))
            runs["dyn_static"].append(m(dyn.url, "predict", 32, duration, sessions=0, pid=dyn.pid))
        log("(c) adapt latency, c=1: cached (prequential) vs uncached (adapt on new images)")
        cached = m(dyn.url, "prequential", 1, duration, sessions=16, pid=dyn.pid)
        uncached = m(dyn.url, "adapt", 1, duration, sessions=16, pid=dyn.pid)
        log("(d) server images/s: predict without session, c=8 x 16 images")
        wide = m(dyn.url, "predict", 8, duration, sessions=0, instances=16, pid=dyn.pid)
    tp = {k: _median([lv["throughput_rps"] for lv in v]) for k, v in runs.items()}
    res["runs"] = runs
    res["a"] = {"dynamic_rps": tp["dyn_sessions"], "batch1_rps": tp["bs1_sessions"],
                "ratio": _ratio(tp["dyn_sessions"], tp["bs1_sessions"]), "target": TARGETS["a"],
                "dynamic_batch_mean": _median([(lv.get("server") or {}).get("batch_size_mean") or 0
                                               for lv in runs["dyn_sessions"]])}
    res["b"] = {"sessions_rps": tp["dyn_sessions"], "static_rps": tp["dyn_static"],
                "ratio": _ratio(tp["dyn_sessions"], tp["dyn_static"]), "target": TARGETS["b"]}
    ca, un = cached["ops"].get("adapt", {}).get("service_ms", {}), uncached["ops"].get("adapt", {}).get("service_ms", {})
    res["c"] = {"cached_p50_ms": ca.get("p50"), "cached_p99_ms": ca.get("p99"), "uncached_p50_ms": un.get("p50"),
                "uncached_p99_ms": un.get("p99"), "ratio_uncached_over_cached": _ratio(un.get("p50"), ca.get("p50")),
                "cached_update_ms": cached["extras"].get("update_ms_mean"),
                "uncached_update_ms": uncached["extras"].get("update_ms_mean"),
                "cached_cache_hits": (cached.get("server") or {}).get("cache_hits"),
                "uncached_cache_hits": (uncached.get("server") or {}).get("cache_hits"),
                "runs": {"cached": cached, "uncached": uncached}}
    narrow_ips = _median([lv["images_per_s"] for lv in runs["dyn_static"]])
    best_server = max(narrow_ips or 0.0, wide["images_per_s"])
    res["d"] = {"server_images_per_s": best_server, "server_narrow_images_per_s": narrow_ips,
                "server_wide_images_per_s": wide["images_per_s"],
                "server_best_load": "c=8 x 16 images" if wide["images_per_s"] >= (narrow_ips or 0) else "c=32 x 1 image",
                "inprocess_images_per_s": res["inprocess"]["best"], "inprocess_best_batch": res["inprocess"]["best_batch"],
                "ratio": _ratio(best_server, res["inprocess"]["best"]), "target": TARGETS["d"],
                "wide_run": wide}
    log("(e) kernels at d = %d" % res["inprocess"]["embed_dim"])
    res["e"] = kernel_ratios(res["inprocess"]["embed_dim"])
    return res


# --- report ------------------------------------------------------------------------------------


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _verdict(ratio, target):
    if ratio is None:
        return "not measured"
    return "met" if ratio >= target else "**missed**"


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {env['cpus']} CPUs ({env['platform']}), torch {env['torch']} with {env['torch_threads']} "
             f"threads, no GPU; the load generator shares the CPUs with the server. Run at {env['date']}, "
             f"{env['elapsed_s']:.0f} s; load average at the end {', '.join(f'{x:.1f}' for x in env['load_average'])}.", ""]
    lines += ["| figure | backbone | measured | target | verdict |", "|---|---|---|---|---|"]
    for b in result["backbones"]:
        n = b["backbone"]
        a, bb, c, d = b["a"], b["b"], b["c"], b["d"]
        lines.append(f"| (a) dynamic batching / batch 1, c=32 | {n} | {_f(a['ratio'], '{:.2f}x')} "
                     f"({_f(a['dynamic_rps'])} vs {_f(a['batch1_rps'])} req/s; mean batch {_f(a['dynamic_batch_mean'])}) "
                     f"| >= 3x | {_verdict(a['ratio'], 3.0)} |")
        lines.append(f"| (b) session heads / static shared head | {n} | {_f(bb['ratio'], '{:.3f}')} "
                     f"({_f(bb['sessions_rps'])} vs {_f(bb['static_rps'])} req/s) | >= 0.95 "
                     f"| {_verdict(bb['ratio'], 0.95)} |")
        lines.append(f"| (c) adapt latency p50, cached / uncached features | {n} | {_f(c['cached_p50_ms'])} ms / "
                     f"{_f(c['uncached_p50_ms'])} ms ({_f(c['ratio_uncached_over_cached'], '{:.2f}x')} faster cached; "
                     f"p99 {_f(c['cached_p99_ms'])} / {_f(c['uncached_p99_ms'])} ms) | - | - |")
        lines.append(f"| (d) server / in-process backbone images/s | {n} | {_f(d['ratio'], '{:.2f}')} "
                     f"({_f(d['server_images_per_s'])} at {d['server_best_load']} vs {_f(d['inprocess_images_per_s'])} "
                     f"at batch {d['inprocess_best_batch']}) | >= 0.8 | {_verdict(d['ratio'], 0.8)} |")
        e = b["e"]
        ks = ", ".join(f"{op} {v:.1f}x" for op, v in e["loop_over_torch"].items())
        lines.append(f"| (e) kernels, CPU: loop / batched torch (S={e['shape']['sessions']}, d={e['shape']['d']}, "
                     f"C={e['shape']['C']}, {e['shape']['rows']} rows) | {n} | {ks}; grouped / shared forward "
                     f"{_f(e['grouped_over_shared'], '{:.2f}x')} | - | - |")
    lines.append("")
    for b in result["backbones"]:
        ip = b["inprocess"]["images_per_s"]
        lines.append(f"In-process `{b['backbone']}` images/s by batch size: "
                     + ", ".join(f"{k}: {v:.1f}" for k, v in ip.items()) + ".")
        lines.append(f"Servers: `{b['servers']['dynamic']}` and `{b['servers']['batch1']}`; {b['reps']} rounds of "
                     f"{b['duration_s']:g} s per (a)/(b) figure (medians), instances as {b['encoding']}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default="fwserve-mnist-vit,vit_small_patch16_224")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (28x28 backbone)")
    p.add_argument("--duration-large", type=float, default=10.0, help="seconds per measurement (224x224 backbones)")
    p.add_argument("--reps", type=int, default=2, help="alternating rounds of (a)/(b)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads of the servers and of the in-process backbone (default: torch's "
                        "choice); 1 avoids OpenMP barrier stalls when the CPUs are oversubscribed")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra `fwserve serve` flags")
    a = p.parse_args(argv)
    import torch

    t0 = time.time()
    out = {"command": "python -m loadtests.bench " + shlex.join(list(argv if argv is not None else sys.argv[1:])),
           "backbones": []}
    for name in [s.strip() for s in a.backbones.split(",") if s.strip()]:
        d = a.duration_large if name in LARGE else a.duration
        out["backbones"].append(bench_backbone(name, d, max(1, a.reps), a.server_args, a.torch_threads))
    out["environment"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
                          "elapsed_s": time.time() - t0, "load_average": os.getloadavg()}
    md = to_markdown(out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU acceptance run, one command: `python -m loadtests.gpu_check --out DIR [--tiny] [--budget-s 280]`
(or `python -m kernels.gpu_check ...`; loadtests/gpu_acceptance.sh wraps it for a bare GPU machine).

Steps, each recorded in DIR/gpu_check.json and DIR/gpu_check.md as soon as it ends (a run cut
short still leaves every finished step behind):
  env          device, versions, the head ops' implementation per op (no silent path)
  kernel_tests tests/kernels with the Triton kernels compiled (TRITON_INTERPRET unset)
  no_sync      every Triton op under torch.cuda.set_sync_debug_mode("error") (CUDA only)
  vit_vs_timm  our ViT against timm's on the same random weights (skipped where timm is absent)
  copy         device-to-device copy bandwidth: the roofline of these memory-bound ops
  ops          all seven ops, Triton vs the torch path vs the HBM roofline (bytes that must move,
               live classes only, over the copy bandwidth), S in {256, 4096}, d in {384, 768},
               C in {10, 100, 1000}, rows in {64, 4096}, plus S = 100k at C = 10; shapes whose state
               does not fit the device's memory are listed as skipped
  serving      the real server (`fwserve serve --backbone vit_base_patch16_224 --random-init`) with
               16 images per request: dynamic batching vs --max-batch-size 1, vs the in-process
               backbone at its best batch, vs the plain baseline server (loadtests/baseline_server.py),
               and transactions/s vs --api-workers N (when `fwserve serve --help` offers it)
  resident     100k sessions (d = 768, C = 10) resident on the device tier: predict p50 at 100 vs 100k
               resident (the engine in process, requests spread uniformly over the sessions)
Exit status: 1 when a correctness step fails (kernel tests, no_sync, vit_vs_timm), else 0 — missed
performance targets are reported in the table, not failed. --tiny runs every step at toy sizes
on whatever device there is (the CI test runs it on CPU, so the command cannot rot).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FP32 = 4
CORRECTNESS = ("kernel_tests", "no_sync", "vit_vs_timm")
TARGETS = {"update_bandwidth": 0.60, "server_vs_inprocess": 0.7, "dynamic_batching": 5.0, "vs_baseline": 10.0,
           "resident_p50_ratio": 1.5}
FULL = dict(S=(256, 4096), d=(384, 768), C=(10, 100, 1000), rows=(64, 4096), big_S=100_000, big_C=10,
            backbone="vit_base_patch16_224", images=16, concurrency=32, seconds=6.0, resident=100_000,
            resident_d=768, resident_C=10, inproc_batches=(16, 64, 128, 256), workers=(1, 2, 4, 8, 12))
TINY = dict(S=(8,), d=(32,), C=(10,), rows=(8,), big_S=64, big_C=10,
            backbone="fwserve-mnist-vit", images=4, concurrency=2, seconds=1.0, resident=200,
            resident_d=None, resident_C=10, inproc_batches=(1, 4), workers=(1, 2))
OPS = ("head_forward", "sgd", "entropy", "delta", "prototype", "support", "rls", "sgd_rates", "class_mean_head")
UPDATE_OPS = ("sgd", "entropy", "delta", "prototype", "support", "rls", "sgd_rates", "class_mean_head")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the run and its files ------------------------------------------------------------------


class Run:
    def __init__(self, out: Path, budget_s: float, tiny: bool, device: str) -> None:
        self.out, self.budget_s, self.tiny, self.device = out, budget_s, tiny, device
        self.t0 = time.monotonic()
        self.cfg = TINY if tiny else FULL
        self.data: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "device": device, "tiny": tiny, "steps": {}, "figures": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, fn, needs_s: float = 0.0) -> dict:
        entry: dict = {"status": "running"}
        self.data["steps"][name] = entry
        if self.left() < needs_s:
            entry.update(status="skipped", reason=f"budget: {self.left():.0f} s left, the step needs ~{needs_s:.0f} s")
            log(f"{name}: skipped ({entry['reason']})")
            self.write()
            return entry
        started = time.monotonic()
        log(f"{name}: start ({self.left():.0f} s of budget left)")
        try:
            entry.update(fn() or {})
            if entry["status"] == "running":
                entry["status"] = "ok"
        except Exception as e:  # a measurement that breaks is reported; the run goes on
            entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.monotonic() - started, 1)
        log(f"{name}: {entry['status']} in {entry['seconds']} s")
        self.write()
        return entry

    def figure(self, name: str, measured: str, target: str = "-", verdict: str = "-") -> None:
        self.data["figures"].append(dict(figure=name, measured=measured, target=target, verdict=verdict))

    def failed_correctness(self) -> list[str]:
        return [n for n in CORRECTNESS if self.data["steps"].get(n, {}).get("status") in ("failed", "error")]

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def markdown(data: dict) -> str:
    lines = [f"GPU acceptance run {data['started']} on {data['device']}"
             f"{' (tiny sizes)' if data['tiny'] else ''}, {data.get('elapsed_s', 0)} s; "
             f"`{data['command']}`", "",
             "| step / figure | measured | target | verdict |", "|---|---|---|---|"]
    for name, step in data["steps"].items():
        why = step.get("reason") or step.get("error") or step.get("summary") or ""
        lines.append(f"| step {name} | {step['status']}{': ' + why if why else ''} | - | - |")
    for f in data["figures"]:
        lines.append(f"| {f['figure']} | {f['measured']} | {f['target']} | {f['verdict']} |")
    return "\n".join(lines) + "\n"


def verdict(value, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "unmeasured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


# ---- steps ----------------------------------------------------------------------------------------


def step_env(run: Run) -> dict:
    import kernels

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "kernels": kernels.dispatch.implementations(run.device)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if run.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    out["summary"] = f"{out.get('gpu', 'cpu')}, torch {out['torch']}, triton {out['triton']}, head ops " \
                     f"{kernels.dispatch.describe_implementations(run.device)}"
    run.figure("head ops implementation", kernels.dispatch.describe_implementations(run.device),
               "triton" if run.device.startswith("cuda") else "torch",
               "met" if kernels.dispatch.describe_implementations(run.device) ==
               ("triton" if run.device.startswith("cuda") else "torch") else "**missed**")
    return out


def step_kernel_tests(run: Run) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    tests = [str(ROOT / "tests" / "kernels")]
    if run.tiny:  # one small file under the interpreter (CPU) keeps the CI test short
        tests = [str(ROOT / "tests" / "kernels" / "test_kernels_sgd.py"), "-k", "C10-d100-fp32-mixed"]
    if not run.device.startswith("cuda"):
        env["TRITON_INTERPRET"] = "1"  # no GPU: the kernels can only run interpreted
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if run.device.startswith("cuda") and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]  # compiling the kernels' specialisations dominates: compile them side by side
    timeout = max(30.0, min(240.0, run.left() - 120))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        (run.out / "kernel_tests.log").write_text((e.stdout or b"").decode(errors="replace")
                                                  if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return {"status": "failed", "summary": f"did not finish in {timeout:.0f} s"}
    (run.out / "kernel_tests.log").write_text(done.stdout + done.stderr)
    last = [ln for ln in done.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    status = "ok" if done.returncode == 0 else "failed"
    run.figure("kernel tests" + (" (compiled)" if run.device.startswith("cuda") else " (interpreter)"), last[0],
               "all pass", "met" if status == "ok" else "**missed**")
    return {"status": status, "summary": last[0], "returncode": done.returncode}


def step_no_sync(run: Run) -> dict:
    """Every Triton op with CUDA's sync debug mode on: any host synchronisation raises."""
    from loadtests import kernel_bench as bench

    if not run.device.startswith("cuda"):
        return {"status": "skipped", "reason": "CUDA only (the CPU tests check the launchers by patching)"}
    setup = bench.Setup(64, 128, 10, 64, run.device)
    calls = {op: bench.kernel_call(op, "triton", setup) for op in OPS}
    for fn in calls.values():
        fn()  # compile outside the check (the first launch of a kernel may synchronise)
    torch.cuda.synchronize()
    syncing = []
    for op, fn in calls.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            syncing.append(f"{op}: {str(e)[:200]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    run.figure("host synchronisations inside Triton ops", ", ".join(syncing) or "none", "none",
               "met" if not syncing else "**missed**")
    return {"status": "failed" if syncing else "ok", "syncing": syncing}


def step_vit_vs_timm(run: Run) -> dict:
    try:
        import timm
    except ImportError:
        return {"status": "skipped", "reason": "timm is not installed here"}
    from models import VisionTransformer, get_config, load_into

    name = "vit_small_patch16_224" if run.tiny else run.cfg["backbone"]
    cfg = get_config(name)
    ref = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes).eval().to(run.device)
    ours = VisionTransformer(cfg, init=False)
    load_into(ours, {k: v.detach().cpu() for k, v in ref.state_dict().items()})
    ours = ours.eval().to(run.device)
    x = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, device=run.device)
    with torch.no_grad():
        f_ref = ref.forward_head(ref.forward_features(x), pre_logits=True).float()
        f_ours = ours.features(x).float()
        logits_ref, logits_ours = ref(x).float(), ours(x).float()
    err = float((f_ours - f_ref).abs().max() / f_ref.abs().max().clamp_min(1e-6))
    err_logits = float((logits_ours - logits_ref).abs().max() / logits_ref.abs().max().clamp_min(1e-6))
    ok = err < 1e-4 and err_logits < 1e-4
    run.figure(f"our ViT vs timm {timm.__version__} ({name}, fp32, same random weights)",
               f"features {err:.1e}, logits {err_logits:.1e} (max error / max value)", "< 1e-4",
               "met" if ok else "**missed**")
    return {"status": "ok" if ok else "failed", "features_rel_error": err, "logits_rel_error": err_logits,
            "timm": timm.__version__}


def copy_bandwidth(device: str, num_bytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    from loadtests.kernel_bench import time_call

    src = torch.empty(num_bytes // FP32, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, 0.05)
    return 2 * num_bytes / seconds


def step_copy(run: Run) -> dict:
    bps = copy_bandwidth(run.device, (1 << 30) if run.device.startswith("cuda") else (1 << 24))
    run.data["copy_bytes_per_s"] = bps
    run.figure("device-to-device copy bandwidth (read + write)", f"{bps / 1e9:.0f} GB/s")
    return {"copy_gb_per_s": round(bps / 1e9, 1)}


def must_move_bytes(op: str, t) -> int:
    """Bytes an op cannot avoid moving for a benchmark batch (live classes only; heads in their
    storage dtype, everything else fp32): the touched heads read (and written by the updates),
    the feature rows, logits where the op reads or writes them, and the op's state."""
    w = t.W.element_size()
    U, N, C, d = len(t.touched), t.rows, t.C, t.d
    heads = U * C * d * w
    features = N * d * FP32
    cells = len({(s, int(c)) for s, c in zip(t.slot_list, t.y.tolist())})  # touched (session, class) pairs
    if op == "head_forward":
        return heads + features + N * C * FP32
    if op in ("sgd", "entropy"):
        return 2 * heads + features + N * C * FP32  # the round's logits are read, not recomputed
    if op == "sgd_rates":
        return 2 * heads + features + N * C * FP32 + d * FP32
    if op == "class_mean_head":  # prototype's traffic, the bias written too, and the metric read once
        return 2 * cells * d * FP32 + cells * (d + 1) * w + features + d * d * FP32
    if op == "delta":
        return 2 * heads + features
    if op == "prototype":
        return 2 * cells * d * FP32 + cells * d * w + features  # the touched class sums in and out, heads written
    if op == "support":
        # the touched cells' K supports summed (the kernel re-reads them), replaced rows written, heads written
        return cells * t.K * d * FP32 + features + cells * d * w + features
    if op == "rls":
        return N * 2 * d * d * FP32 + 2 * heads + features
    raise ValueError(op)


def state_bytes(op: str, S: int, d: int, C: int, rows: int, K: int) -> int:
    """Device memory a timing needs beyond the heads (both paths' temporaries included, roughly)."""
    U = min(S, rows)
    heads = S * C * d * FP32
    extra = {"head_forward": 0, "sgd": 2 * U * C * d * FP32, "entropy": 2 * U * C * d * FP32,
             "sgd_rates": 2 * U * C * d * FP32, "class_mean_head": 3 * U * C * d * FP32 + d * d * FP32,
             "delta": 2 * U * C * d * FP32, "prototype": 2 * U * C * d * FP32,
             "support": 2 * U * C * K * d * FP32, "rls": 3 * U * d * d * FP32}[op]
    return heads + extra


def step_ops(run: Run) -> dict:
    from loadtests import kernel_bench as bench

    cfg, device = run.cfg, run.device
    copy_bps = run.data.get("copy_bytes_per_s") or copy_bandwidth(device, 1 << 24)
    impls = ("triton", "torch") if device.startswith("cuda") else ("torch", "triton")
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else 1 << 30
    shapes = [(S, d, C, rows) for S in cfg["S"] for d in cfg["d"] for C in cfg["C"] for rows in cfg["rows"]]
    shapes += [(cfg["big_S"], d, cfg["big_C"], rows) for d in cfg["d"][-1:] for rows in cfg["rows"]]
    rows_out, skipped = [], []
    per_op_budget = max(5.0, (run.left() - (150 if not run.tiny else 30)) / max(1, len(shapes)))
    for S, d, C, rows in shapes:
        shape_start = time.monotonic()
        if run.left() < (120 if not run.tiny else 20):
            skipped.append(dict(S=S, d=d, C=C, rows=rows, op="*", reason="budget"))
            continue
        try:
            t = bench.Setup(S, d, C, rows, device)
        except torch.OutOfMemoryError:
            skipped.append(dict(S=S, d=d, C=C, rows=rows, op="*", reason="heads do not fit"))
            continue
        for op in OPS:
            if state_bytes(op, S, d, C, rows, t.K) > 0.8 * free:
                skipped.append(dict(S=S, d=d, C=C, rows=rows, op=op, reason="state does not fit the device memory"))
                continue
            if time.monotonic() - shape_start > per_op_budget * 3:
                skipped.append(dict(S=S, d=d, C=C, rows=rows, op=op, reason="time per shape"))
                continue
            entry = dict(op=op, S=S, d=d, C=C, rows=rows, bytes=must_move_bytes(op, t))
            for impl in impls:
                if impl == "triton" and not device.startswith("cuda") and not run.tiny:
                    continue
                try:
                    seconds = bench.time_call(bench.kernel_call(op, impl, t), device, 0.02 if run.tiny else 0.05)
                except torch.OutOfMemoryError:
                    entry[f"{impl}_s"] = None
                    entry[f"{impl}_error"] = "out of memory"
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:  # one op's failure is reported in its row
                    entry[f"{impl}_s"] = None
                    entry[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                entry[f"{impl}_s"] = seconds
                entry[f"{impl}_fraction_of_copy"] = entry["bytes"] / seconds / copy_bps
            if entry.get("triton_s") and entry.get("torch_s"):
                entry["triton_speedup"] = entry["torch_s"] / entry["triton_s"]
            rows_out.append(entry)
        del t
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        run.data["steps"]["ops"].update(rows=rows_out, skipped=skipped)
        run.write()  # partial results after every shape
    S_target = max(cfg["S"])
    rows_target = max(cfg["rows"])
    for op in UPDATE_OPS:
        cells = [r for r in rows_out if r["op"] == op and r["S"] == S_target and r["rows"] == rows_target
                 and r.get("triton_fraction_of_copy") is not None]
        if cells and not device.startswith("cuda"):
            run.figure(f"{op}: Triton share of copy bandwidth", "not a measurement: the interpreter on a CPU", "-", "-")
        elif cells:
            worst = min(cells, key=lambda r: r["triton_fraction_of_copy"])
            run.figure(f"{op}: Triton share of copy bandwidth, S={S_target}, rows={rows_target} (worst of d, C)",
                       f"{100 * worst['triton_fraction_of_copy']:.0f}% (d={worst['d']}, C={worst['C']}; "
                       f"{worst['triton_s'] * 1e3:.3f} ms, torch {worst['torch_s'] * 1e3 if worst.get('torch_s') else float('nan'):.3f} ms)",
                       f">= {100 * TARGETS['update_bandwidth']:.0f}%",
                       verdict(worst["triton_fraction_of_copy"], TARGETS["update_bandwidth"]))
        else:
            run.figure(f"{op}: Triton share of copy bandwidth, S={S_target}, rows={rows_target}", "unmeasured",
                       f">= {100 * TARGETS['update_bandwidth']:.0f}%", "unmeasured")
    return {"rows": rows_out, "skipped": skipped, "copy_bytes_per_s": copy_bps,
            "summary": f"{len(rows_out)} op/shape cells, {len(skipped)} skipped"}


# ---- serving ----------------------------------------------------------------------------------


def serve_help(python: str) -> str:
    done = subprocess.run([python, "-m", "server.cli", "serve", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return done.stdout


def measure_server(url: str, cfg: dict, scenario: str, sessions, pid=None) -> dict:
    from loadtests import generator, scenarios

    size = 28 if cfg["backbone"] == "fwserve-mnist-vit" else 64  # small PNGs: the server resizes them
    pool = scenarios.ImagePool(synthetic=True, unique=True, encoding="png", size=size)
    sc = scenarios.make(scenario, pool, scenarios.Options(sessions=sessions, instances=cfg["images"], rule="sgd"))
    rc = generator.RunConfig(url=url, scenario=scenario, mode="closed", levels=[cfg["concurrency"]],
                             duration=cfg["seconds"], warmup_s=min(2.0, cfg["seconds"]), drain_s=60, timeout_s=60,
                             progress=False, server_pid=pid)
    result = asyncio.run(generator.run_levels(rc, sc, log=lambda s: None))
    level = result["levels"][0]
    level.pop("latencies_ms", None)
    return level


def inprocess_images_per_s(cfg: dict, device: str, seconds: float) -> dict:
    from models import load_backbone

    bb = load_backbone(cfg["backbone"], random_init=True, device=device)
    c = bb.config
    out = {}
    for bs in cfg["inproc_batches"]:
        x = torch.randn(bs, c.in_chans, c.img_size, c.img_size)
        bb.features(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            bb.features(x)  # synchronised inside (features come back as float: .float() on the result)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            n += 1
        out[bs] = bs * n / (time.perf_counter() - t0)
    del bb
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def step_serving(run: Run) -> dict:
    from loadtests.serverproc import ServerProcess

    cfg = run.cfg
    dev_args = ["--device", "cuda"] if run.device.startswith("cuda") else ["--device", "cpu", "--torch-threads", "1"]
    common = ["--backbone", cfg["backbone"], "--random-init", *dev_args]
    out: dict = {"backbone": cfg["backbone"], "images_per_request": cfg["images"], "concurrency": cfg["concurrency"],
                 "encoding": "png (fwserve has no /v1 binary input yet; the baseline's binary path is unused so "
                             "both servers get the same bytes)"}
    results: dict = {}

    def server_level(name: str, args: list[str], scenario: str = "predict", sessions=64) -> None:
        with ServerProcess(*common, *args) as srv:
            results[name] = measure_server(srv.url, cfg, scenario, sessions, pid=srv.pid)
        run.data["steps"]["serving"]["levels"] = results
        run.write()

    server_level("dynamic", ["--max-batch-size", "256" if not run.tiny else "64", "--max-wait-ms", "2"])
    server_level("batch_size_1", ["--max-batch-size", "1"])
    baseline = BaselineProcess(cfg["backbone"], run.device)
    with baseline:
        results["baseline"] = measure_server(baseline.url, cfg, "predict", 64, pid=baseline.pid)
    run.data["steps"]["serving"]["levels"] = results
    inproc = inprocess_images_per_s(cfg, run.device, 1.0 if run.tiny else 2.0)
    best_batch = max(inproc, key=inproc.get)
    out["inprocess_images_per_s"] = inproc
    ips = {k: v.get("images_per_s") for k, v in results.items()}
    ratio_bs1 = _ratio(ips["dynamic"], ips["batch_size_1"])
    ratio_base = _ratio(ips["dynamic"], ips["baseline"])
    ratio_inproc = _ratio(ips["dynamic"], inproc[best_batch])
    run.figure(f"dynamic batching / --max-batch-size 1 ({cfg['backbone']}, {cfg['images']} images/request, "
               f"c={cfg['concurrency']})", f"{_fmt(ratio_bs1)}x ({_fmt(ips['dynamic'])} vs {_fmt(ips['batch_size_1'])} "
               f"images/s)", f">= {TARGETS['dynamic_batching']}x", verdict(ratio_bs1, TARGETS["dynamic_batching"]))
    run.figure("fwserve / plain baseline server (images/s)", f"{_fmt(ratio_base)}x ({_fmt(ips['baseline'])} images/s "
               "baseline)", f">= {TARGETS['vs_baseline']}x", verdict(ratio_base, TARGETS["vs_baseline"]))
    run.figure(f"server / in-process backbone at its best batch ({best_batch})",
               f"{_fmt(ratio_inproc, '{:.2f}')} ({_fmt(inproc[best_batch])} images/s in process)",
               f">= {TARGETS['server_vs_inprocess']}", verdict(ratio_inproc, TARGETS["server_vs_inprocess"]))
    if "--api-workers" in serve_help(sys.executable):
        sweep = {}
        for n in cfg["workers"]:
            if run.left() < 60:
                break
            with ServerProcess(*common, "--api-workers", str(n)) as srv:
                sweep[n] = measure_server(srv.url, cfg, "prequential", 64, pid=srv.pid).get("throughput_rps")
        out["api_workers_transactions_per_s"] = sweep
        run.figure("transactions/s (prequential) vs --api-workers N",
                   ", ".join(f"{n}: {_fmt(v)}" for n, v in sweep.items()))
    else:
        out["api_workers_transactions_per_s"] = None
        run.figure("transactions/s vs --api-workers N", "unmeasured: this fwserve has no --api-workers", "-", "-")
    out["levels"] = results
    out["summary"] = ", ".join(f"{k} {_fmt(v)} images/s" for k, v in ips.items())
    return out


class BaselineProcess:
    """loadtests/baseline_server.py in a subprocess on a free port."""

    def __init__(self, backbone: str, device: str) -> None:
        from loadtests.serverproc import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--backbone", backbone, "--random-init", "--device", "cuda" if device.startswith("cuda") else "cpu",
                "--port", str(self.port)]
        if not device.startswith("cuda"):
            args += ["--torch-threads", "1"]
        self.cmd = [sys.executable, "-m", "loadtests.baseline_server", *args]
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"baseline server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("baseline server did not start")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _ratio(a, b):
    return a / b if a and b else None


def _fmt(v, f="{:.1f}"):
    return f.format(v) if v is not None else "-"


# ---- resident sessions ----------------------------------------------------------------------------


def step_resident(run: Run) -> dict:
    """Predict latency with few vs many sessions resident on the device tier, through the engine
    in process (no HTTP), requests spread uniformly over the resident sessions, each image's
    features cached (the session-dependent part of a predict: queue, head forward, response)."""
    import tempfile

    from models import load_backbone
    from server.config import Settings
    from server.engine import Engine, Input, PredictJob

    cfg = run.cfg
    many = cfg["resident"]
    name = "fwserve-mnist-vit"  # the backbone does not matter here: the features are cached
    bb = load_backbone(name, random_init=True, device=run.device)
    d = bb.embed_dim
    if cfg["resident_d"] and cfg["resident_d"] != d:
        # a projection to the target width: the heads are d = resident_d, as with a ViT-B backbone
        bb = WidenedBackbone(bb, cfg["resident_d"])
        d = cfg["resident_d"]
    out: dict = {"d": d, "C": cfg["resident_C"]}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(snapshot_dir=Path(tmp) / "s", max_device_sessions=many + 16, max_classes=cfg["resident_C"],
                            max_sessions=many + 16, warmup=False, max_wait_ms=0.5, device=run.device)
        engine = Engine(settings, backbone=bb)
        engine.start()
        if not engine.wait_loaded(300):
            raise RuntimeError(f"engine did not load: {engine.load_error}")
        try:
            classes = [str(c) for c in range(cfg["resident_C"])]
            store = engine.store
            pixels = torch.zeros(bb.config.in_chans, bb.config.img_size, bb.config.img_size)
            x = Input("img:resident-probe", pixels)
            t0 = time.monotonic()
            latencies = {}
            created = 0
            for level in (100, many):
                while created < level:
                    store.create("sgd", classes, {}, session_id=f"r{created}")
                    created += 1
                counts = store.counts()
                latencies[level] = asyncio.run(_predict_latencies(engine, x, created, 50 if run.tiny else 300))
                out[f"resident_{level}"] = {"tiers": counts, "p50_ms": statistics.median(latencies[level]) * 1e3,
                                            "p99_ms": sorted(latencies[level])[int(0.99 * len(latencies[level]))] * 1e3}
                run.data["steps"]["resident"].update(out)
                run.write()
            out["fill_seconds"] = round(time.monotonic() - t0, 1)
        finally:
            engine.stop()
    ratio = out[f"resident_{many}"]["p50_ms"] / out["resident_100"]["p50_ms"]
    out["p50_ratio"] = ratio
    run.figure(f"predict p50, {many} vs 100 sessions resident on the device tier (d={d}, C={cfg['resident_C']}, "
               "engine in process, cached features)",
               f"{ratio:.2f}x ({out[f'resident_{many}']['p50_ms']:.2f} vs {out['resident_100']['p50_ms']:.2f} ms)",
               f"<= {TARGETS['resident_p50_ratio']}x", verdict(ratio, TARGETS["resident_p50_ratio"], False))
    out["summary"] = f"p50 ratio {ratio:.2f}"
    return out


class WidenedBackbone:
    """A backbone whose features are mapped to another width by a fixed random projection, so the
    session heads have that width (the resident step needs d = 768 heads, not a ViT-B)."""

    def __init__(self, inner, d: int) -> None:
        from torch import nn

        self.inner, self.config, self.device = inner, inner.config, inner.device
        self.proj = torch.randn(inner.embed_dim, d, device=inner.device) / inner.embed_dim ** 0.5
        self.embed_dim = d
        self.head = nn.Linear(d, len(inner.class_names), device=inner.device)
        self.class_names = inner.class_names

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.features(x) @ self.proj

    def preprocess(self, image):
        return self.inner.preprocess(image)


async def _predict_latencies(engine, x, sessions: int, n: int) -> list[float]:
    from server.engine import PredictJob

    rng = random.Random(0)
    await engine.predict(PredictJob([x], session=f"r{rng.randrange(sessions)}"))  # warm the feature cache
    out = []
    for _ in range(n):
        sid = f"r{rng.randrange(sessions)}"
        t0 = time.perf_counter()
        await engine.predict(PredictJob([x], session=sid))
        out.append(time.perf_counter() - t0)
    return out


# ---- main ---------------------------------------------------------------------------------------


STEPS = ("env", "kernel_tests", "no_sync", "vit_vs_timm", "copy", "ops", "serving", "resident")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json, gpu_check.md, logs")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on any device (the CI test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop starting steps after this many seconds")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: " + ",".join(STEPS))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA GPU is visible")
        return 2
    if not args.device.startswith("cuda") and not args.tiny:
        print("gpu_check: without a GPU only --tiny makes sense (toy sizes on the CPU)")
        return 2
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run interpreted
        torch.set_num_threads(1)  # as the servers run here (--torch-threads 1): a shared CPU's threads stall
    run = Run(args.out, args.budget_s, args.tiny, args.device)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    plan = [("env", step_env, 0), ("kernel_tests", step_kernel_tests, 30), ("no_sync", step_no_sync, 5),
            ("vit_vs_timm", step_vit_vs_timm, 10), ("copy", step_copy, 2), ("ops", step_ops, 60),
            ("serving", step_serving, 60), ("resident", step_resident, 30)]
    if args.tiny:
        plan = [(n, f, min(need, 5)) for n, f, need in plan]
    for name, fn, needs in plan:
        if name in skip:
            run.data["steps"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        run.step(name, lambda fn=fn: fn(run), needs)
    failed = run.failed_correctness()
    run.data["correctness_failures"] = failed
    run.write()
    print((run.out / "gpu_check.md").read_text())
    print(f"correctness: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; {run.data['elapsed_s']} s; "
          f"files in {run.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

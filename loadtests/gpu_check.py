"""GPU acceptance check: `python -m loadtests.gpu_check [--json PATH] [--skip-tests]`.

On a machine with a CUDA GPU and a fresh checkout (no downloads, a few minutes):
  1. runs tests/kernels with the Triton kernels compiled for the GPU (no interpreter);
  2. measures device-to-device copy bandwidth (the roofline for these memory-bound ops);
  3. runs the benchmark grid for the torch path and the Triton kernels;
  4. prints each op's achieved bandwidth next to the copy bandwidth, and the targets:
     Triton >= 2x the torch path for the update ops, >= 60% of copy bandwidth at 1024 sessions.

Achieved bandwidth counts only the bytes an op cannot avoid moving (`min_bytes`): the touched
heads read (and written, for updates), the feature rows, the logits, and for RLS the d x d
inverse read and written once per row. Exit status: 0 when the tests pass, 1 otherwise (missed
performance targets are reported, not failed). `python -m kernels.gpu_check` (a shim) runs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

FP32 = 4
UPDATE_OPS = ("sgd", "delta", "prototype", "rls")
SPEEDUP_TARGET = 2.0
BANDWIDTH_TARGET = 0.60
BANDWIDTH_TARGET_SESSIONS = 1024


def touched_sessions(sessions: int, rows: int) -> int:
    """Sessions with rows in a benchmark batch (kernel_bench.Setup: distinct, or rows / sessions each)."""
    return min(sessions, rows)


def min_bytes(op: str, sessions: int, d: int, C: int, rows: int) -> int:
    """Bytes the op must move at least, for a benchmark batch with float32 features."""
    heads = touched_sessions(sessions, rows) * C * d * FP32
    features = rows * d * FP32
    if op in ("head_forward", "head_forward_shared"):
        read_heads = C * d * FP32 if op == "head_forward_shared" else heads
        return read_heads + features + rows * C * FP32
    if op in ("sgd", "delta"):
        return 2 * heads + features
    if op == "prototype":
        return heads + heads + features  # class sums of the touched state rows read, heads written
    if op == "rls":
        return rows * 2 * d * d * FP32 + 2 * heads + features
    raise ValueError(op)


def copy_bandwidth(device: str = "cuda", num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(num_bytes // FP32, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * num_bytes * repeats / (time.perf_counter() - start)


def bandwidth_rows(results: list[dict], copy_bytes_per_s: float) -> list[dict]:
    """Join torch and triton timings per (op, shape) and add bandwidth and speed-up."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in results:
        key = (r["op"], r["sessions"], r["d"], r["C"], r["rows"])
        by_key.setdefault(key, {})[r["impl"]] = r["seconds_per_call"]
    rows = []
    for (op, sessions, d, C, n), times in by_key.items():
        row = dict(op=op, sessions=sessions, d=d, C=C, rows=n,
                   torch_s=times.get("torch"), triton_s=times.get("triton"))
        best = times.get("triton", times.get("torch"))
        row["gb_per_s"] = min_bytes(op, sessions, d, C, n) / best / 1e9 if best else None
        row["fraction_of_copy"] = row["gb_per_s"] * 1e9 / copy_bytes_per_s if best else None
        row["speedup"] = times["torch"] / times["triton"] if "torch" in times and "triton" in times else None
        rows.append(row)
    return rows


def missed_targets(rows: list[dict]) -> list[str]:
    missed = []
    for r in rows:
        name = f"{r['op']} S={r['sessions']} d={r['d']} C={r['C']}"
        if r["op"] in UPDATE_OPS and r["speedup"] is not None and r["speedup"] < SPEEDUP_TARGET:
            missed.append(f"{name}: triton {r['speedup']:.2f}x the torch path (target {SPEEDUP_TARGET}x)")
        if (r["sessions"] == BANDWIDTH_TARGET_SESSIONS and r["op"] != "head_forward_shared"
                and r["fraction_of_copy"] is not None and r["fraction_of_copy"] < BANDWIDTH_TARGET):
            missed.append(f"{name}: {100 * r['fraction_of_copy']:.0f}% of copy bandwidth "
                          f"(target {100 * BANDWIDTH_TARGET:.0f}%)")
    return missed


def format_rows(rows: list[dict], copy_bytes_per_s: float) -> str:
    def ms(v):
        return f"{v * 1e3:.3f}" if v is not None else "-"

    lines = [f"device-to-device copy: {copy_bytes_per_s / 1e9:.0f} GB/s",
             "| op | sessions | d | C | torch ms | triton ms | triton speed-up | GB/s | % of copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        gbps = f"{r['gb_per_s']:.0f}" if r["gb_per_s"] is not None else "-"
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r["fraction_of_copy"] is not None else "-"
        lines.append(f"| {r['op']} | {r['sessions']} | {r['d']} | {r['C']} | {ms(r['torch_s'])} | "
                     f"{ms(r['triton_s'])} | {speedup} | {gbps} | {frac} |")
    return "\n".join(lines)


def run_kernel_tests(repo_root: Path, timeout_s: int = 240) -> bool:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for the GPU
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(repo_root / "tests" / "kernels")]
    print("$", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=repo_root, env=env, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"kernel tests did not finish in {timeout_s} s")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", default="gpu_check.json")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none is visible")
        return 2
    from loadtests import kernel_bench as bench

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    tests_ok = True if args.skip_tests else run_kernel_tests(Path(__file__).resolve().parents[1])

    copy_bps = copy_bandwidth()
    results = bench.run(bench.FULL_GRID, ("torch", "triton"), device="cuda", min_seconds=0.05, log=None)
    rows = bandwidth_rows(results, copy_bps)
    print(format_rows(rows, copy_bps))
    missed = missed_targets(rows)
    print("\ntargets missed:" if missed else "\nall targets met", *missed, sep="\n  ")
    print(f"\nkernel tests: {'passed' if tests_ok else 'FAILED'}; {time.perf_counter() - started:.0f} s in all")
    with open(args.json, "w") as f:
        json.dump(dict(copy_bytes_per_s=copy_bps, results=results, rows=rows, missed=missed,
                       tests_passed=tests_ok), f, indent=1)
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())

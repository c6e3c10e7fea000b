"""The ahead-of-time compile check (loadtests/aot_check.py, `python -m kernels.aot_check`): every
Triton kernel compiled for a real GPU target on this CPU-only machine, its resource usage read
from the cubin. A representative subset runs here; the full grid is the command's default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import aot_check

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_head_forward_kernel", "_softmax_grad_kernel", "_grad_apply_kernel", "_entropy_grad_kernel",
           "_delta_kernel", "_prototype_kernel", "_support_kernel", "_rls_gain_kernel", "_rls_step_kernel",
           # the label-free rules on frozen features
           "_feature_stats_kernel", "_standardize_kernel", "_standardized_head_kernel", "_affinity_assign_kernel",
           "_affinity_merge_kernel",
           # the learned rule hyper
           "_class_mean_head_kernel"}


def _tools_present() -> bool:
    try:
        aot_check.tool("cuobjdump")
        aot_check.tool("ptxas")
    except (FileNotFoundError, ImportError):
        return False
    return True


@pytest.mark.skipif(not _tools_present(), reason="the triton wheel has no cuobjdump/ptxas (no NVIDIA backend)")
def test_every_kernel_compiles_for_sm90_without_stack_or_spills_at_default_shapes(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "kernels.aot_check", "--quick", "--C", "64", "--json", str(out),
                           "--strict"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["kernel"] for r in rows} == KERNELS, "a kernel was not launched by any op"
    assert {r["op"] for r in rows} >= {"head_forward", "sgd_step", "entropy_step", "delta_step", "prototype_step",
                                       "support_step", "rls_step", "feature_stats_step", "standardize_features",
                                       "standardized_head", "affinity_step"}
    assert {(r["C"], r["heads"]) for r in rows} == {(64, "fp32"), (64, "bf16")}  # the server width
    for r in rows:
        assert r["error"] is None, r
        assert r["arch"] == 90 and r["default_shape"]
        assert 0 < r["registers"] <= 255
        assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert report["summary"]["failed"] == 0
    assert "| _grad_apply_kernel | sgd_step | sm_90 | 64 | 768 |" in done.stdout


@pytest.mark.skipif(not _tools_present(), reason="the triton wheel has no cuobjdump/ptxas (no NVIDIA backend)")
def test_a_compile_error_fails_the_command():
    """sm_30 is a target this Triton cannot build for: every row reports the compiler's error and
    the exit status is 1 (run from this test process, whose launchers are interpreted: the
    command re-runs itself without the interpreter)."""
    done = subprocess.run([sys.executable, "-m", "kernels.aot_check", "--quick", "--C", "10", "--arch", "30"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAILED: " in done.stdout and " 0 failed" not in done.stdout


def test_under_the_interpreter_main_runs_itself_again_without_it(monkeypatch):
    """Interpreted launchers cannot be compiled: main() does not report zero rows, it runs the
    command again in a process without TRITON_INTERPRET."""
    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(aot_check.subprocess, "run", lambda cmd, env: calls.append((cmd, env)) or
                        subprocess.CompletedProcess(cmd, 7))
    assert aot_check.main(["--quick"]) == 7
    (cmd, env), = calls
    assert cmd[1:4] == ["-m", "loadtests.aot_check", "--quick"] and "TRITON_INTERPRET" not in env


def test_launch_capture_describes_arguments_as_the_jit_specialises_them():
    import torch

    assert aot_check._describe(torch.zeros(4))[0] == "*fp32"
    assert aot_check._describe(torch.zeros(4, dtype=torch.bfloat16))[0] == "*bf16"
    assert aot_check._describe(torch.zeros(4, dtype=torch.int64)) == ("*i64", "D")
    assert aot_check._describe(1) == ("constexpr", "")
    assert aot_check._describe(768) == ("i32", "D")
    assert aot_check._describe(37) == ("i32", "")
    assert aot_check._describe(2**40)[0] == "i64"
    assert aot_check.is_default_shape(64, 768) and not aot_check.is_default_shape(1000, 768)

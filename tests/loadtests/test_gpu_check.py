"""The GPU acceptance run (loadtests/gpu_check.py) at toy sizes on this CPU: every step runs (or
says why not), the real servers answer, partial results are on disk as steps finish, and only a
correctness failure makes the exit status non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_run_measures_every_step_and_writes_one_table_and_one_json(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "kernels.gpu_check", "--out", str(out), "--tiny", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    for name in ("env", "kernel_tests", "copy", "ops", "serving", "resident"):
        assert steps[name]["status"] == "ok", (name, steps[name].get("error"), steps[name].get("traceback"))
    assert steps["no_sync"]["status"] == "skipped" and "CUDA" in steps["no_sync"]["reason"]
    assert steps["vit_vs_timm"]["status"] in ("ok", "skipped")  # timm is installed on the GPU machine only
    assert steps["env"]["kernels"]["sgd_step"] == "torch"
    ops = steps["ops"]["rows"]
    assert {r["op"] for r in ops} == set(gpu_check.OPS)
    for r in ops:  # both paths timed on every cell (Triton under the interpreter here)
        assert r["torch_s"] > 0 and r["triton_s"] > 0 and r["bytes"] > 0, r
    assert {r["S"] for r in ops} == {8, 64}  # the grid plus the large-S cell
    serving = steps["serving"]
    assert set(serving["levels"]) == {"dynamic", "batch_size_1", "baseline"}
    for level in serving["levels"].values():
        assert level["ok"] > 0 and not level["errors"] and level["images_per_s"] > 0
    assert serving["inprocess_images_per_s"]
    resident = steps["resident"]
    assert resident["resident_200"]["tiers"]["device"] == 200 and resident["resident_100"]["p50_ms"] > 0
    figures = {f["figure"] for f in data["figures"]}
    assert any(f.startswith("dynamic batching") for f in figures)
    assert any(f.startswith("fwserve / plain baseline") for f in figures)
    assert any("--api-workers" in f for f in figures)
    md = (out / "gpu_check.md").read_text()
    step_lines = [ln for ln in md.splitlines() if ln.startswith("| step ") and not ln.startswith("| step /")]
    assert len(step_lines) == len(gpu_check.STEPS) and "| step / figure | measured | target | verdict |" in md
    assert data["correctness_failures"] == []


def test_a_correctness_failure_alone_fails_the_run_and_steps_are_written_as_they_end(tmp_path, monkeypatch):
    seen_on_disk = []

    def failing_tests(run):
        seen_on_disk.append(json.loads((run.out / "gpu_check.json").read_text())["steps"]["env"]["status"])
        return {"status": "failed", "summary": "1 failed"}

    def broken_measurement(run):
        raise RuntimeError("no memory")

    monkeypatch.setattr(gpu_check, "step_kernel_tests", failing_tests)
    monkeypatch.setattr(gpu_check, "step_copy", broken_measurement)
    skip = "no_sync,vit_vs_timm,ops,serving,resident"
    assert gpu_check.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--skip", skip]) == 1
    assert seen_on_disk == ["ok"]  # env was on disk before the next step started
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["correctness_failures"] == ["kernel_tests"]
    assert data["steps"]["copy"]["status"] == "error" and "no memory" in data["steps"]["copy"]["error"]

    monkeypatch.setattr(gpu_check, "step_kernel_tests", lambda run: {"summary": "all passed"})
    assert gpu_check.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--skip", skip]) == 0  # errors only


def test_steps_beyond_the_budget_are_skipped_not_run(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "step_kernel_tests", lambda run: ran.append("kernel_tests") or {})
    assert gpu_check.main(["--out", str(tmp_path), "--tiny", "--device", "cpu", "--budget-s", "0",
                           "--skip", "no_sync,vit_vs_timm"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not ran
    assert all(data["steps"][s]["status"] == "skipped" for s in ("kernel_tests", "ops", "serving", "resident"))
    assert "budget" in data["steps"]["ops"]["reason"]


@pytest.mark.parametrize("flag", ["--out"])
def test_the_acceptance_script_runs_the_check_with_carried_wheels(tmp_path, flag):
    """loadtests/gpu_acceptance.sh installs a wheel folder into a temporary site and runs the check;
    with an empty folder and --tiny it must still produce the files (nothing to install)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "OUT": str(out),
           "GPU_CHECK_ARGS": "--tiny --device cpu --skip ops,serving,resident,kernel_tests"}
    done = subprocess.run(["bash", str(ROOT / "loadtests" / "gpu_acceptance.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "gpu_check" / "gpu_check.json").is_file() and (out / "gpu_check" / "gpu_check.md").is_file()
    assert "no wheels" in done.stdout + done.stderr

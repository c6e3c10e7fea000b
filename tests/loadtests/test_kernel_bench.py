"""The head-op benchmark (loadtests/kernel_bench.py) and the GPU acceptance check's arithmetic
(loadtests/gpu_check.py), and the kernels.bench / kernels.gpu_check shims that forward to them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import gpu_check
from loadtests import kernel_bench as bench

ROW_KEYS = {"op", "impl", "sessions", "d", "C", "rows", "seconds_per_call"}


def test_bench_writes_rows_for_every_op_and_impl(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_GRID", dict(d=(24,), C=(10,), sessions=(1, 8)))
    monkeypatch.setattr(bench, "ROWS", 8)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out), "--device", "cpu"])
    rows = json.loads(out.read_text())
    assert all(set(r) == ROW_KEYS for r in rows)
    assert all(r["seconds_per_call"] > 0 and r["rows"] == 8 for r in rows)
    measured = {(r["op"], r["impl"], r["sessions"]) for r in rows}
    for op in bench.OPS:
        for impl in ("loop", "torch"):
            assert {(op, impl, 1), (op, impl, 8)} <= measured
    assert "| sgd | 8 | 24 | 10 |" in capsys.readouterr().out


@pytest.mark.parametrize("op", bench.OPS)
def test_loop_baseline_computes_the_same_update_as_the_ops(op):
    """The `loop` rows are only a fair baseline if they do the same work as the kernels."""
    loop, batched = bench.Setup(4, 24, 10, 12, "cpu"), bench.Setup(4, 24, 10, 12, "cpu")
    out_loop = bench.loop_call(op, loop)()
    out_ops = bench.kernel_call(op, "torch", batched)()
    if op == "head_forward":
        assert (out_loop - out_ops).abs().max() < 1e-5
        return
    if op == "sgd":
        for s, lin in loop.loop_heads.items():
            loop.W[s], loop.b[s] = lin.weight.detach(), lin.bias.detach()
    for name in ("W", "b", "sums", "counts", "P"):
        assert (getattr(loop, name) - getattr(batched, name)).abs().max() < 1e-4, name


def test_bandwidth_model_and_targets():
    assert gpu_check.min_bytes("sgd", 1024, 768, 10, 256) == 2 * 256 * 10 * 768 * 4 + 256 * 768 * 4
    assert gpu_check.min_bytes("head_forward", 1, 192, 10, 256) == 10 * 192 * 4 + 256 * 192 * 4 + 256 * 10 * 4
    results = [dict(op="sgd", impl="torch", sessions=1024, d=768, C=10, rows=256, seconds_per_call=2e-4),
               dict(op="sgd", impl="triton", sessions=1024, d=768, C=10, rows=256, seconds_per_call=1e-4)]
    copy = 4e12
    rows = gpu_check.bandwidth_rows(results, copy)
    assert rows[0]["speedup"] == pytest.approx(2.0)
    assert rows[0]["gb_per_s"] == pytest.approx(gpu_check.min_bytes("sgd", 1024, 768, 10, 256) / 1e-4 / 1e9)
    missed = gpu_check.missed_targets(rows)
    assert len(missed) == 1 and "copy bandwidth" in missed[0]  # 2x is met, 60% of 4 TB/s is not
    table = gpu_check.format_rows(rows, copy)
    assert "4000 GB/s" in table and "| sgd | 1024 | 768 | 10 | 0.200 | 0.100 | 2.00x |" in table


def test_gpu_check_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--skip-tests"]) == 2


def test_shims_forward_to_loadtests():
    for module in ("kernels.bench", "kernels.gpu_check"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                                cwd=Path(__file__).resolve().parents[2])
        assert result.returncode == 0 and "--json" in result.stdout, (module, result.stderr)

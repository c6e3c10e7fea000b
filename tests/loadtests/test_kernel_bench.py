"""The head-op benchmark (loadtests/kernel_bench.py) and the GPU acceptance check's arithmetic
(loadtests/gpu_check.py), and the kernels.bench / kernels.gpu_check shims that forward to them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    for name in ("W", "b", "sums", "counts", "P", "supports", "support_priority"):
        a, b = getattr(loop, name), getattr(batched, name)
        assert torch.equal(a.isinf(), b.isinf()), name
        assert (a - b).nan_to_num(0.0, 0.0, 0.0).abs().max() < 1e-4, name


def test_must_move_bytes_count_live_classes_and_touched_cells():
    t = bench.Setup(1024, 768, 10, 256, "cpu")
    heads = 256 * 10 * 768 * 4
    assert gpu_check.must_move_bytes("sgd", t) == 2 * heads + 256 * 768 * 4 + 256 * 10 * 4
    assert gpu_check.must_move_bytes("head_forward", t) == heads + 256 * 768 * 4 + 256 * 10 * 4
    # prototype touches one class per row here (every row its own session): sums in and out, the head row out
    assert gpu_check.must_move_bytes("prototype", t) == 256 * 768 * (4 + 4 + 4) + 256 * 768 * 4
    few = bench.Setup(4, 64, 10, 256, "cpu")  # 64 rows per session: at most 10 cells each
    cells = len({(s, int(c)) for s, c in zip(few.slot_list, few.y.tolist())})
    assert cells <= 40 and gpu_check.must_move_bytes("prototype", few) == cells * 64 * 12 + 256 * 64 * 4
    bf16 = bench.Setup(1024, 768, 10, 256, "cpu", head_dtype=torch.bfloat16)
    assert gpu_check.must_move_bytes("delta", bf16) == 2 * heads // 2 + 256 * 768 * 4


def test_gpu_check_refuses_cuda_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu"]) == 2  # without a GPU: --tiny only


def test_shims_forward_to_loadtests():
    for module, flag in (("kernels.bench", "--json"), ("kernels.gpu_check", "--out"), ("kernels.aot_check", "--json")):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                                cwd=Path(__file__).resolve().parents[2])
        assert result.returncode == 0 and flag in result.stdout, (module, result.stderr)

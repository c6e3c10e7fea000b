import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import dispatch


CPU = torch.device("cpu")


def test_auto_is_torch_for_cpu_tensors():
    assert dispatch.resolve_impl("auto", torch.zeros(1, device=CPU)) == "torch"
    assert dispatch.resolve_impl("torch", torch.zeros(1, device=CPU)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_triton_for_cuda_tensors():
    assert dispatch.resolve_impl("auto", torch.zeros(1, device="cuda")) == "triton"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if dispatch.interpreter_enabled():
        assert dispatch.resolve_impl("triton", torch.zeros(1, device=CPU)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve_impl("triton", torch.zeros(1, device=CPU))


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        kernels.head_forward(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2),
                             torch.zeros(1, dtype=torch.int64), torch.tensor([2]), impl="cuda")


def test_auto_routes_cpu_tensors_to_the_torch_path(monkeypatch):
    torch.set_default_device(CPU)  # undone by the autouse fixture in conftest.py
    calls = []
    monkeypatch.setattr(kernels.ops.torch_ops, "sgd_step_torch", lambda *a, **k: calls.append("torch"))
    kernels.sgd_step(torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                     torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.tensor([2]), 0.1)
    assert calls == ["torch"]


def test_bad_shapes_and_hyper_parameters_are_rejected():
    x, W, b = torch.zeros(2, 4), torch.zeros(3, 2, 4), torch.zeros(3, 2)
    slots, y, n = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), torch.tensor([2, 2, 2])
    with pytest.raises(ValueError, match="per-slot"):
        kernels.sgd_step(x, y, slots, W, b, n, lr=torch.ones(2))
    with pytest.raises(ValueError, match="d="):
        kernels.head_forward(torch.zeros(2, 5), W, b, slots, n)
    with pytest.raises(ValueError, match="float32"):
        kernels.delta_step(x.half(), y, slots, W, n, 0.5)
    with pytest.raises(ValueError, match="slots"):
        kernels.head_forward(x, W, b, slots.float(), n)


def test_public_ops_survive_loading_the_triton_launchers():
    """Loading every launcher module leaves the public ops in place (no module shares an op's
    name), and the launchers' `triton` is the real package, not kernels.triton."""
    import importlib

    import triton

    for name in ("common", "forward", "sgd", "delta", "prototype", "rls", "support", "entropy", "feature_stats",
                 "affinity"):
        launcher = importlib.import_module(f"kernels.triton.{name}")
        assert launcher.triton is triton and hasattr(triton, "jit")
    kernels.head_forward(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2),
                         torch.zeros(1, dtype=torch.int64), torch.tensor([2]), impl="triton")
    for op in kernels.ops.__all__:
        assert getattr(kernels, op) is getattr(kernels.ops, op), op
    for op in kernels.label_free_ops.__all__:
        assert getattr(kernels, op) is getattr(kernels.label_free_ops, op), op
    from kernels import head_forward

    assert head_forward is kernels.ops.head_forward


def test_kernels_import_and_run_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any import of triton now raises ImportError
        import torch, kernels
        logits = kernels.head_forward(torch.ones(2, 3), torch.ones(1, 4, 3), torch.zeros(1, 4),
                                      torch.tensor([0, -1]), torch.tensor([4]))
        assert logits.tolist() == [[3.0] * 4, [0.0] * 4], logits
        assert not any(m.startswith("kernels.triton") for m in sys.modules), "launchers imported eagerly"
        try:
            kernels.head_forward(torch.ones(2, 3), torch.ones(1, 4, 3), torch.zeros(1, 4),
                                 torch.tensor([0, -1]), torch.tensor([4]), impl="triton")
        except RuntimeError as err:
            assert "triton" in str(err)
        else:
            raise AssertionError("impl='triton' without triton must fail clearly")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=str(__import__("pathlib").Path(kernels.__file__).parents[1]))
    assert result.returncode == 0, result.stderr

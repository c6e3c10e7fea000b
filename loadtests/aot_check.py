"""Ahead-of-time compile check of every Triton kernel, on a machine without a GPU:

    python -m loadtests.aot_check [--json FILE] [--quick] [--arch 90,80] [--strict]
    python -m kernels.aot_check ...                       (a shim, the same)

What the interpreter cannot show — whether a kernel compiles for the real chip, and what it
costs there in registers, stack and spills — is read off the compiler itself:
  1. every launcher in kernels/triton/ is called on small CPU tensors for each shape of the
     grid (class width C, feature width d, feature and head dtypes; support K = the t3a pool
     width) with Triton's launch intercepted: that records exactly the kernels, argument
     types, compile-time constants (block sizes) and warps a server launch would use;
  2. each distinct specialisation is compiled with triton.compile(ASTSource(...)) for a
     GPUTarget (sm_90 = H100/H200, sm_80 = A100), no GPU needed;
  3. registers, stack frame and shared memory come from the cubin (`cuobjdump
     --dump-resource-usage`, shipped in the triton wheel), spill bytes from ptxas's own
     report of that compile.
It prints one table row per (kernel, arch, C, d, dtypes) and exits 1 if anything failed to
compile. At the server's default shapes (C <= 64, d <= 768) every kernel must use no stack and
spill nothing: rows that do are listed, and --strict makes them an error too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

C_GRID = (2, 10, 16, 37, 64, 100, 1000)
D_GRID = (128, 192, 384, 768, 1024)
DTYPES = (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16"))  # (features x, heads W and b)
QUICK = dict(C=(10, 64, 1000), d=(768,), dtypes=(("fp32", "fp32"), ("fp32", "bf16")), arch=(90,))
SUPPORT_K = 32  # server.rules.t3a.SUPPORT_CAPACITY: the support pool width the server allocates
DEFAULT_MAX_C, DEFAULT_MAX_D = 64, 768  # the server's default shapes


def is_default_shape(C: int, d: int) -> bool:
    return C <= DEFAULT_MAX_C and d <= DEFAULT_MAX_D


@dataclass
class Launch:
    """One intercepted kernel launch: the kernel and what it would be compiled with."""

    op: str
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__

    def key(self) -> tuple:
        return (self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))


@dataclass
class Row:
    kernel: str
    op: str
    arch: int
    C: int
    d: int
    x: str
    heads: str
    constants: dict
    num_warps: int
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    compile_s: float | None = None
    error: str | None = None
    default_shape: bool = field(default=False)

    @property
    def clean(self) -> bool:
        return self.error is None and not self.stack and not self.spill_stores and not self.spill_loads


# ---- capturing launches -----------------------------------------------------------------------


TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
                   "int8": "i8", "uint8": "u8", "bool": "i1"}


def _describe(value) -> tuple[str, str]:
    """(Triton signature type, specialisation attribute) of a launch argument, as the JIT
    specialises it: 16-byte aligned pointers and integers divisible by 16 get divisibility 16,
    the integer 1 becomes a constant."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "i1", ""
    if isinstance(value, int):
        if value == 1:
            return "constexpr", ""
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    raise TypeError(f"unsupported launch argument {type(value).__name__}")


@contextlib.contextmanager
def intercept_launches(sink: list, op: str, backend):
    """Replace JITFunction.run: record each launch's compile inputs instead of running it."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        constexpr_names = {p.name for p in self.params if p.is_constexpr}
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(names):
            value = bound[name]
            if name in constexpr_names:
                signature[name], constexprs[name] = "constexpr", value
                continue
            kind, attr = _describe(value)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
            elif attr:
                attrs[(i,)] = backend.parse_attr(attr)
        sink.append(Launch(op, self, signature, constexprs, attrs, options))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def launchers_interpreted() -> bool:
    """The Triton launchers were imported under the interpreter (in this process, earlier)."""
    module = sys.modules.get("kernels.triton.forward")
    if module is None:
        return False
    from triton.runtime.jit import JITFunction

    return not isinstance(module._head_forward_kernel, JITFunction)


def launch_every_op(C: int, d: int, x_dtype: str, head_dtype: str, sink: list, backend) -> None:
    """Call every Triton launcher once per code path it has, on small tensors of these widths."""
    import torch

    from kernels.dispatch import per_slot
    from kernels.slot_batch import SlotBatch
    from kernels.triton import (affinity, class_mean_head, delta, entropy, feature_stats, forward, prototype, rls, sgd,
                                support)

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    S, R, B = 3, 3, 4
    x = torch.zeros(B, d, dtype=dt[x_dtype])
    W = torch.zeros(S, C, d, dtype=dt[head_dtype])
    b = torch.zeros(S, C, dtype=dt[head_dtype])
    slots = torch.tensor([0, 0, 1, -1])
    rows = torch.tensor([0, 0, 1, 0])
    y = torch.tensor([0, 1, 1, 0]) % C
    n = torch.full((S,), C)
    h = per_slot(0.1, S, x.device)
    logits = torch.zeros(B, C)
    calls = {
        "head_forward": lambda: forward.head_forward_triton(x, W, b, slots, n),
        "head_forward (cosine)": lambda: forward.head_forward_triton(x, W, b, slots, n,
                                                                     normalize=torch.ones(S, dtype=torch.bool)),
        "sgd_step": lambda: sgd.sgd_step_triton(x, y, slots, W, b, n, h, h, logits=logits),
        # the Meta-SGD step (per-feature rates): the apply kernel's HAS_RATES variant
        "sgd_step (rates)": lambda: sgd.sgd_step_triton(x, y, slots, W, b, n, h, h, logits=logits,
                                                        feature_rates=torch.ones(d), bias_rate=torch.ones(1)),
        "entropy_step": lambda: entropy.entropy_step_triton(x, y, slots, W, b, n, h, h, logits=logits),
        "delta_step": lambda: delta.delta_step_triton(x, y, slots, W, n, h),
        "prototype_step": lambda: prototype.prototype_step_triton(x, y, slots, rows, torch.empty(R, C, d),
                                                                  torch.empty(R, C), W, n, h),
        # the hyper rule: class means through a [d, d] metric
        "class_mean_head_step": lambda: class_mean_head.class_mean_head_step_triton(
            x, y, slots, rows, torch.empty(R, C, d), torch.empty(R, C), W, b, n, torch.eye(d), h),
        "support_step": lambda: support.support_step_triton(x, y, torch.zeros(B), slots, rows,
                                                            torch.empty(R, C, SUPPORT_K, d),
                                                            torch.empty(R, C, SUPPORT_K), W, n, h, h),
        "rls_step": lambda: rls.rls_step_triton(x, y, slots, rows, W, torch.empty(R, d, d), n,
                                                batch=SlotBatch.from_list(slots.tolist())),
        # the label-free rules on frozen features (kernels/label_free_ops.py)
        "feature_stats_step": lambda: feature_stats.feature_stats_step_triton(
            x, slots, rows, torch.zeros(R, 1), torch.zeros(R, d), torch.ones(R, d), h),
        "standardize_features": lambda: feature_stats.standardize_features_triton(
            x, slots, rows, torch.zeros(R, d), torch.ones(R, d), torch.zeros(R, d), torch.ones(R, d), h),
        "standardized_head": lambda: feature_stats.standardized_head_triton(
            slots, rows, torch.zeros(R, d), torch.ones(R, d), torch.zeros(R, d), torch.ones(R, d),
            torch.zeros(R, C, d), torch.zeros(R, C), W, b, n, h),
        "affinity_step": lambda: affinity.affinity_step_triton(
            x, slots, rows, torch.zeros(R, C, d), torch.zeros(R, d), torch.ones(R, d), W, b, n, h, h + 2.0),
    }
    before = len(sink)
    for op, call in calls.items():
        with intercept_launches(sink, op, backend):
            call()
    if len(sink) == before:
        raise RuntimeError("no kernel launch was intercepted: the launchers are not JIT functions "
                           "(imported under TRITON_INTERPRET?)")


# ---- compiling and reading the cubin ------------------------------------------------------------


def tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return str(path)


RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one specialisation for sm_<arch>; its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.kernel, launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    log = io.StringIO()
    started = time.perf_counter()
    knobs = getattr(triton, "knobs", None)
    dump = knobs.nvidia.dump_ptxas_log if knobs is not None else None
    try:
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report (spill bytes) goes to stdout
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    finally:
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = dump
    out = {"compile_s": time.perf_counter() - started}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(cubin)
    m = RESOURCE.search(usage)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    out.update(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)))
    report = log.getvalue()
    if not SPILLS.search(report):  # a compile served from a cache ran no ptxas: ask it again
        report = ptxas_report(compiled.asm["ptx"], compiled.metadata)
    spills = SPILLS.findall(report)
    out.update(spill_stores=sum(int(a) for a, _ in spills), spill_loads=sum(int(b) for _, b in spills))
    return out


def ptxas_report(ptx: str, metadata) -> str:
    """ptxas -v's report for a kernel's PTX (the arch Triton compiled it for)."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([tool("ptxas"), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    return done.stdout + done.stderr


# ---- the grid ---------------------------------------------------------------------------------


def run(C_values=C_GRID, d_values=D_GRID, dtypes=DTYPES, archs=(90, 80), log=print) -> list[Row]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    rows: list[Row] = []
    compiled: dict[tuple, dict] = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for C in C_values:
            for d in d_values:
                for x_dtype, head_dtype in dtypes:
                    launches: list[Launch] = []
                    launch_every_op(C, d, x_dtype, head_dtype, launches, backend)
                    seen = set()
                    for launch in launches:
                        key = launch.key()
                        if key in seen:  # sgd_step launches the forward only without logits: once per op
                            continue
                        seen.add(key)
                        row = Row(launch.name, launch.op, arch, C, d, x_dtype, head_dtype,
                                  {k: v for k, v in launch.constexprs.items() if k.isupper()},
                                  int(launch.options.get("num_warps", 4)), default_shape=is_default_shape(C, d))
                        if (arch, key) not in compiled:
                            try:
                                compiled[(arch, key)] = compile_launch(launch, arch)
                            except Exception as e:  # reported in the table and the exit status
                                compiled[(arch, key)] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                        for k, v in compiled[(arch, key)].items():
                            setattr(row, k, v)
                        rows.append(row)
                        if log:
                            log(format_row(row))
    return rows


def format_row(r: Row) -> str:
    if r.error:
        return f"| {r.kernel} | {r.op} | sm_{r.arch} | {r.C} | {r.d} | {r.x}/{r.heads} | - | - | - | - | - | FAILED: {r.error} |"
    consts = " ".join(f"{k}={v}" for k, v in r.constants.items() if k.startswith("BLOCK"))
    spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
    flag = "" if r.clean else " (!)"
    return (f"| {r.kernel} | {r.op} | sm_{r.arch} | {r.C} | {r.d} | {r.x}/{r.heads} | {consts} w{r.num_warps} | "
            f"{r.registers} | {r.stack} | {spills} | {r.shared} |{flag} |")


HEADER = ("| kernel | op | arch | C | d | x/heads | blocks, warps | registers | stack B | spill st/ld B | shared B | |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def summary(rows: list[Row]) -> dict:
    failed = [r for r in rows if r.error]
    default_dirty = [r for r in rows if r.default_shape and not r.error and not r.clean]
    by_c = {}
    for r in rows:
        if r.error:
            continue
        worst = by_c.setdefault(r.C, {"max_registers": 0, "max_stack": 0, "max_spill_stores": 0})
        worst["max_registers"] = max(worst["max_registers"], r.registers or 0)
        worst["max_stack"] = max(worst["max_stack"], r.stack or 0)
        worst["max_spill_stores"] = max(worst["max_spill_stores"], r.spill_stores or 0)
    return {"rows": len(rows), "compiled": len({(r.kernel, r.arch, json.dumps(r.constants, sort_keys=True), r.x,
                                                 r.heads) for r in rows}),
            "failed": len(failed), "default_shape_rows_with_stack_or_spills": len(default_dirty), "by_C": by_c}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write every row and the summary as JSON")
    parser.add_argument("--quick", action="store_true", help="a representative subset (CI): C in 10, 64, 1000, d 768, "
                                                              "fp32 features, fp32 and bf16 heads, sm_90")
    parser.add_argument("--arch", default=None, help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--C", default=None, help="comma-separated class widths (default %s)" % ",".join(map(str, C_GRID)))
    parser.add_argument("--d", default=None, help="comma-separated feature widths (default %s)" % ",".join(map(str, D_GRID)))
    parser.add_argument("--dtypes", default=None, help="comma-separated features/heads pairs, e.g. fp32/fp32,bf16/bf16")
    parser.add_argument("--strict", action="store_true", help="also fail on stack or spills at the default shapes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or launchers_interpreted():
        # Under the interpreter @triton.jit gives interpreted functions, which cannot be compiled:
        # run again in a process that imports the launchers without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "loadtests.aot_check", *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode
    # A fresh compile cache: every specialisation goes through ptxas, whose report has the spills.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fwserve-aot-")
    grid = QUICK if args.quick else dict(C=C_GRID, d=D_GRID, dtypes=DTYPES, arch=(90, 80))
    C_values = tuple(int(v) for v in args.C.split(",")) if args.C else grid["C"]
    d_values = tuple(int(v) for v in args.d.split(",")) if args.d else grid["d"]
    archs = tuple(int(v) for v in args.arch.split(",")) if args.arch else grid["arch"]
    dtypes = tuple(tuple(pair.split("/")) for pair in args.dtypes.split(",")) if args.dtypes else grid["dtypes"]
    started = time.perf_counter()
    print(HEADER, flush=True)
    rows = run(C_values, d_values, dtypes, archs, log=lambda line: print(line, flush=True))
    result = summary(rows)
    result["seconds"] = round(time.perf_counter() - started, 1)
    import triton

    result["triton"] = triton.__version__
    print(f"\n{result['rows']} rows, {result['compiled']} distinct compiles, {result['failed']} failed, "
          f"{result['default_shape_rows_with_stack_or_spills']} with stack or spills at the default shapes "
          f"(C <= {DEFAULT_MAX_C}, d <= {DEFAULT_MAX_D}); {result['seconds']} s, triton {result['triton']}")
    for C, worst in sorted(result["by_C"].items()):
        print(f"  C={C}: at most {worst['max_registers']} registers, {worst['max_stack']} B stack, "
              f"{worst['max_spill_stores']} B spill stores per thread")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": result, "rows": [asdict(r) for r in rows]}, indent=1))
    if result["failed"]:
        return 1
    if args.strict and result["default_shape_rows_with_stack_or_spills"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

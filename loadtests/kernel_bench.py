"""Benchmark the head ops: `python -m loadtests.kernel_bench [--quick] [--json PATH] [--device cuda]`.

Implementations, timed side by side in one process on identical inputs:
  loop    what a user writes without kernels/: a Python loop over the sessions in the batch —
          nn.Linear + autograd + torch.optim.SGD for the SGD step, nn.Linear for the forward,
          the plain per-session (and per-row, for sequential rules) tensor code for the others;
  torch   the batched torch path (kernels/torch_ops.py), no loop over sessions;
  triton  the Triton kernels (only when CUDA is present; the interpreter is far too slow).
Plus `head_forward_shared` / `torch`: one shared-head matmul x @ W^T + b of the same shape,
the yardstick for the grouped forward.

Every call gets `rows` feature rows. With fewer sessions than rows each session gets
rows / sessions of them; otherwise every row belongs to a different session, drawn at random.
sgd and entropy are timed as the server calls them on the Triton path: with the round's
forward logits given (`logits=`; the torch path ignores them and computes its own).
Timing: on CUDA, triton.testing.do_bench (CUDA events around many back-to-back calls, median,
L2 flushed between calls), so host overhead is not mixed into the figure; on CPU, the median
of wall-clock samples. `python -m kernels.bench` (a shim) runs the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import cached_property

import torch
import torch.nn.functional as F

import kernels

OPS = ("head_forward", "sgd", "delta", "prototype", "rls", "support", "entropy")
FULL_GRID = dict(d=(192, 384, 768), C=(10, 100), sessions=(1, 64, 256, 1024))
QUICK_GRID = dict(d=(192, 768), C=(10,), sessions=(1, 256, 1024))
# RLS moves d*d floats per row; at d = 768 one call takes seconds on a CPU, too slow for --quick.
QUICK_MAX_RLS_D = 192
ROWS = 256
SUPPORT_K = 32  # the t3a support pool width the server allocates (server.rules.t3a.SUPPORT_CAPACITY)


class Setup:
    """One benchmark shape: heads, a batch and (allocated on first use) each rule's state, on
    `device`. Random draws use a CPU generator under a CPU device scope (whatever the default
    device is), then move. head_dtype: storage of W and b (bf16 heads)."""

    def __init__(self, sessions: int, d: int, C: int, rows: int, device: str, seed: int = 0,
                 head_dtype: torch.dtype = torch.float32, K: int = SUPPORT_K):
        self.sessions, self.d, self.C, self.rows, self.device, self.K = sessions, d, C, rows, device, K
        with torch.device("cpu"):
            g = torch.Generator().manual_seed(seed)
            if sessions >= rows:
                slots = torch.randperm(sessions, generator=g)[:rows]
            else:
                slots = (torch.arange(rows) % sessions)[torch.randperm(rows, generator=g)]
            touched = slots.unique()
            # Rule state pools are sized to the sessions that use the rule; here: the touched ones.
            state_of_slot = torch.full((sessions,), -1, dtype=torch.int64)
            state_of_slot[touched] = torch.arange(touched.numel())
            x = torch.randn(rows, d, generator=g)
            y = torch.randint(0, C, (rows,), generator=g)
            W = 0.01 * torch.randn(sessions, C, d, generator=g) if sessions * C * d <= 1 << 26 else None
            priority = torch.rand(rows, generator=g)
        self.slot_list = slots.tolist()
        self.slots = slots.to(device)
        self.state_rows = state_of_slot[slots].to(device)
        self.touched = touched.tolist()
        self.R = len(self.touched)
        self.x = x.to(device)
        self.y = y.to(device)
        if W is None:  # large pools: drawn on the device (a CPU copy would cost more than the timing)
            gen = torch.Generator(device=device).manual_seed(seed)
            W = 0.01 * torch.randn(sessions, C, d, generator=gen, device=device)
        self.W = W.to(device=device, dtype=head_dtype)
        self.b = torch.zeros(sessions, C, device=device, dtype=head_dtype)
        self.n_classes = torch.full((sessions,), C, dtype=torch.int64, device=device)
        self.normalize = torch.zeros(sessions, dtype=torch.bool, device=device)
        self.priority = priority.to(device)
        self.batch = kernels.SlotBatch.from_list(self.slot_list, device)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(self.slot_list):
            groups.setdefault(s, []).append(i)
        self.groups = {s: torch.tensor(rows_s, device=device) for s, rows_s in groups.items()}

    @cached_property
    def sums(self) -> torch.Tensor:
        return torch.zeros(self.R, self.C, self.d, device=self.device)

    @cached_property
    def counts(self) -> torch.Tensor:
        return torch.zeros(self.R, self.C, device=self.device)

    @cached_property
    def P(self) -> torch.Tensor:
        return torch.eye(self.d, device=self.device).repeat(self.R, 1, 1)

    @cached_property
    def supports(self) -> torch.Tensor:
        return torch.zeros(self.R, self.C, self.K, self.d, device=self.device)

    @cached_property
    def support_priority(self) -> torch.Tensor:
        return torch.full((self.R, self.C, self.K), float("inf"), device=self.device)

    @cached_property
    def logits(self) -> torch.Tensor:
        """The round's forward logits (what the executor hands sgd / entropy)."""
        return kernels.head_forward(self.x, self.W, self.b, self.slots, self.n_classes, self.normalize,
                                    batch=self.batch)

    @cached_property
    def unlabelled(self) -> torch.Tensor:
        return torch.where(torch.arange(self.rows, device=self.device) % 2 == 0, -1, self.y)


def kernel_call(op: str, impl: str, t: Setup) -> Callable[[], object]:
    bt = t.batch
    if op == "head_forward":
        return lambda: kernels.head_forward(t.x, t.W, t.b, t.slots, t.n_classes, t.normalize, impl=impl, batch=bt)
    if op == "sgd":
        logits = t.logits
        return lambda: kernels.sgd_step(t.x, t.y, t.slots, t.W, t.b, t.n_classes, 1e-3, 1e-4, impl=impl, batch=bt,
                                        logits=logits)
    if op == "delta":
        return lambda: kernels.delta_step(t.x, t.y, t.slots, t.W, t.n_classes, 0.1, impl=impl, batch=bt)
    if op == "prototype":
        sums, counts = t.sums, t.counts
        return lambda: kernels.prototype_step(t.x, t.y, t.slots, t.state_rows, sums, counts, t.W, t.n_classes,
                                              10.0, impl=impl, batch=bt)
    if op == "rls":
        P = t.P
        return lambda: kernels.rls_step(t.x, t.y, t.slots, t.state_rows, t.W, P, t.n_classes, impl=impl, batch=bt)
    if op == "support":
        sup, prio = t.supports, t.support_priority
        return lambda: kernels.support_step(t.x, t.y, t.priority, t.slots, t.state_rows, sup, prio, t.W, t.n_classes,
                                            20.0, 10.0, impl=impl, batch=bt)
    if op == "entropy":
        logits, y = t.logits, t.unlabelled
        return lambda: kernels.entropy_step(t.x, y, t.slots, t.W, t.b, t.n_classes, 1e-3, 0.5, impl=impl, batch=bt,
                                            logits=logits)
    # the learned rules' ops (timed by the GPU acceptance run; no per-session loop baseline here)
    if op == "sgd_rates":  # meta_sgd's step: per-feature rates and a bias rate
        logits = t.logits
        rates = torch.full((t.d,), 0.5, device=t.x.device)
        rho = torch.full((1,), 0.5, device=t.x.device)
        return lambda: kernels.sgd_step(t.x, t.y, t.slots, t.W, t.b, t.n_classes, 1e-3, 1e-4, impl=impl, batch=bt,
                                        logits=logits, feature_rates=rates, bias_rate=rho)
    if op == "class_mean_head":  # hyper's step: class means through a [d, d] metric
        sums, counts = t.sums, t.counts
        metric = torch.eye(t.d, device=t.x.device)
        return lambda: kernels.class_mean_head_step(t.x, t.y, t.slots, t.state_rows, sums, counts, t.W, t.b,
                                                    t.n_classes, metric, 1.0, impl=impl, batch=bt)
    raise ValueError(op)


def loop_call(op: str, t: Setup) -> Callable[[], object]:
    """The per-session Python loop a user would write, for the sessions present in the batch."""
    groups, C = t.groups, t.C
    if op in ("head_forward", "sgd"):
        heads = {}
        for s in groups:
            lin = torch.nn.Linear(t.d, C, device=t.x.device)
            with torch.no_grad():
                lin.weight.copy_(t.W[s])
                lin.bias.copy_(t.b[s])
            heads[s] = lin
        t.loop_heads = heads  # the user's state lives in these modules, not in t.W / t.b
        if op == "head_forward":
            def forward():
                out = torch.zeros(t.rows, C, device=t.x.device)
                with torch.no_grad():
                    for s, rows in groups.items():
                        out[rows] = heads[s](t.x[rows])
                return out
            return forward
        optimizers = {s: torch.optim.SGD([{"params": [lin.weight], "weight_decay": 1e-4},
                                          {"params": [lin.bias], "weight_decay": 0.0}], lr=1e-3)
                      for s, lin in heads.items()}

        def sgd():
            for s, rows in groups.items():
                optimizers[s].zero_grad()
                F.cross_entropy(heads[s](t.x[rows]), t.y[rows]).backward()
                optimizers[s].step()
        return sgd

    onehots = F.one_hot(t.y, C).float()
    if op == "delta":
        def delta():
            for s, rows in groups.items():
                head = t.W[s]
                for i in rows.tolist():
                    k = F.normalize(t.x[i], dim=0)
                    head.add_(torch.outer(onehots[i] - head @ k, k), alpha=0.1)
        return delta
    if op == "prototype":
        def prototype():
            for s, rows in groups.items():
                r = int(t.state_rows[rows[0]])
                t.sums[r].index_add_(0, t.y[rows], t.x[rows])
                t.counts[r].index_add_(0, t.y[rows], torch.ones(rows.numel(), device=t.x.device))
                for c in t.y[rows].unique().tolist():  # the classes that received rows
                    t.W[s, c] = 10.0 * F.normalize(t.sums[r, c] / t.counts[r, c], dim=0)
        return prototype
    if op == "rls":
        def rls():
            for s, rows in groups.items():
                head, P = t.W[s], t.P[int(t.state_rows[rows[0]])]
                for i in rows.tolist():
                    k = P @ t.x[i]
                    denom = 1.0 + t.x[i] @ k
                    head.add_(torch.outer(onehots[i] - head @ t.x[i], k / denom))
                    P.sub_(torch.outer(k, k / denom))
        return rls
    if op == "support":
        def support():
            for s, rows in groups.items():
                r = int(t.state_rows[rows[0]])
                for i in rows.tolist():
                    c = int(t.y[i])
                    E = t.support_priority[r, c, :20]
                    j = int(E.argmax())
                    if t.priority[i] < E[j]:
                        t.supports[r, c, j] = F.normalize(t.x[i], dim=0)
                        E[j] = t.priority[i]
                for c in t.y[rows].unique().tolist():
                    kept = t.support_priority[r, c, :20].isfinite()
                    t.W[s, c] = 10.0 * F.normalize(t.supports[r, c, :20][kept].sum(0), dim=0)
        return support
    if op == "entropy":
        def entropy():
            for s, rows in groups.items():
                xs, ys = t.x[rows], t.unlabelled[rows]
                p = torch.softmax(xs @ t.W[s].T + t.b[s], dim=1)
                logp = torch.log(p)
                H = -(p * logp).sum(1, keepdim=True)
                g = torch.where((ys >= 0).unsqueeze(1), p - F.one_hot(ys.clamp_min(0), C).float(), -p * (logp + H))
                keep = (ys >= 0) | (p.max(1).values >= 0.5)
                m = int(keep.sum())
                if m:
                    g = g[keep]
                    t.W[s] -= 1e-3 * g.T @ xs[keep] / m
                    t.b[s] -= 1e-3 * g.sum(0) / m
        return entropy
    raise ValueError(op)


def shared_matmul_call(t: Setup) -> Callable[[], object]:
    W0, b0 = t.W[0].float(), t.b[0].float()
    return lambda: torch.addmm(b0, t.x, W0.T)


def time_call(fn: Callable[[], object], device: str, min_seconds: float, max_calls: int = 50,
              min_calls: int = 3) -> float:
    """Median seconds per call, after one warm-up call. CUDA: triton.testing.do_bench (events
    around back-to-back calls, no host sync per call); CPU: wall clock per call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(5, int(min_seconds * 100)), rep=max(20, int(min_seconds * 1000)),
                        return_mode="median") / 1e3
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_calls or (time.perf_counter() - start < min_seconds and len(samples) < max_calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if samples[-1] > min_seconds:  # one slow call is representative enough
            break
    return statistics.median(samples)


def paired_ratios(op: str, setup: Setup, pairs: int, impl: str = "torch") -> list[float]:
    """loop time / impl time for `pairs` back-to-back pairs of calls (loop, then impl): drift of a
    shared machine hits both sides of a pair alike, so the ratios spread less than separate runs."""
    loop_fn, fast_fn = loop_call(op, setup), kernel_call(op, impl, setup)
    loop_fn(), fast_fn()
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        loop_fn()
        t1 = time.perf_counter()
        fast_fn()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return ratios


def run(grid: dict, impls: tuple[str, ...], ops_: tuple[str, ...] = OPS, rows: int | None = None, device: str = "cpu",
        min_seconds: float = 0.2, max_rls_d: int | None = None,
        log: Callable[[str], None] | None = print) -> list[dict]:
    rows = rows or ROWS
    results = []
    for d in grid["d"]:
        for C in grid["C"]:
            for sessions in grid["sessions"]:
                setup = Setup(sessions, d, C, rows, device)
                shape = dict(sessions=sessions, d=d, C=C, rows=rows)
                candidates = [("head_forward_shared", "torch", lambda: shared_matmul_call(setup))]
                for op in ops_:
                    if op == "rls" and max_rls_d is not None and d > max_rls_d:
                        continue
                    for impl in impls:
                        make = (lambda op=op: loop_call(op, setup)) if impl == "loop" else \
                            (lambda op=op, impl=impl: kernel_call(op, impl, setup))
                        candidates.append((op, impl, make))
                for op, impl, make in candidates:
                    seconds = time_call(make(), device, min_seconds)
                    results.append(dict(op=op, impl=impl, **shape, seconds_per_call=seconds))
                    if log:
                        log(f"{op:<20} {impl:<7} S={sessions:<5} d={d:<4} C={C:<4} {seconds * 1e3:10.3f} ms")
                del setup
    return results


def format_table(results: list[dict]) -> str:
    """One line per (op, shape): ms per call of each impl and the speed-up over the loop."""
    impls = [i for i in ("loop", "torch", "triton") if any(r["impl"] == i for r in results)]
    by_key: dict[tuple, dict[str, float]] = {}
    for r in results:
        by_key.setdefault((r["op"], r["sessions"], r["d"], r["C"], r["rows"]), {})[r["impl"]] = r["seconds_per_call"]
    columns = ["op", "sessions", "d", "C"] + [f"{i} ms" for i in impls] + ["torch vs loop", "grouped / shared"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for (op, sessions, d, C, rows), times in by_key.items():
        if op == "head_forward_shared":
            continue
        cells = [op, str(sessions), str(d), str(C)]
        cells += [f"{times[i] * 1e3:.3f}" if i in times else "-" for i in impls]
        cells.append(f"{times['loop'] / times['torch']:.1f}x" if "loop" in times and "torch" in times else "-")
        shared = by_key.get(("head_forward_shared", sessions, d, C, rows), {}).get("torch")
        grouped = op == "head_forward" and shared and "torch" in times
        cells.append(f"{times['torch'] / shared:.2f}x" if grouped else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, shorter timing (< 60 s on 2 CPU cores)")
    parser.add_argument("--json", metavar="PATH", help="write the result rows as a JSON list")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--impls", default=None, help="comma-separated subset of loop,torch,triton")
    parser.add_argument("--sessions", default=None, help="comma-separated session counts (overrides the grid)")
    parser.add_argument("--d", default=None, help="comma-separated feature widths (overrides the grid)")
    parser.add_argument("--C", default=None, help="comma-separated class counts (overrides the grid)")
    parser.add_argument("--repeat", type=int, default=1, help="run the grid this many times (medians and spread)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="instead: N alternating loop/torch call pairs per (op, shape); ratio quartiles")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared, small CPU, OpenMP barriers "
                             "waiting on a descheduled thread swamp the timings; 0 = torch's choice)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    impls = tuple(args.impls.split(",")) if args.impls else (
        ("loop", "torch", "triton") if args.device.startswith("cuda") else ("loop", "torch"))
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("sessions", "d", "C"):
        if getattr(args, key):
            grid[key] = tuple(int(v) for v in getattr(args, key).split(","))
    started = time.perf_counter()
    if args.paired:
        out = []
        for d in grid["d"]:
            for C in grid["C"]:
                for sessions in grid["sessions"]:
                    for op in args.ops.split(","):
                        r = sorted(paired_ratios(op, Setup(sessions, d, C, ROWS, args.device), args.paired))
                        q = [r[int(f * (len(r) - 1))] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
                        out.append(dict(op=op, sessions=sessions, d=d, C=C, rows=ROWS, pairs=len(r), ratios=r,
                                        quartiles=q))
                        print(f"{op} S={sessions} d={d} C={C}: loop / torch over {len(r)} pairs: min {q[0]:.1f}x, "
                              f"q1 {q[1]:.1f}x, median {q[2]:.1f}x, q3 {q[3]:.1f}x, max {q[4]:.1f}x")
        print(f"{time.perf_counter() - started:.1f} s, {torch.get_num_threads()} threads")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    runs = [run(grid, impls, tuple(args.ops.split(",")), device=args.device,
                min_seconds=0.05 if args.quick else 0.3, max_rls_d=QUICK_MAX_RLS_D if args.quick else None,
                log=print if args.repeat == 1 else None) for _ in range(args.repeat)]
    results = runs[0] if args.repeat == 1 else merge_repeats(runs)
    print()
    print(format_table(results))
    if args.repeat > 1:
        print("\nspread over the repeats (loop / torch ratio: min, median, max):")
        for r in spread(runs):
            print(f"  {r['op']} S={r['sessions']} d={r['d']} C={r['C']}: {r['min']:.1f}x {r['median']:.1f}x "
                  f"{r['max']:.1f}x")
    print(f"\n{len(results)} timings in {time.perf_counter() - started:.1f} s on {args.device} "
          f"({torch.get_num_threads()} threads, {ROWS} rows per call; command: python -m loadtests.kernel_bench "
          f"{' '.join(argv if argv is not None else sys.argv[1:])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if args.repeat == 1 else {"median": results, "runs": runs}, f, indent=1)


def merge_repeats(runs: list[list[dict]]) -> list[dict]:
    """Rows with the median seconds per call over several runs of the same grid."""
    out = []
    for rows in zip(*runs):
        out.append({**rows[0], "seconds_per_call": statistics.median(r["seconds_per_call"] for r in rows)})
    return out


def spread(runs: list[list[dict]]) -> list[dict]:
    """Per (op, shape): the loop / torch ratio of each run, as min / median / max."""
    ratios: dict[tuple, list[float]] = {}
    for rows in runs:
        t = {(r["op"], r["impl"], r["sessions"], r["d"], r["C"]): r["seconds_per_call"] for r in rows}
        for (op, impl, S, d, C), sec in t.items():
            if impl == "loop" and (op, "torch", S, d, C) in t:
                ratios.setdefault((op, S, d, C), []).append(sec / t[(op, "torch", S, d, C)])
    return [dict(op=op, sessions=S, d=d, C=C, min=min(v), median=statistics.median(v), max=max(v))
            for (op, S, d, C), v in ratios.items()]


if __name__ == "__main__":
    main()

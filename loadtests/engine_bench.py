"""What a micro-batch costs the engine beyond the model: CPU per predict+adapt pair, and torch ops.

    python -m loadtests.engine_bench [--rows 2,4,8] [--pairs 960] [--json FILE]

In this process, one torch thread: the executor (server/engine/executor.py) over a real session
store (64 sgd sessions of 10 classes, the defaults otherwise) and the bundled backbone's head,
fed micro-batches as the engine's worker would: for each batch size R, R predicts of R sessions
in one batch, then their R adapts (labels, the images just predicted) in the next. The
backbone's features are computed once up front and looked up, so what is timed is everything
else a batch runs: the feature cache, the sessions transaction, the grouped head forward, the
update, the finiteness check, the log's rows, the commit, the history, the predictions and the
metrics. CPU is this thread's (time.thread_time), per pair, over blocks of pairs: the minimum
and the median of the blocks (the machine's noise only ever adds). The torch ops of one predict
batch and one adapt batch are counted with a dispatch mode (every aten call, views included).

Compare two checkouts by running this in each, one after the other; the op counts do not vary
with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SESSIONS = 64
CLASSES = [str(i) for i in range(10)]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _Precomputed:
    """The backbone's features, looked up by the pixels' sum (unique per image here)."""

    def __init__(self, table: dict[float, torch.Tensor]) -> None:
        self.table = table

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.table[float(row.sum())] for row in x])


def run(rows_list: list[int], pairs: int) -> list[dict]:
    from models import load_backbone
    from server.config import Settings
    from server.engine.batcher import Pending
    from server.engine.executor import Executor
    from server.engine.feature_cache import FeatureCache
    from server.engine.messages import AdaptJob, Input, PredictJob
    from server.engine.metrics import Metrics
    from server.sessions import SessionStore

    from loadtests.serving_bench import digits

    torch.set_num_threads(1)
    bb = load_backbone("fwserve-mnist-vit")
    out = []
    for R in rows_list:
        n_batches = max(8, pairs // R)
        xs, ys = digits(n_batches * R + 64 * R, seed=R)
        inputs = [Input(f"img:{R}:{k}", bb.preprocess(a)) for k, a in enumerate(xs)]
        table = {}
        with torch.inference_mode():
            for at in range(0, len(inputs), 64):
                chunk = inputs[at:at + 64]
                for inp, f in zip(chunk, bb.features(torch.stack([i.pixels for i in chunk]))):
                    table[float(inp.pixels.sum())] = f.clone()
        with tempfile.TemporaryDirectory() as tmp:
            s = Settings(snapshot_dir=Path(tmp))
            metrics = Metrics()
            store = SessionStore(s, bb.embed_dim, bb.head.weight, bb.head.bias, bb.class_names, "cpu", s.backbone,
                                 metrics)
            ex = Executor(_Precomputed(table), store, FeatureCache(4096, metrics), metrics, s)
            for i in range(SESSIONS):
                store.create("sgd", CLASSES, {}, session_id=f"s{i}")

            def batch(items):
                for i in items:
                    i.future.set_running_or_notify_cancel()
                ex.run(items)
                for i in items:
                    if i.future.exception() is not None:
                        raise i.future.exception()

            def pair_batches(b):
                ins = inputs[b * R:(b + 1) * R]
                sess = [f"s{(b * R + j) % SESSIONS}" for j in range(R)]
                return ([Pending(PredictJob([ins[j]], session=sess[j])) for j in range(R)],
                        [Pending(AdaptJob(sess[j], [ins[j]], [str(int(ys[b * R + j]))])) for j in range(R)])

            warm = 64
            for b in range(warm):
                for items in pair_batches(b):
                    batch(items)
            counts = []
            for items in pair_batches(warm):
                with _CountOps() as c:
                    batch(items)
                counts.append(sum(c.ops.values()))
            blocks, per_block = [], max(1, (n_batches - 1) // 8)
            b = warm + 1
            while b + per_block <= warm + n_batches:
                t0 = time.thread_time()
                for k in range(b, b + per_block):
                    for items in pair_batches(k):
                        batch(items)
                blocks.append((time.thread_time() - t0) * 1000 / (per_block * R))
                b += per_block
            store.close()
        out.append({"rows": R, "cpu_ms_per_pair_min": min(blocks), "cpu_ms_per_pair_median": statistics.median(blocks),
                    "blocks": len(blocks), "torch_ops_predict_batch": counts[0], "torch_ops_adapt_batch": counts[1]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="2,4,8", help="comma-separated requests per micro-batch")
    ap.add_argument("--pairs", type=int, default=960, help="timed pairs per batch size")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = run([int(r) for r in args.rows.split(",")], args.pairs)
    print("| requests per batch | engine CPU ms per pair (min of blocks) | median | torch ops, predict batch | "
          "torch ops, adapt batch |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['cpu_ms_per_pair_min']:.3f} | {r['cpu_ms_per_pair_median']:.3f} | "
              f"{r['torch_ops_predict_batch']} | {r['torch_ops_adapt_batch']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

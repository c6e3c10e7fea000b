"""What a guard and the in-memory history cost an adapt, side by side in one run, at the engine.

    python -m loadtests.bench_guard [--requests 300] [--instances 8]

Two engines in this process (the bundled backbone, --durability none, one torch thread): one
with the default history (--history-versions 64), one with none (--history-versions 1). They
hold one session per arm; adapts of --instances real MNIST digits (labelled for sgd, unlabelled
for tent), decoded once and keyed so the feature cache answers after the first pass, go to the
arms in turn (round robin: every arm meets the same machine). What is timed is
``Engine.adapt`` per request: the queue, the micro-batch (features from the cache, the head
forward, the guard's shadow forward over the reference heads, the update, the commit with the
guard's evidence, the history's records), without HTTP and JSON decoding (which cost ~8 ms per
request here and would hide the difference). Arms: no guard; a guard with the base head as
reference; a guard with a pinned version (a row of the reference pool); and, on the second
engine, no guard and no history. Ratios are to the unguarded arm of the same rule with history.
Clean streams: the guards never trip (a trip's judgement, a replay of the retained versions, is
rare and not what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


async def _run(requests: int, instances: int) -> list[dict]:
    from models import load_backbone
    from models.data import KNOWN_CLASSES, mnist_splits
    from models.preprocess import preprocess
    from server.config import Settings
    from server.engine import AdaptJob, Engine, Input

    bb = load_backbone("fwserve-mnist-vit")
    train, _ = mnist_splits()
    known = train.subset(KNOWN_CLASSES)
    idx = np.random.default_rng(0).permutation(len(known.labels))[:64]
    inputs = [Input(f"img:{i}", preprocess(known.images[i], bb.config)) for i in idx]
    labels = [str(known.labels[i]) for i in idx]
    tmp = tempfile.TemporaryDirectory()
    engines = {}
    for name, versions in (("history", 64), ("no history", 1)):
        e = Engine(Settings(snapshot_dir=Path(tmp.name) / name, torch_threads=1, max_wait_ms=0.0,
                            history_versions=versions), backbone=bb)
        e.start()
        assert e.wait_loaded(300), e.load_error
        engines[name] = e
    arms = {}
    for rule, hyper in (("sgd", {"lr": 0.01}), ("tent", {})):
        for arm, engine, guard in (("no guard", "history", None), ("guard, base reference", "history", "base"),
                                   ("guard, pinned reference", "history", 0), ("no guard, no history", "no history",
                                                                               None)):
            e = engines[engine]
            g = {"action": "rollback", "reference": guard} if guard is not None else None
            info, _ = await e.create_session(rule, None, hyper, "base", guard=g)
            arms[(rule, arm)] = (e, info.id)
    times = {k: [] for k in arms}
    try:
        for i in range(requests + 10):  # 10 rounds warm the feature cache and the code paths
            at = (i * instances) % (len(labels) - instances)
            for (rule, arm), (e, sid) in arms.items():
                ys = labels[at:at + instances] if rule == "sgd" else [None] * instances
                t0 = time.perf_counter()
                out = await e.adapt(AdaptJob(sid, inputs[at:at + instances], ys))
                dt = time.perf_counter() - t0
                if out.guard and out.guard.get("action") != "reset":
                    raise RuntimeError(f"{rule}/{arm}: the guard tripped on a clean stream: {out.guard}")
                if i >= 10:
                    times[(rule, arm)].append(dt)
    finally:
        for e in engines.values():
            e.stop()
        tmp.cleanup()
    rows = []
    for (rule, arm), ts in times.items():
        ts = sorted(ts)
        base = statistics.median(times[(rule, "no guard")])
        rows.append({"rule": rule, "arm": arm, "p50_ms": 1000 * statistics.median(ts),
                     "p99_ms": 1000 * ts[min(len(ts) - 1, int(0.99 * len(ts)))],
                     "ratio": statistics.median(ts) / base})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_guard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="adapts per arm")
    ap.add_argument("--instances", type=int, default=8, help="digits per adapt")
    args = ap.parse_args(argv)
    rows = asyncio.run(_run(args.requests, args.instances))
    print("| rule | arm | adapt p50 (ms) | adapt p99 (ms) | p50 / no guard |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rule']} | {r['arm']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a plan (eval/benchmarks.py) with a set of methods (eval/protocol.py): every method over
every stream, the offline baselines, episodes; returns the rows the report is built from.

rows["streams"]:  one per (stream, method): benchmark, shift, severity, order, seed, method,
                  prequential, final, ckpt {k: held-out accuracy once every class has k stream
                  rows}, n_stream, n_test
rows["baselines"]: one per (dataset at the top severity or without one, split seed <
                  baseline_seeds): reference (and its C), pixels_lr, pixels_ncm
rows["repeat_previous"]: one per non-i.i.d. stream: the repeat-previous-label accuracy
rows["episodes"]: one per (shots, method): accuracies of every episode
rows["curves"]:   mean running prequential accuracy per (benchmark, order, method)
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional

import numpy as np

from eval import baselines as B
from eval.benchmarks import (
    ALL_BENCHMARKS, BASE_BENCHMARKS, Plan, base_streams, data_streams, episodes, novel_streams,
)
from eval.protocol import base_methods, episode_methods, novel_methods
from eval.simulate import Base, Method, Stream, run_episodes, run_streams
from server.rules import RULES

CURVE_POINTS = 60


def _baseline(split: dict, pixels: bool) -> dict:
    s, t, f, y, img = split["stream"], split["test"], split["features"], split["labels"], split["images"]
    ref, ref_c = B.reference(f[s], y[s], f[t], y[t])
    row = {**split["key"], "seed": split["seed"], "reference": ref, "reference_C": ref_c}
    if pixels:
        row["pixels_lr"], row["pixels_lr_C"] = B.pixels_lr(img[s], y[s], img[t], y[t])
        row["pixels_ncm"] = B.pixels_ncm(img[s], y[s], img[t], y[t])
    return row


def _summary(stream: Stream, m: Method, res: dict) -> dict:
    return {**stream.key, "method": m.name, "prequential": round(float(res["correct"].mean()), 5),
            "final": round(res["final"], 5), "ckpt": {str(k): (None if v is None else round(v, 5))
                                                      for k, v in res["checkpoints"].items()},
            "n_stream": int(len(stream.order)), "n_test": int(len(stream.test))}


class Curves:
    """Running prequential accuracy, averaged per (benchmark, order, method) over streams of the
    top severity (or without severities) on a common grid of stream positions."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sums: dict[tuple, np.ndarray] = {}
        self.counts: dict[tuple, int] = defaultdict(int)
        self.lengths: dict[tuple, int] = {}

    def add(self, stream: Stream, m: Method, correct: np.ndarray) -> None:
        sev = stream.key.get("severity")
        if sev not in (None, self.plan.top_severity) or stream.key.get("shift") == "clean":
            return
        key = (stream.key["benchmark"], stream.key["order"], m.name)
        n = len(correct)
        if not n:
            return
        run = np.cumsum(correct) / np.arange(1, n + 1)
        grid = np.linspace(0, 1, CURVE_POINTS)
        vals = np.interp(grid * (n - 1), np.arange(n), run)
        self.sums[key] = self.sums.get(key, 0) + vals
        self.counts[key] += 1
        self.lengths[key] = max(self.lengths.get(key, 0), n)

    def rows(self) -> list[dict]:
        grid = np.linspace(0, 1, CURVE_POINTS)
        return [{"benchmark": k[0], "order": k[1], "method": k[2],
                 "x": [int(round(1 + g * (self.lengths[k] - 1))) for g in grid],
                 "y": [round(float(v), 4) for v in self.sums[k] / self.counts[k]]} for k in self.sums]


def evaluate(plan: Plan, bank, settings: dict, rules, methods: Optional[dict] = None,
             runner: Optional[Callable] = None, baseline_seeds: int = 3, pixels: bool = True,
             progress: bool = True) -> dict:
    """methods: {"base": [...], "novel": [...], "episodes": [...]} to override the protocol's;
    runner(method, streams, base, batch) -> per-stream results (default: the local simulation)."""
    runner = runner or (lambda m, streams, base, batch: run_streams(m, streams, base, batch))
    learned = getattr(bank, "learned", {}) or {}
    base = Base(bank.W0, bank.b0, bank.source_stats, learned)
    rules = [r for r in rules if not RULES[r].learned or r in learned]  # learned rules: when trained for it
    methods = methods or {}
    out: dict = {"split": plan.split, "streams": [], "baselines": [], "repeat_previous": [], "episodes": []}
    curves = Curves(plan)
    t0 = time.time()
    jobs: list[tuple[Method, list[Stream]]] = []
    splits: list[dict] = []
    if any(b in plan.benchmarks for b in BASE_BENCHMARKS):
        streams, base_splits = base_streams(plan, bank)
        splits += [s for s in base_splits if s["seed"] < baseline_seeds
                   and s["key"]["severity"] in (None, 0, plan.top_severity)]
        jobs += [(m, streams) for m in (methods["base"] if "base" in methods else base_methods(settings, rules))]
        out["repeat_previous"] += _repeats(streams, plan.batch)
    if plan.extra.get("data_dir"):
        streams, data_splits = data_streams(plan, bank)
        splits += [s for s in data_splits if s["seed"] < baseline_seeds]
        jobs += [(m, streams) for m in (methods["novel"] if "novel" in methods else novel_methods(settings, rules))]
        out["repeat_previous"] += _repeats(streams, plan.batch)
    if "novel" in plan.benchmarks:
        streams, novel_split = novel_streams(plan, bank)
        splits.append(novel_split)
        jobs += [(m, streams) for m in (methods["novel"] if "novel" in methods else novel_methods(settings, rules))]
        out["repeat_previous"] += _repeats(streams, plan.batch)
    with ProcessPoolExecutor(max_workers=max(1, plan.workers)) as pool:
        futs = [pool.submit(_baseline, s, pixels) for s in splits]
        for m, streams in _progress(jobs, progress, "methods"):
            for stream, res in zip(streams, runner(m, streams, base, plan.batch)):
                out["streams"].append(_summary(stream, m, res))
                curves.add(stream, m, res["correct"])
        if "episodes" in plan.benchmarks:
            out["episodes"] = _episodes(plan, bank, methods["episodes"] if "episodes" in methods
                                        else episode_methods(settings, rules), learned, base.source())
        out["baselines"] = [f.result() for f in _progress(futs, progress, "baselines")]
    out["curves"] = curves.rows()
    out["duration_s"] = time.time() - t0
    return out


def _repeats(streams: list[Stream], batch: int) -> list[dict]:
    return [{**s.key, "accuracy": B.repeat_previous(s.labels[s.order], batch)} for s in streams
            if s.key["order"] != "iid"]


def _episodes(plan: Plan, bank, ms: list[Method], learned: Optional[dict] = None,
              source: Optional[dict] = None) -> list[dict]:
    from eval.benchmarks import novel_data

    feats, labels, _, _, test_rows, _ = novel_data(plan, bank)
    rows = []
    for shots in plan.shots:
        eps = episodes(plan, labels, test_rows, shots, seed=0)
        for m in ms:
            accs = run_episodes(m, eps, feats, feats.shape[1], learned, source)
            rows.append({"ways": plan.ways, "shots": shots, "method": m.name, "accuracies": [round(a, 4) for a in accs]})
    return rows


def _progress(items, on: bool, desc: str):
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="job", dynamic_ncols=True)


__all__ = ["evaluate", "ALL_BENCHMARKS"]

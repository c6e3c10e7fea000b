"""The benchmarks of the report, built on one split: "selection" (every choice is made on it,
`python -m eval.validate`) or "test" (the held-out split, scored only by `fwserve eval`).

Base-class benchmarks (the backbone's classes 0-4; sessions may start from its base head):
- shift:  the known digits of the split under the 15 ImageNet-C corruptions x severities;
- shifts: the same digits under the realistic shifts of eval/data.py (rotation, inversion,
          thicker / thinner strokes, MNIST-M-style photo blends);
- domain: scikit-learn's 8x8 digits 0-4 (the split's half), upsampled.
Each dataset is split per seed, per class, 60/40 into a stream and a test part (a new split for
every seed); stream orders: i.i.d., Dirichlet label shift, class-correlated runs.
New-class benchmarks (digits 5-9, never seen by the backbone): streams of the training split's
5-9 (i.i.d. and class-incremental orders), scored on the split's 5-9; N-way k-shot episodes
drawn from the split's 5-9.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from eval import data as D
from eval.simulate import Stream

KNOWN, NOVEL = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
STREAM_FRACTION = 0.6
BASE_BENCHMARKS = ("shift", "shifts", "domain")
ALL_BENCHMARKS = BASE_BENCHMARKS + ("novel", "episodes")


@dataclass
class Plan:
    split: str = "test"
    benchmarks: tuple[str, ...] = ALL_BENCHMARKS
    corruptions: tuple[str, ...] = D.CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    shifts: tuple[str, ...] = D.SHIFTS
    seeds: int = 10
    low_severity_seeds: int = 3  # stream seeds at severities below the highest
    base_orders: tuple[str, ...] = ("iid", "dirichlet", "correlated")
    novel_orders: tuple[str, ...] = ("iid", "incremental")
    episodes: int = 100
    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    batch: int = 10
    subset: Optional[int] = None  # at most this many examples per class in every dataset (CI)
    corruption_seed: int = 0
    cache_dir: Optional[Path] = None
    workers: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def mnist_split(self) -> str:
        return "selection" if self.split == "selection" else "held_out"

    @property
    def top_severity(self) -> int:
        return max(self.severities)


def _cap(data: D.Dataset, plan: Plan) -> D.Dataset:
    return data if plan.subset is None else D.per_class(data, plan.subset, 0)


def split_rows(labels: np.ndarray, seed: int, fraction: float = STREAM_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation: the first `fraction` to the stream, the rest to test."""
    rng = np.random.default_rng(seed)
    stream, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        stream.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(stream)), np.sort(np.concatenate(test))


def base_datasets(plan: Plan) -> list[tuple[dict, D.Dataset]]:
    """(key, dataset) of every base-class benchmark of the plan."""
    out = []
    known = _cap(D.mnist(plan.mnist_split, KNOWN), plan)
    if "shift" in plan.benchmarks:
        jobs = [(c, s) for c in plan.corruptions for s in plan.severities]
        for (c, s), data in zip(jobs, _corrupt_all(known, jobs, plan)):
            out.append(({"benchmark": "shift", "shift": c, "severity": s}, data))
        out.append(({"benchmark": "shift", "shift": "clean", "severity": 0}, known))
    if "shifts" in plan.benchmarks:
        for name in plan.shifts:
            out.append(({"benchmark": "shifts", "shift": name, "severity": None}, D.shifted(known, name)))
    if "domain" in plan.benchmarks:
        part = "selection" if plan.split == "selection" else "test"
        out.append(({"benchmark": "domain", "shift": "sklearn_digits", "severity": None},
                    _cap(D.sklearn_digits(KNOWN, part=part), plan)))
    return out


def _corrupt_all(known: D.Dataset, jobs, plan: Plan) -> list[D.Dataset]:
    if plan.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=plan.workers) as pool:
            futs = [pool.submit(D.corrupted, known, c, s, plan.corruption_seed, plan.cache_dir) for c, s in jobs]
            return [f.result() for f in futs]
    return [D.corrupted(known, c, s, plan.corruption_seed, plan.cache_dir) for c, s in jobs]


def seeds_for(key: dict, plan: Plan) -> int:
    if key["benchmark"] == "shift" and key["severity"] not in (plan.top_severity, 0):
        return min(plan.seeds, plan.low_severity_seeds)
    return plan.seeds


def orders_for(key: dict, plan: Plan) -> tuple[str, ...]:
    """Non-i.i.d. orders at the highest severity (and on the other base benchmarks) only."""
    if key["benchmark"] == "shift" and key["severity"] not in (plan.top_severity, 0):
        return ("iid",)
    return plan.base_orders


def base_streams(plan: Plan, bank) -> tuple[list[Stream], list[dict]]:
    """Every base-class stream of the plan, and one split record per (dataset, seed) for the
    offline baselines: {"key", "seed", "features", "labels", "images", "stream", "test"}."""
    streams, splits = [], []
    for key, data in base_datasets(plan):
        feats = bank(data.images)
        for seed in range(seeds_for(key, plan)):
            stream_rows, test_rows = split_rows(data.labels, seed)
            splits.append({"key": key, "seed": seed, "features": feats, "labels": data.labels, "images": data.images,
                           "stream": stream_rows, "test": test_rows, "classes": data.classes})
            for order in orders_for(key, plan):
                o = D.stream_order(data.labels[stream_rows], order, seed)
                streams.append(Stream({**key, "order": order, "seed": seed}, feats, data.labels, stream_rows[o],
                                      test_rows, data.classes, data.images))
    return streams, splits


def novel_data(plan: Plan, bank):
    """(features, labels, images, stream rows, test rows, classes): the training split's 5-9
    followed by the plan's split of 5-9."""
    train = _cap(D.mnist("train", NOVEL), plan)
    test = _cap(D.mnist(plan.mnist_split, NOVEL), plan)
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.labels, test.labels])
    rows = np.arange(len(labels))
    return bank(images), labels, images, rows[:len(train)], rows[len(train):], train.classes


def novel_streams(plan: Plan, bank) -> tuple[list[Stream], dict]:
    feats, labels, images, stream_rows, test_rows, classes = novel_data(plan, bank)
    streams = []
    for order in plan.novel_orders:
        for seed in range(plan.seeds):
            o = D.stream_order(labels[stream_rows], order, seed)
            streams.append(Stream({"benchmark": "novel", "shift": "digits_5_9", "severity": None, "order": order,
                                   "seed": seed}, feats, labels, stream_rows[o], test_rows, classes, images))
    split = {"key": {"benchmark": "novel", "shift": "digits_5_9", "severity": None}, "seed": 0, "features": feats,
             "labels": labels, "images": images, "stream": stream_rows, "test": test_rows, "classes": classes}
    return streams, split


def episodes(plan: Plan, labels: np.ndarray, rows: np.ndarray, shots: int, seed: int) -> list[dict]:
    """N-way k-shot episodes from `rows`: classes drawn per episode; support rows shuffled (not
    class by class); labels 0..ways-1 in the drawn order."""
    rng = np.random.default_rng([seed, shots])
    out = []
    classes = np.unique(labels[rows])
    for _ in range(plan.episodes):
        chosen = rng.choice(classes, size=min(plan.ways, len(classes)), replace=False)
        support, sy, query, qy = [], [], [], []
        for i, c in enumerate(chosen):
            idx = rng.permutation(rows[labels[rows] == c])
            support += idx[:shots].tolist()
            sy += [i] * shots
            q = idx[shots:shots + plan.queries]
            query += q.tolist()
            qy += [i] * len(q)
        perm = rng.permutation(len(support))
        out.append({"support": np.array(support)[perm], "support_y": np.array(sy)[perm],
                    "query": np.array(query), "query_y": np.array(qy)})
    return out


def data_streams(plan: Plan, bank) -> tuple[list[Stream], list[dict]]:
    """A user's ImageFolder (plan.extra["data_dir"]) as a new-class benchmark: per seed a 60/40
    split, i.i.d. and class-incremental orders (optionally under one corruption)."""
    data = _cap(D.image_folder(Path(plan.extra["data_dir"])), plan)
    corruption = plan.extra.get("data_corruption")
    if corruption:
        data = D.corrupted(data, corruption, plan.top_severity, plan.corruption_seed, plan.cache_dir)
    feats = bank(data.images)
    key = {"benchmark": "data", "shift": corruption or "none", "severity": plan.top_severity if corruption else None}
    streams, splits = [], []
    for seed in range(plan.seeds):
        stream_rows, test_rows = split_rows(data.labels, seed)
        splits.append({"key": key, "seed": seed, "features": feats, "labels": data.labels, "images": data.images,
                       "stream": stream_rows, "test": test_rows, "classes": data.classes})
        for order in plan.novel_orders:
            o = D.stream_order(data.labels[stream_rows], order, seed)
            streams.append(Stream({**key, "order": order, "seed": seed}, feats, data.labels, stream_rows[o], test_rows,
                                  data.classes, data.images))
    return streams, splits

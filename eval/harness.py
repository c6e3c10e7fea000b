"""``fwserve eval``: stream the benchmarks through a server and collect the results.

Benchmarks (each a list of tasks run by a thread pool, one progress bar for all):
- shift:  held-out known digits under corruptions x severities; stream / test split per class;
- novel:  N-way k-shot episodes and online streams (i.i.d. and class-incremental) on digits 5-9;
- domain: scikit-learn's 8x8 digits 0-4, upsampled;
- data:   a user's ImageFolder (--data), like novel streams.
Every stream runs in every order of --orders; static and every rule see the same streams.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from eval import data as D
from eval.runner import (
    Encoded, LocalFeatures, Method, latency_between, linear_probe, methods, run_episode, run_stream,
    update_latency,
)

KNOWN, NOVEL = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
CURVE_POINTS = 60


@dataclass
class Config:
    url: str
    out: Path
    benchmarks: tuple[str, ...] = ("shift", "novel", "domain")
    corruptions: tuple[str, ...] = D.CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    correlated_severities: Optional[tuple[int, ...]] = None  # shift: correlated streams; default the highest
    orders: tuple[str, ...] = ("iid", "correlated")
    rules: tuple[str, ...] = ("sgd", "delta", "prototype", "rls", "t3a", "tent")
    subset: Optional[int] = None  # at most this many examples per class in every dataset (CI)
    episodes: int = 100
    queries: int = 15
    stream_seeds: int = 3
    shots: int = 5  # static of novel / user data: prototypes frozen after this many per class
    checkpoint: int = 20  # "after 20 labelled examples per class"
    batch: int = 10
    run_length: int = 50  # correlated streams: runs of up to this many examples of one class
    workers: int = 4
    seed: int = 0
    data_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None
    backbone: str = "fwserve-mnist-vit"
    weights: Optional[Path] = None
    random_init: bool = False
    probe: bool = True
    command: str = ""
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _cap(data: D.Dataset, cfg: Config) -> D.Dataset:
    return data if cfg.subset is None else D.per_class(data, cfg.subset, cfg.seed)


def curve(correct: np.ndarray) -> list[list[float]]:
    """Running prequential accuracy at up to CURVE_POINTS positions: [[examples seen, acc]]."""
    n = len(correct)
    if n == 0:
        return []
    cum = np.cumsum(correct)
    at = np.unique(np.linspace(1, n, min(CURVE_POINTS, n)).astype(int))
    return [[int(i), float(cum[i - 1] / i)] for i in at]


def window_accuracy(correct: np.ndarray, labels: np.ndarray, k: int, width: int) -> Optional[float]:
    """Prequential accuracy on the `width` examples right after every class has k examples."""
    counts: dict[int, int] = {}
    classes = set(labels.tolist())
    for i, y in enumerate(labels.tolist()):
        counts[y] = counts.get(y, 0) + 1
        if len(counts) == len(classes) and min(counts.values()) >= k:
            w = correct[i + 1:i + 1 + width]
            return float(w.mean()) if len(w) else None
    return None


class Harness:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tasks: list[tuple[str, Callable[[], None]]] = []
        self.results: dict = {"shift": [], "shift_probe": [], "novel_episodes": [], "novel_streams": [],
                              "novel_probe": None, "domain": [], "domain_probe": None, "data": [], "data_probe": None}
        self._features = None

    # ---- helpers -----------------------------------------------------------------------------

    def features(self) -> Optional[LocalFeatures]:
        if not self.cfg.probe:
            return None
        if self._features is None:
            self._features = LocalFeatures(self.cfg.backbone, self.cfg.weights, self.cfg.random_init)
        return self._features

    def probe(self, stream: D.Dataset, test: D.Dataset) -> Optional[float]:
        f = self.features()
        if f is None:
            return None
        return linear_probe(f(stream.images), stream.labels, f(test.images), test.labels)

    def add_streams(self, bench: str, key: dict, stream: D.Dataset, test: D.Dataset, base_head: bool,
                    orders, seeds: int = 1, checkpoint: bool = False) -> None:
        cfg = self.cfg
        es, et = Encoded(stream), Encoded(test)
        for order_name in orders:
            for s in range(seeds):
                order = D.stream_order(stream.labels, order_name, cfg.seed + s, cfg.run_length)
                for m in methods(cfg.rules, base_head):
                    self.tasks.append((bench, self._stream_task(bench, key, m, es, et, order, order_name, s, checkpoint)))

    def _stream_task(self, bench, key, method: Method, es, et, order, order_name, seed, checkpoint):
        cfg = self.cfg

        def task():
            res = run_stream(cfg.url, method, es, order, et, cfg.batch, shots=cfg.shots,
                             checkpoint=cfg.checkpoint if checkpoint else None)
            correct, labels = res["correct"], es.labels[order]
            row = {**key, "order": order_name, "seed": seed, "method": method.name,
                   "labelled": method.labelled and not method.static, "init": method.init,
                   "prequential": float(correct.mean()), "final": res["final"], "n_stream": int(len(order)),
                   "n_test": int(len(et)), "curve": curve(correct)}
            if checkpoint:
                n_classes = len(np.unique(labels))
                row["after_k_prequential"] = window_accuracy(correct, labels, cfg.checkpoint, cfg.checkpoint * n_classes)
                row["after_k_held_out"] = res["checkpoint"]
            self.results[bench].append(row)

        return task

    # ---- benchmarks --------------------------------------------------------------------------

    def plan_shift(self, corrupted: dict) -> None:
        cfg = self.cfg
        for (name, sev), data in corrupted.items():
            stream, test = D.stratified_split(data, 0.6, cfg.seed)
            correlated = cfg.correlated_severities or (max(cfg.severities),)
            orders = [o for o in cfg.orders if o == "iid" or sev in correlated]
            self.add_streams("shift", {"corruption": name, "severity": sev}, stream, test, True, orders)
            if cfg.probe and sev == max(cfg.severities):
                self.tasks.append(("shift", self._probe_task("shift_probe", {"corruption": name, "severity": sev},
                                                             stream, test)))

    def _probe_task(self, where, key, stream, test):
        def task():
            acc = self.probe(stream, test)
            if where.endswith("_probe") and key:
                self.results[where].append({**key, "probe": acc})
            else:
                self.results[where] = acc
        return task

    def plan_novel(self) -> None:
        cfg = self.cfg
        train, held = _cap(D.mnist("train", NOVEL), cfg), _cap(D.mnist("held_out", NOVEL), cfg)
        # Episodes on the held-out novel digits.
        eh = Encoded(held)
        ways = len(NOVEL)
        for shots in (1, 5):
            for m in methods(cfg.rules, False):
                self.tasks.append(("novel", self._episode_task(m, eh, ways, shots)))
        # Streams: the novel training split (never seen by the backbone) is the stream, the
        # held-out split the test set.
        orders = [("incremental" if o == "correlated" else o) for o in cfg.orders]
        self.add_streams("novel_streams", {}, train, held, False, orders, seeds=cfg.stream_seeds, checkpoint=True)
        if cfg.probe:
            self.tasks.append(("novel", self._probe_task("novel_probe", None, train, held)))

    def _episode_task(self, method, eh, ways, shots):
        cfg = self.cfg

        def task():
            accs = [run_episode(cfg.url, method, eh, ways, shots, cfg.queries, cfg.seed * 100003 + e)
                    for e in range(cfg.episodes)]
            a = np.array(accs)
            self.results["novel_episodes"].append({
                "ways": ways, "shots": shots, "method": method.name, "episodes": len(a), "accuracy": float(a.mean()),
                "ci95": float(1.96 * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None})

        return task

    def plan_domain(self) -> None:
        cfg = self.cfg
        digits = _cap(D.sklearn_digits(KNOWN), cfg)
        stream, test = D.stratified_split(digits, 0.6, cfg.seed)
        self.add_streams("domain", {}, stream, test, True, cfg.orders, seeds=cfg.stream_seeds)
        if cfg.probe:
            self.tasks.append(("domain", self._probe_task("domain_probe", None, stream, test)))

    def plan_data(self, corruption: Optional[str], severity: int) -> None:
        cfg = self.cfg
        data = _cap(D.image_folder(cfg.data_dir), cfg)
        if corruption:
            data = D.corrupted(data, corruption, severity, cfg.seed, cfg.cache_dir)
        stream, test = D.stratified_split(data, 0.6, cfg.seed)
        orders = [("incremental" if o == "correlated" else o) for o in cfg.orders]
        self.add_streams("data", {"classes": data.classes, "corruption": corruption}, stream, test, False, orders,
                         seeds=cfg.stream_seeds, checkpoint=True)
        if cfg.probe:
            self.tasks.append(("data", self._probe_task("data_probe", None, stream, test)))

    # ---- running -----------------------------------------------------------------------------

    def corrupt_all(self) -> dict:
        """(corruption, severity) -> corrupted held-out known digits, in a process pool."""
        cfg = self.cfg
        base = _cap(D.mnist("held_out", KNOWN), cfg)
        jobs = [(n, s) for n in cfg.corruptions for s in cfg.severities]
        out = {}
        if cfg.workers > 1 and len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                futs = {pool.submit(D.corrupted, base, n, s, cfg.seed, cfg.cache_dir): (n, s) for n, s in jobs}
                for f in self._progress(as_completed(futs), len(futs), "corrupting"):
                    out[futs[f]] = f.result()
        else:
            for n, s in self._progress(jobs, len(jobs), "corrupting"):
                out[(n, s)] = D.corrupted(base, n, s, cfg.seed, cfg.cache_dir)
        return {k: out[k] for k in jobs}

    def _progress(self, it, total, desc):
        if not self.cfg.progress:
            return it
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, unit="task", dynamic_ncols=True)

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        if "shift" in cfg.benchmarks:
            self.plan_shift(self.corrupt_all())
        if "novel" in cfg.benchmarks:
            self.plan_novel()
        if "domain" in cfg.benchmarks:
            self.plan_domain()
        if cfg.data_dir is not None:
            corruption = cfg.extra.get("data_corruption")
            self.plan_data(corruption, max(cfg.severities))
        before = update_latency(cfg.url)
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            futs = [pool.submit(task) for _, task in self.tasks]
            for f in self._progress(as_completed(futs), len(futs), "streaming"):
                f.result()
        self.results["latency"] = latency_between(before, update_latency(cfg.url))
        self.results["duration_s"] = time.time() - t0
        return self.results

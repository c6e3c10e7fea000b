"""The same streams through a fwserve server over HTTP (`fwserve eval --url`, `--served`).

A drop-in for eval.simulate.run_streams: one session per stream (created with the method's
rule, settings and init), requests of `batch` instances (base64 PNG: exact), labels only for
labelled methods, the budgeted rows of a static-after-k method only, and the held-out test part
predicted without adapting at every checkpoint and at the end. Streams run `workers` at a time.
With one worker and the local simulation run stream by stream, the predictions agree
(tests/eval checks it): the server computes the same features and calls the same rule code.
"""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image

from eval.simulate import CHECKPOINTS, Method, Stream

PREDICT_CHUNK = 128
_local = threading.local()


def _client(url: str):
    from server.client import Client

    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if url not in cache:
        cache[url] = Client(url, timeout=300.0, retries=20)
    return cache[url]


def encode(images: np.ndarray) -> list[dict]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode()})
    return out


class _Encoded:
    """PNG instances of a dataset's images, encoded once per dataset."""

    cache: dict[int, list[dict]] = {}
    lock = threading.Lock()

    @classmethod
    def of(cls, images: np.ndarray) -> list[dict]:
        with cls.lock:
            if id(images) not in cls.cache:
                cls.cache[id(images)] = encode(images)
            return cls.cache[id(images)]


def _predict(c, instances, idx, sid: Optional[str]) -> np.ndarray:
    out = []
    for i in range(0, len(idx), PREDICT_CHUNK):
        r = c.predict([instances[j] for j in idx[i:i + PREDICT_CHUNK]], session_id=sid)
        out += [p.index for p in r.predictions]
    return np.array(out, dtype=np.int64)


def run_one(url: str, m: Method, s: Stream, batch: int, checkpoints=CHECKPOINTS) -> dict:
    c = _client(url)
    inst = _Encoded.of(s.images)
    n = len(s.classes)
    sid = None
    if m.rule is not None:
        sid = c.create_session(m.rule, classes=s.classes, hyperparameters=m.hyper_dict, init=m.init).id
    correct = np.zeros(len(s.order), dtype=bool)
    seen, learned = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ckpt = {k: None for k in checkpoints}
    collected: list[int] = []
    fitted = False
    test_acc = lambda: float(np.mean(_predict(c, inst, s.test, sid) == s.labels[s.test]))  # noqa: E731
    try:
        for t in range(0, len(s.order), batch):
            idx = s.order[t:t + batch]
            y = s.labels[idx]
            learn = np.ones(len(idx), dtype=bool)
            if m.budget is not None:
                for i, lab in enumerate(y):
                    learn[i] = learned[lab] < m.budget
                    learned[lab] += learn[i]
            if sid is None or m.budget is not None:  # predict, then (maybe) learn the budgeted rows
                pred = _predict(c, inst, idx, sid)
                if sid is not None and m.fit_epochs:
                    collected += [int(j) for j, k in zip(idx, learn) if k]
                    if not fitted and learned.min() >= m.budget:
                        for _ in range(m.fit_epochs):
                            c.adapt(sid, [inst[j] for j in collected], labels=[int(s.labels[j]) for j in collected])
                        fitted = True
                elif sid is not None and learn.any():
                    keep = [j for j, k in zip(idx, learn) if k]
                    c.adapt(sid, [inst[j] for j in keep], labels=[int(s.labels[j]) for j in keep])
            else:
                r = c.adapt(sid, [inst[j] for j in idx], labels=[int(v) for v in y] if m.labelled else None)
                pred = np.array([p.index for p in r.predictions])
            correct[t:t + len(idx)] = pred == y
            before = seen.min()
            np.add.at(seen, y, 1)
            for k in checkpoints:
                if before < k <= seen.min():
                    ckpt[k] = test_acc()
        final = test_acc()
    finally:
        if sid is not None:
            c.delete_session(sid)
    return {"correct": correct, "final": final, "checkpoints": ckpt, "resets": None}


def http_runner(url: str, workers: int = 1):
    """A runner for eval.evaluate: every stream of a method through the server at `url`."""

    def run(m: Method, streams: list[Stream], base, batch: int) -> list[dict]:
        if workers <= 1:
            return [run_one(url, m, s, batch) for s in streams]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda s: run_one(url, m, s, batch), streams))

    return run

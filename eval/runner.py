"""The evaluation protocol, run against a fwserve server over HTTP (``server.client.Client``).

A *method* is a rule with its settings, or a static baseline:
- ``static``: the base head (init "base": shift, domain), or prototypes frozen after the first
  k labelled shots of each class (init "zeros": novel classes, user data);
- a rule: one fresh session per stream. Supervised rules adapt on labelled requests; label-free
  rules (t3a, tent) on the same requests without labels (they never see a label).

A stream is sent in requests of ``batch`` instances. Prequential accuracy = test-then-train:
each instance's prediction comes back from the request that then adapts on it. After the stream
the session predicts a held-out test set without adapting (final accuracy).
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from server.client import Client
from server.rules import RULES as REGISTRY
from eval.data import Dataset

PREDICT_CHUNK = 128


@dataclass(frozen=True)
class Method:
    name: str
    rule: Optional[str]  # None: static
    labelled: bool = True
    init: str = "zeros"
    hyper: dict = field(default_factory=dict)
    steps: int = 1  # episodic heads: passes over the support set

    @property
    def static(self) -> bool:
        return self.rule is None


# Settings of every rule in the report, chosen on the training split with
# `python -m eval.validate` (docs/eval/validation.md), never on the held-out digits.
RULES = tuple(REGISTRY)
LABEL_FREE = tuple(name for name, rule in REGISTRY.items() if not rule.needs_labels)
SETTINGS = {
    "sgd": dict(hyper={"lr": 0.01}, steps=20),
    "delta": dict(hyper={"beta": 0.1}),
    "prototype": dict(hyper={"temperature": 10.0}),
    "rls": dict(hyper={"lambda": 1.0}),
    "t3a": dict(hyper={"max_entropy": 1.0, "supports_per_class": 20}),
    "tent": dict(hyper={"lr": 0.001, "min_confidence": 0.9}, steps=20),
}


def methods(rules, base_head: bool) -> list[Method]:
    """Methods for a benchmark. base_head: the classes are the backbone's base classes, so rules
    that can start from the base head do (sgd, rls: no, ridge from zero; t3a, tent: yes) and
    label-free rules run without labels. Otherwise every rule learns the classes from labels."""
    out = [Method("static", None, init="base" if base_head else "zeros")]
    for r in rules:
        s = SETTINGS.get(r, {"hyper": {}})
        label_free = r in LABEL_FREE and base_head
        init = "base" if base_head and r in ("sgd", "t3a", "tent") else "zeros"
        out.append(Method(r, r, labelled=not label_free, init=init, hyper=dict(s["hyper"]), steps=s.get("steps", 1)))
    return out


def encode(images: np.ndarray) -> list[dict]:
    """uint8 [N, H, W] -> the API's instances (base64 PNG: small and exact)."""
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode()})
    return out


class Encoded:
    """A dataset with its instances encoded once (shared by every method and thread)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.instances = encode(data.images)
        self.labels = data.labels

    def __len__(self) -> int:
        return len(self.labels)


_local = threading.local()


def client(url: str) -> Client:
    """One client per thread and server."""
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if url not in cache:
        cache[url] = Client(url, timeout=300.0, retries=20)
    return cache[url]


def predict_all(c: Client, data: Encoded, idx: np.ndarray, session_id: Optional[str]) -> np.ndarray:
    """Predicted class indices for data[idx] (no adaptation)."""
    out = []
    for i in range(0, len(idx), PREDICT_CHUNK):
        chunk = idx[i:i + PREDICT_CHUNK]
        r = c.predict([data.instances[j] for j in chunk], session_id=session_id)
        out += [p.index for p in r.predictions]
    return np.array(out, dtype=np.int64)


def run_stream(url: str, method: Method, stream: Encoded, order: np.ndarray, test: Encoded, batch: int,
               shots: int = 5, checkpoint: Optional[int] = None) -> dict:
    """One method over one ordered stream. Returns per-example prequential correctness, final
    test accuracy and, with checkpoint=n, the test accuracy once every class has n labelled
    examples (rules) or shots (static)."""
    c = client(url)
    classes = stream.data.classes
    correct = np.zeros(len(order), dtype=bool)
    seen = np.zeros(len(classes), dtype=np.int64)
    at_checkpoint = None
    sid = None
    if not (method.static and method.init == "base"):  # else the base head answers
        rule = "prototype" if method.static else method.rule
        hyper = dict(SETTINGS["prototype"]["hyper"]) if method.static else dict(method.hyper)
        sid = c.create_session(rule, classes=classes, hyperparameters=hyper, init=method.init).id
    try:
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            y = stream.labels[idx]
            if sid is None:  # base head
                pred = predict_all(c, stream, idx, None)
            elif method.static:  # frozen prototypes: predict, then learn only a class's first shots
                pred = predict_all(c, stream, idx, sid)
                learn = [k for k, lab in enumerate(y) if seen[lab] + sum(y[:k] == lab) < shots]
                if learn:
                    c.adapt(sid, [stream.instances[idx[k]] for k in learn], labels=[int(y[k]) for k in learn])
            else:
                labels = [int(v) for v in y] if method.labelled else None
                r = c.adapt(sid, [stream.instances[j] for j in idx], labels=labels)
                pred = np.array([p.index for p in r.predictions])
            correct[i:i + len(idx)] = pred == y
            np.add.at(seen, y, 1)
            if checkpoint and at_checkpoint is None and seen.min() >= checkpoint:
                at_checkpoint = float(np.mean(predict_all(c, test, np.arange(len(test)), sid) == test.labels))
        final = float(np.mean(predict_all(c, test, np.arange(len(test)), sid) == test.labels))
    finally:
        if sid is not None:
            c.delete_session(sid)
    return {"correct": correct, "final": final, "checkpoint": at_checkpoint}


def run_episode(url: str, method: Method, data: Encoded, ways: int, shots: int, queries: int, seed: int) -> float:
    """An N-way k-shot episode through an episodic head (support adapted, queries answered,
    head discarded). Static = prototypes of the shots."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(np.unique(data.labels), size=ways, replace=False)
    support, query, ys, yq = [], [], [], []
    for i, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(data.labels == c))
        support += list(idx[:shots])
        query += list(idx[shots:shots + queries])
        ys += [i] * shots
        yq += [i] * min(queries, len(idx) - shots)
    rule = "prototype" if method.static else method.rule
    hyper = SETTINGS["prototype"]["hyper"] if method.static else method.hyper
    names = [data.data.classes[c] for c in classes]
    r = client(url).predict_episodic([data.instances[j] for j in query], [data.instances[j] for j in support],
                                     labels=ys, rule=rule, hyperparameters=hyper, classes=names,
                                     steps=1 if method.static else method.steps)
    return float(np.mean(np.array([p.index for p in r.predictions]) == np.array(yq)))


def update_latency(url: str) -> dict[str, dict]:
    """Per rule: count and sum of fwserve_head_update_seconds, plus its histogram buckets."""
    text = client(url).metrics()
    out: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.startswith("fwserve_head_update_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        rule = name.split('rule="', 1)[1].split('"', 1)[0]
        entry = out.setdefault(rule, {"count": 0.0, "sum": 0.0, "buckets": {}})
        if name.startswith("fwserve_head_update_seconds_count"):
            entry["count"] = float(value)
        elif name.startswith("fwserve_head_update_seconds_sum"):
            entry["sum"] = float(value)
        elif name.startswith("fwserve_head_update_seconds_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            entry["buckets"][le] = float(value)
    return out


def latency_between(before: dict, after: dict) -> dict[str, dict]:
    """Mean and bucketed p50 / p99 of the head updates made between two scrapes."""
    out = {}
    for rule, a in after.items():
        b = before.get(rule, {"count": 0.0, "sum": 0.0, "buckets": {}})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        buckets = sorted(((float(le), a["buckets"][le] - b["buckets"].get(le, 0.0)) for le in a["buckets"]))

        def quantile(q):
            for le, cum in buckets:
                if cum >= q * n:
                    return le
            return float("inf")

        out[rule] = {"updates": int(n), "mean_s": (a["sum"] - b["sum"]) / n, "p50_le_s": quantile(0.5),
                     "p99_le_s": quantile(0.99)}
    return out


def linear_probe(features_train: np.ndarray, y_train: np.ndarray, features_test: np.ndarray,
                 y_test: np.ndarray) -> float:
    """Offline ceiling: multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(features_train, y_train)
    return float(model.score(features_test, y_test))


class LocalFeatures:
    """The backbone's features computed in the evaluating process (for the linear probe only)."""

    def __init__(self, backbone_name: str, weights=None, random_init: bool = False) -> None:
        from models import load_backbone

        self.bb = load_backbone(backbone_name, weights=weights, random_init=random_init)
        self.lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with self.lock:
            for i in range(0, len(images), 256):
                x = torch.stack([self.bb.preprocess(img) for img in images[i:i + 256]])
                out.append(self.bb.features(x).float().cpu().numpy())
        return np.concatenate(out)

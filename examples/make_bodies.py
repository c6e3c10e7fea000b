"""Writes the request bodies the README's curl commands send (examples/*.json), from the MNIST
held-out split (models.data). Deterministic: tests/test_examples.py checks the committed files
are what this writes.

    python examples/make_bodies.py
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.data import NOVEL_CLASSES, mnist_splits

HERE = Path(__file__).resolve().parent
SESSION = "demo"


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def bodies() -> dict[str, dict]:
    _, held = mnist_splits()
    novel = held.subset(NOVEL_CLASSES)
    first = {c: np.flatnonzero(novel.labels == c) for c in NOVEL_CLASSES}
    shots = [(novel.images[first[c][k]], str(c)) for c in NOVEL_CLASSES for k in range(2)]
    seven = novel.images[first[7][5]]
    return {
        # two labelled examples per digit, as pixel arrays
        "adapt-demo.json": {"session_id": SESSION, "instances": [{"array": img.astype(int).tolist(), "label": lab}
                                                                 for img, lab in shots]},
        # an unseen 7, as a base64 PNG
        "predict-demo.json": {"session_id": SESSION, "instances": [{"image": _png_b64(seven)}], "top_k": 3},
        # the same 7 over the Open Inference Protocol (JSON tensor, UINT8 pixels)
        "infer-demo.json": {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                                        "data": seven.astype(int).reshape(-1).tolist()}],
                            "parameters": {"session_id": SESSION}},
    }


def render(body: dict) -> str:
    return json.dumps(body, separators=(",", ":")) + "\n"


def main() -> int:
    for name, body in bodies().items():
        (HERE / name).write_text(render(body))
        print(f"wrote examples/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

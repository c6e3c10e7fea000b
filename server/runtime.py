"""The server's moving parts wired together: backbone, store, feature cache, batcher, decode
pool, metrics. app.py holds one ``Runtime`` per app and only calls its async methods.

Loading (backbone, slot tensors, warm-up) runs in a background thread so ``/v2/health/live``
answers at once and ``/v2/health/ready`` turns 200 when everything is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import anyio
import torch

from server import errors
from server.batcher import Batcher, Episodic, Job, Row
from server.config import Settings
from server.feature_cache import FeatureCache
from server.inputs import check_array, decode_one, decode_rows
from server.metrics import Metrics
from server.rules import get_rule
from server.store import SessionStore

log = logging.getLogger("fwserve")


class Runtime:
    def __init__(self, settings: Settings, backbone=None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.backbone = backbone
        self.store: Optional[SessionStore] = None
        self.batcher: Optional[Batcher] = None
        self.cache = FeatureCache(settings.feature_cache_size, self.metrics)
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="fwserve-decode")
        self.ready = False
        self.load_error: Optional[str] = None
        self._loader: Optional[threading.Thread] = None
        self._checkpointer: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.settings.backbone

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="fwserve-load", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _load(self) -> None:
        s = self.settings
        try:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            if self.backbone is None:
                from models import load_backbone

                log.info("loading backbone %s on %s", s.backbone, s.resolved_device())
                self.backbone = load_backbone(s.backbone, weights=s.weights, device=s.resolved_device(),
                                              random_init=s.random_init)
            bb = self.backbone
            device = str(bb.device)
            self.store = SessionStore(s, bb.embed_dim, bb.head.weight, bb.head.bias, bb.class_names, device,
                                      s.backbone, self.metrics)
            warn = getattr(self.store.backend, "durability_warning", None)
            if s.durability == "wal" and warn is not None and warn():
                log.warning("%s", warn())
            log.info("sessions: durability %s, store %s", s.durability, self.store.backend.url)
            self.batcher = Batcher(bb, self.store, self.cache, self.metrics, s)
            if s.warmup:
                self._warmup()  # on this thread, before the worker starts
            self.batcher.start()
            if self.store.persistent:
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="fwserve-checkpoint",
                                                      daemon=True)
                self._checkpointer.start()
            self.metrics.set_build_info(s.backbone, device)
            self.metrics.ready.set(1)
            self.ready = True
            log.info("ready: backbone %s (d=%d) on %s", s.backbone, bb.embed_dim, device)
        except Exception as e:  # reported by /v2/health/ready
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading failed")

    def _warmup(self) -> None:
        """One base-head batch and one episodic batch per rule: compiles/warms every code path."""
        cfg = self.backbone.config
        pixels = torch.zeros(cfg.in_chans, cfg.img_size, cfg.img_size)
        jobs = [Job("predict", [Row(None, pixels=pixels)])]
        from server.rules import RULES

        for rule in RULES.values():
            support = [Row(None, pixels=pixels), Row(None, pixels=pixels)]
            ep = Episodic(rule, rule.validate({}), ["a", "b"], support, [0, 1], 1)
            jobs.append(Job("episodic", [Row(None, pixels=pixels)], episodic=ep))
        for job in jobs:
            job.future.set_running_or_notify_cancel()
        self.batcher.process(jobs)
        for job in jobs:
            job.future.result()

    def _checkpoint_loop(self) -> None:
        """snapshot: write changed sessions; wal: compact long logs; every --snapshot-interval-s."""
        while not self._stopping.wait(self.settings.snapshot_interval_s):
            try:
                n = self.store.checkpoint()
                if n:
                    log.debug("checkpoint: %d sessions written", n)
            except Exception:  # keep trying; every failure is logged
                log.exception("checkpoint failed")

    def stop(self) -> None:
        """Shutdown: stop taking jobs, drain the queue, write the sessions (snapshot/wal), close."""
        self._stopping.set()
        if self._loader is not None:
            self._loader.join()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self.batcher is not None:
            self.batcher.stop()
        if self.store is not None:
            self.store.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def check_ready(self) -> None:
        if not self.ready:
            raise errors.not_ready(self.settings.retry_after_s)

    # ---- helpers for routes -----------------------------------------------------------------

    async def call(self, fn, *args):
        """Run a blocking store call in a worker thread (the batch worker may hold the lock)."""
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    async def decode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, lambda: fn(*args))

    async def run(self, job: Job, conflict_retries: int = 3) -> dict:
        """Queue a job and wait for its result; 503 when the queue is full, 504 on timeout. A job
        that lost a version race to another replica (not applied) is queued again."""
        for _ in range(conflict_retries):
            try:
                return await self._run_once(job)
            except errors.ApiError as e:
                if e.code != "version_conflict":
                    raise
                job = dataclasses.replace(job, future=Future())
        return await self._run_once(job)

    async def _run_once(self, job: Job) -> dict:
        fut = self.batcher.submit(job)
        afut = asyncio.wrap_future(fut)
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(afut), timeout)
        except asyncio.TimeoutError:
            if fut.cancel():  # not started: dropped, never applied
                self.metrics.rejected.labels(reason="timeout").inc()
                raise errors.timeout(timeout) from None
            return await afut  # already running: its result is coming

    def check_count(self, n: int, what: str) -> None:
        if n > self.settings.max_instances:
            raise errors.invalid("too_many_instances", f"{n} {what}; at most {self.settings.max_instances} per request")

    def check_top_k(self, k: int) -> None:
        if k > self.settings.max_top_k:
            raise errors.invalid("invalid_top_k", f"top_k={k}; at most {self.settings.max_top_k}")

    # ---- jobs (built in the decode pool) ----------------------------------------------------

    def predict_job(self, body) -> Job:
        bb, cache, s = self.backbone, self.cache, self.settings
        rows = decode_rows(body.instances, bb, cache, s)
        if body.support is None:
            return Job("predict", rows, session_id=body.session_id, top_k=body.top_k)
        rule = get_rule(body.rule)
        hyper = rule.validate(body.hyperparameters)
        if body.steps > s.max_episodic_steps:
            raise errors.invalid("invalid_steps", f"steps={body.steps}; at most {s.max_episodic_steps}")
        classes, y = episodic_labels([inst.label for inst in body.support], body.classes, self.store.C)
        support = decode_rows(body.support, bb, cache, s, field="support")
        return Job("episodic", rows, top_k=body.top_k,
                   episodic=Episodic(rule, hyper, classes, support, y, body.steps))

    def adapt_job(self, body) -> Job:
        rows = decode_rows(body.instances, self.backbone, self.cache, self.settings)
        return Job("adapt", rows, session_id=body.session_id, labels=[i.label for i in body.instances])

    def infer_job(self, body, session_id: Optional[str], top_k: int) -> Job:
        """An OIP v2 request (one input tensor) -> a predict job."""
        if len(body.inputs) != 1:
            raise errors.invalid("invalid_inputs", "exactly one input tensor is expected")
        t = body.inputs[0]
        rows = [decode_one(inst, self.backbone, self.cache, self.settings, f"inputs[0][{i}]")
                for i, inst in enumerate(v2_instances(t, self.backbone.config, self.settings.max_instances))]
        return Job("predict", rows, session_id=session_id, top_k=top_k)


class _Inst:
    __slots__ = ("image", "array")

    def __init__(self, image=None, array=None) -> None:
        self.image, self.array = image, array


def v2_instances(t, cfg, max_instances: int) -> list[_Inst]:
    import numpy as np

    if not t.shape or any(not isinstance(n, int) or n < 0 for n in t.shape):
        raise errors.invalid("invalid_inputs", "input shape must be a list of non-negative integers")
    B = t.shape[0]
    if not 1 <= B <= max_instances:
        raise errors.invalid("too_many_instances", f"batch of {B}; 1..{max_instances} per request")
    if t.datatype == "BYTES":
        data = t.data
        if t.shape != [B] or not isinstance(data, list) or len(data) != B or not all(isinstance(d, str) for d in data):
            raise errors.invalid("invalid_inputs", "BYTES input must have shape [B] and B base64 strings")
        return [_Inst(image=d) for d in data]
    if t.datatype not in ("UINT8", "UINT16", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"):
        raise errors.invalid("invalid_inputs", f"unsupported datatype {t.datatype!r}")
    try:
        flat = np.asarray(t.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise errors.invalid("invalid_inputs", "input data must be a (nested) list of numbers") from None
    if flat.size != int(np.prod(t.shape)):
        raise errors.invalid("invalid_inputs", f"input data has {flat.size} values, shape {t.shape} needs "
                             f"{int(np.prod(t.shape))}")
    arr = flat.reshape(t.shape)
    for i in range(B):
        check_array(arr[i], cfg, f"inputs[0][{i}]")
    return [_Inst(array=arr[i]) for i in range(B)]


def episodic_labels(labels: list, classes: Optional[list[str]], max_classes: int) -> tuple[list[str], list[int]]:
    """Support labels -> (classes, indices). Without classes: the labels in order of appearance."""
    if classes is not None:
        if not classes or len(set(classes)) != len(classes) or len(classes) > max_classes:
            raise errors.invalid("invalid_classes", f"classes must be 1..{max_classes} unique names")
        index = {c: i for i, c in enumerate(classes)}
        y = []
        for i, lab in enumerate(labels):
            if isinstance(lab, int):
                if not 0 <= lab < len(classes):
                    raise errors.invalid("unknown_label", f"support[{i}].label {lab} is outside 0..{len(classes) - 1}")
                y.append(lab)
            elif lab in index:
                y.append(index[lab])
            else:
                raise errors.invalid("unknown_label", f"support[{i}].label {lab!r} is not in classes")
        return list(classes), y
    names = [str(lab) for lab in labels]
    classes = list(dict.fromkeys(names))
    if len(classes) > max_classes:
        raise errors.invalid("invalid_classes", f"{len(classes)} support classes; at most {max_classes}")
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[n] for n in names]

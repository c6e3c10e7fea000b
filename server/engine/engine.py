"""The engine: what the API calls. Backbone, session store, feature cache, batcher, executor
and metrics wired together behind a small interface of plain messages (server/engine/messages.py).

    engine = Engine(settings); engine.start()          # loads in the background
    result = await engine.predict(PredictJob(...))      # -> PredictResult
    result = await engine.adapt(AdaptJob(...))          # -> AdaptResult
    info, replayed = await engine.create_session(...)   # -> SessionInfo

Loading (backbone, slot tensors, warm-up) runs in a background thread so liveness answers at
once and readiness turns true when everything is loaded and warmed up. The engine raises domain
errors (server/errors.py) and knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from typing import Optional

import anyio
import torch

from server.config import Settings
from server.engine.batcher import Batcher, Pending
from server.engine.executor import EpisodicSpec, Executor
from server.engine.feature_cache import FeatureCache
from server.engine.messages import AdaptJob, AdaptResult, EpisodicJob, Input, Job, ModelInfo, PredictJob, PredictResult
from server.engine.metrics import Metrics
from server.errors import Unavailable, invalid, not_ready, timed_out
from server.rules import RULES, get_rule
from server.sessions import SessionInfo, SessionStore

log = logging.getLogger("fwserve")


class Engine:
    def __init__(self, settings: Settings, backbone=None) -> None:
        self.settings = settings
        for module in settings.rule_module_list:
            importlib.import_module(module)  # registers its rules before anything is sized from the registry
        self.metrics = Metrics()
        self.backbone = backbone
        self.store: Optional[SessionStore] = None
        self.batcher: Optional[Batcher] = None
        self.cache = FeatureCache(settings.feature_cache_size, self.metrics)
        self.ready = False
        self.load_error: Optional[str] = None
        self._loader: Optional[threading.Thread] = None
        self._checkpointer: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        if backbone is not None:
            self.input_config = backbone.config
        else:
            from models import get_config

            self.input_config = get_config(settings.backbone)

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def model(self) -> ModelInfo:
        cfg = self.input_config
        return ModelInfo(self.settings.backbone, cfg.img_size, cfg.in_chans, cfg.embed_dim, list(cfg.labels),
                         self.store.C if self.store is not None else max(self.settings.max_classes, len(cfg.labels)))

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="fwserve-load", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def check_ready(self) -> None:
        if not self.ready:
            raise not_ready(self.settings.retry_after_s, self.load_error or "the backbone is still loading")

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
                                      s.backbone, self.metrics, source_stats=getattr(bb, "source_stats", None))
            warn = self.store.backend.durability_warning()
            if s.durability == "wal" and warn:
                log.warning("%s", warn)
            log.info("sessions: durability %s, store %s", s.durability, self.store.backend.url)
            executor = Executor(bb, self.store, self.cache, self.metrics, s)
            self.batcher = Batcher(executor.run, self.metrics, s, max_sessions=self.store.S)
            if s.warmup:
                self._warmup(executor)  # on this thread, before the worker starts
            self.batcher.start()
            if self.store.persistent:
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="fwserve-checkpoint",
                                                      daemon=True)
                self._checkpointer.start()
            self.metrics.set_build_info(s.backbone, device)
            self.metrics.ready.set(1)
            self.ready = True
            log.info("ready: backbone %s (d=%d) on %s", s.backbone, bb.embed_dim, device)
        except Exception as e:  # reported by readiness
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading failed")

    def _warmup(self, executor: Executor) -> None:
        """One base-head batch and one episodic batch per rule: compiles/warms every code path."""
        cfg = self.backbone.config
        pixels = torch.zeros(cfg.in_chans, cfg.img_size, cfg.img_size)
        items = [Pending(PredictJob([Input(None, pixels)]))]
        for rule in RULES.values():
            job = EpisodicJob([Input(None, pixels)], [Input(None, pixels)] * 2, [0, 1], rule.name, classes=["a", "b"])
            items.append(self._pending(job))
        for item in items:
            item.future.set_running_or_notify_cancel()
        executor.run(items)
        for item in items:
            item.future.result()

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

    # ---- jobs -------------------------------------------------------------------------------

    async def predict(self, job: PredictJob | EpisodicJob) -> PredictResult:
        return await self._run(job)

    async def adapt(self, job: AdaptJob) -> AdaptResult:
        return await self._run(job)

    def _pending(self, job: Job) -> Pending:
        """Queue entry for a job; episodic heads are resolved (and rejected) here, before queueing."""
        if not isinstance(job, EpisodicJob):
            return Pending(job)
        return Pending(job, episodic=resolve_episodic(job, self.model.max_classes, self.settings.max_episodic_steps))

    async def _run(self, job: Job, conflict_retries: int = 3):
        """Queue a job and wait for its result: Unavailable when the queue is full, TimedOut when
        it waited too long (then it was not applied). A job that lost a version race to another
        replica (not applied) is queued again."""
        self.check_ready()
        for attempt in range(conflict_retries + 1):
            try:
                return await self._run_once(self._pending(job))
            except Unavailable as e:
                if e.code != "version_conflict" or attempt == conflict_retries:
                    raise

    async def _run_once(self, item: Pending):
        fut = self.batcher.submit(item)
        afut = asyncio.wrap_future(fut)
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(afut), timeout)
        except asyncio.TimeoutError:
            if fut.cancel():  # not started: dropped, never applied
                self.metrics.rejected.labels(reason="timeout").inc()
                raise timed_out(timeout) from None
            return await afut  # already running: its result is coming

    # ---- sessions ---------------------------------------------------------------------------

    async def _call(self, fn, *args):
        """A store call in a worker thread (a micro-batch may hold the store's lock)."""
        self.check_ready()
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    async def create_session(self, rule: str, classes: Optional[list[str]], hyperparameters: dict,
                             init: str = "zeros", session_id: Optional[str] = None, tenant: Optional[str] = None,
                             quota: int = 0, idempotency: Optional[tuple[str, str]] = None
                             ) -> tuple[SessionInfo, bool]:
        return await self._call(self.store.create, rule, classes, hyperparameters, init, session_id, tenant, quota,
                                idempotency)

    async def get_session(self, key: str) -> SessionInfo:
        return await self._call(self.store.info, key)

    async def reset_session(self, key: str) -> SessionInfo:
        return await self._call(self.store.reset, key)

    async def delete_session(self, key: str) -> None:
        await self._call(self.store.delete, key)

    async def export_session(self, key: str) -> bytes:
        return await self._call(self.store.export, key)

    async def import_session(self, key: str, data: bytes, quota: int = 0) -> tuple[SessionInfo, bool]:
        return await self._call(self.store.import_, key, data, quota)

    async def tenant_counts(self, tenants: list[str]) -> dict[str, int]:
        return await self._call(lambda: {t: self.store.tenant_count(t) for t in tenants})


def resolve_episodic(job: EpisodicJob, max_classes: int, max_steps: int) -> EpisodicSpec:
    """An episodic job's head: its rule, validated hyper-parameters, classes and label indices."""
    if job.steps > max_steps:
        raise invalid("invalid_steps", f"steps={job.steps}; at most {max_steps}")
    rule = get_rule(job.rule)
    hyper = rule.validate(job.hyperparameters)
    classes, y = episodic_labels(job.labels, job.classes, max_classes)
    return EpisodicSpec(rule, hyper, classes, y, job.steps)


def episodic_labels(labels: list, classes: Optional[list[str]], max_classes: int) -> tuple[list[str], list[int]]:
    """Support labels -> (classes, indices). Without classes: the labels in order of appearance."""
    if classes is not None:
        if not classes or len(set(classes)) != len(classes) or len(classes) > max_classes:
            raise invalid("invalid_classes", f"classes must be 1..{max_classes} unique names")
        index = {c: i for i, c in enumerate(classes)}
        y = []
        for i, lab in enumerate(labels):
            if isinstance(lab, int):
                if not 0 <= lab < len(classes):
                    raise invalid("unknown_label", f"support[{i}].label {lab} is outside 0..{len(classes) - 1}")
                y.append(lab)
            elif lab in index:
                y.append(index[lab])
            else:
                raise invalid("unknown_label", f"support[{i}].label {lab!r} is not in classes")
        return list(classes), y
    names = [str(lab) for lab in labels]
    classes = list(dict.fromkeys(names))
    if len(classes) > max_classes:
        raise invalid("invalid_classes", f"{len(classes)} support classes; at most {max_classes}")
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[n] for n in names]

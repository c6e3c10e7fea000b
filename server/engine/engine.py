"""The engine: what the API calls. Backbone, session store, feature cache, batcher, executor
and metrics wired together behind a small interface of plain messages (server/engine/messages.py).

    engine = Engine(settings); engine.start()          # loads in the background
    result = await engine.predict(PredictJob(...))      # -> PredictResult
    result = await engine.adapt(AdaptJob(...))          # -> AdaptResult
    info, replayed = await engine.create_session(...)   # -> SessionInfo

Loading (backbone, slot tensors, warm-up) runs in a background thread so liveness answers at
once and readiness turns true when everything is loaded and warmed up. The engine raises domain
errors (server/errors.py) and knows nothing of HTTP.

Engine events are structured log records on the ``fwserve.engine`` logger, their fields in the
record's extras (``event``: backbone_loading, store_opened, warmup, ready, load_failed,
checkpoint, checkpoint_failed, guard_trip; session_evicted / session_restored at DEBUG).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import importlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

import kernels
from server.config import Settings
from server.engine.batcher import Batcher, Pending
from server.engine.executor import EpisodicSpec, Executor
from server.engine.feature_cache import FeatureCache
from server.engine.messages import (
    AdaptJob, AdaptResult, EpisodicJob, Input, Job, ModelInfo, PredictJob, PredictResult, RuleInfo, SessionPatch,
)
from server.engine.metrics import Metrics
from server.errors import InvalidInput, Unavailable, invalid, not_ready, timed_out
from server.rules import RULES, get_rule, scratch_heads
from server.sessions import UNSET, SessionInfo, SessionStore, StoreEvents, width_for

log = logging.getLogger("fwserve.engine")


class _Events(StoreEvents):
    """What the store reports: into the metrics, and as a structured record per move."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def tier_counts(self, counts: dict[str, int]) -> None:
        self.metrics.tier_counts(counts)

    def moved(self, kind: str, tier: str) -> None:
        self.metrics.moved(kind, tier)
        if kind == "evict":
            log.debug("session evicted to %s", tier, extra={"event": "session_evicted", "to_tier": tier})
        else:
            log.debug("session restored from %s", tier, extra={"event": "session_restored", "from_tier": tier})

    def idempotency_evicted(self, n: int) -> None:
        self.metrics.idempotency_evicted(n)
        log.warning("%d Idempotency-Key answers dropped before their time (--idempotency-max-bytes)", n,
                    extra={"event": "idempotency_evicted", "answers": n})

    def expired(self, n: int) -> None:
        self.metrics.expired(n)
        log.info("expired %d idle sessions", n, extra={"event": "sessions_expired", "sessions": n})

    def guard_tripped(self, rule: str, action: str, trigger: str, session_key: str, version: int) -> None:
        self.metrics.guard_trips.labels(rule=rule, action=action).inc()
        session = hashlib.sha256(session_key.encode()).hexdigest()[:12]  # as the access log names sessions
        log.warning("guard of a %s session: %s on %s at version %d", rule, action, trigger, version,
                    extra={"event": "guard_trip", "rule": rule, "action": action, "trigger": trigger,
                           "session": session, "version": version})


class Engine:
    def __init__(self, settings: Settings, backbone=None) -> None:
        self.settings = settings
        self.owns_process = False  # set by `fwserve serve`: the process exists to run this engine
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
        self._store_pool = ThreadPoolExecutor(settings.store_workers, thread_name_prefix="fwserve-store")
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
        t0 = time.perf_counter()
        try:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            if self.backbone is None:
                from models import load_backbone

                log.info("loading backbone %s on %s", s.backbone, s.resolved_device(),
                         extra={"event": "backbone_loading", "backbone": s.backbone, "device": s.resolved_device()})
                self.backbone = load_backbone(s.backbone, weights=s.weights, device=s.resolved_device(),
                                              random_init=s.random_init)
            bb = self.backbone
            device = str(bb.device)
            learned, refused = learned_rule_params(bb, s.rule_param_files())
            self.store = SessionStore(s, bb.embed_dim, bb.head.weight, bb.head.bias, bb.class_names, device,
                                      s.backbone, _Events(self.metrics), fingerprint=bb.fingerprint,
                                      source_stats=getattr(bb, "source_stats", None), learned=learned,
                                      learned_refused=refused)
            warn = self.store.backend.durability_warning()
            if s.durability == "wal" and warn:
                log.warning("%s", warn, extra={"event": "durability_warning"})
            log.info("sessions: durability %s, store %s", s.durability, self.store.backend.url,
                     extra={"event": "store_opened", "durability": s.durability, "store": self.store.backend.url})
            executor = Executor(bb, self.store, self.cache, self.metrics, s)
            on_loop = s.batches_on_loop(device)
            self.batcher = Batcher(executor.run, self.metrics, s, max_sessions=self.store.S, on_loop=on_loop)
            if s.warmup:
                t1 = time.perf_counter()
                self._warmup(executor)  # on this thread, before the worker starts
                log.info("warm-up done in %.2f s", time.perf_counter() - t1,
                         extra={"event": "warmup", "seconds": round(time.perf_counter() - t1, 3),
                                "rules": len(RULES)})
            self.batcher.start()
            if self.store.persistent or s.session_ttl_s:
                self._checkpointer = threading.Thread(target=self._maintenance_loop, name="fwserve-maintenance",
                                                      daemon=True)
                self._checkpointer.start()
            impls = kernels.dispatch.implementations(device)
            log.info("head ops on %s: %s", device, ", ".join(f"{op} {impl}" for op, impl in impls.items()))
            self.metrics.set_build_info(s.backbone, device, kernels.dispatch.describe_implementations(device),
                                        bb.fingerprint[:16])
            if self.owns_process:
                # What loading made lives as long as the process: out of the collector's sight,
                # each full collection walks only what requests made since (a loaded server holds
                # hundreds of thousands of objects; one full collection took ~0.1 s).
                gc.collect()
                gc.freeze()
            self.metrics.ready.set(1)
            self.ready = True
            runner = "the event loop" if on_loop else "a worker thread"
            log.info("ready: backbone %s (d=%d) on %s, batches on %s", s.backbone, bb.embed_dim, device, runner,
                     extra={"event": "ready", "backbone": s.backbone, "embed_dim": bb.embed_dim, "device": device,
                            "batch_runner": "loop" if on_loop else "thread",
                            "load_seconds": round(time.perf_counter() - t0, 3)})
        except Exception as e:  # reported by readiness
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading failed", extra={"event": "load_failed", "error": self.load_error})

    def _warmup(self, executor: Executor) -> None:
        """Every path a first request takes, before readiness: the backbone at one image and at a
        full micro-batch, one base-head batch and one episodic batch per rule through the
        executor, and every rule's head ops at the store's class width, at the batch sizes a
        micro-batch can have (on CUDA: each Triton specialisation compiled now, not on a request)."""
        cfg, store = self.backbone.config, self.store
        pixels = torch.zeros(cfg.in_chans, cfg.img_size, cfg.img_size)
        for n in sorted({1, self.settings.max_batch_size}):
            self.backbone.features(pixels.expand(n, -1, -1, -1).contiguous())
        items = [Pending(PredictJob([Input(None, pixels)]))]
        for rule in RULES.values():
            if rule.learned and rule.name not in store.learned:
                continue
            job = EpisodicJob([Input(None, pixels)], [Input(None, pixels)] * 2, [0, 1], rule.name, classes=["a", "b"])
            items.append(self._pending(job))
        for item in items:
            item.future.set_running_or_notify_cancel()
        executor.run(items)
        for item in items:
            item.future.result()
        for width in sorted({width_for(n) for n in range(1, store.C + 1)}):  # every pool a head can land in
            warm_head_ops(width, store.d, store.device, self.settings.max_batch_size, store.learned)

    def _maintenance_loop(self) -> None:
        """Every --snapshot-interval-s: snapshot: write changed sessions; wal: compact long logs.
        And now and then (a tenth of --session-ttl-s, at most every 5 minutes): delete idle sessions."""
        s = self.settings
        sweep_every = min(s.session_ttl_s / 10, 300.0)
        last_sweep = time.monotonic()
        while not self._stopping.wait(s.snapshot_interval_s):
            try:
                if self.store.persistent:
                    t0 = time.perf_counter()
                    n = self.store.checkpoint()
                    if n:
                        log.info("checkpoint: %d sessions written", n,
                                 extra={"event": "checkpoint", "sessions": n,
                                        "seconds": round(time.perf_counter() - t0, 3)})
                if s.session_ttl_s and time.monotonic() - last_sweep >= sweep_every:
                    last_sweep = time.monotonic()
                    self.store.expire(s.session_ttl_s)
            except Exception:  # keep trying; every failure is logged
                log.exception("maintenance failed", extra={"event": "maintenance_failed"})

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
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    # ---- jobs -------------------------------------------------------------------------------

    async def predict(self, job: PredictJob | EpisodicJob) -> PredictResult:
        """A predict with a `version` answers from that retained version's head (materialised
        by the store, cached briefly) and changes nothing."""
        if isinstance(job, PredictJob) and job.version is not None:
            if job.session is None:
                raise invalid("missing_session", "a predict at a version needs a session_id")
            head = await self._call(self.store.version_head, job.session, job.version)
            job = dataclasses.replace(job, view=head)
        return await self._run(job)

    async def adapt(self, job: AdaptJob) -> AdaptResult:
        return await self._run(job)

    def _pending(self, job: Job) -> Pending:
        """Queue entry for a job; episodic heads are resolved (and rejected) here, before queueing."""
        if not isinstance(job, EpisodicJob):
            return Pending(job)
        spec = resolve_episodic(job, self.model.max_classes, self.settings.max_episodic_steps)
        if self.store is not None:
            self.store.check_trained(spec.rule)
        return Pending(job, episodic=spec)

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
        timeout = self.settings.request_timeout_s
        left = timeout if item.job.deadline is None else item.job.deadline - time.monotonic()
        if left <= 0:
            self.metrics.rejected.labels(reason="timeout").inc()
            raise timed_out(timeout)
        loop = asyncio.get_running_loop()
        afut = item.future.attach(loop)
        fut = self.batcher.submit(item, settles=True)
        loop.call_soon(_after_next_iteration, loop, self.batcher.settle)
        try:
            return await asyncio.wait_for(asyncio.shield(afut), left)
        except asyncio.TimeoutError:
            if fut.cancel():  # not started: dropped, never applied
                self.metrics.rejected.labels(reason="timeout").inc()
                raise timed_out(timeout) from None
            return await afut  # already running: its result is coming
        except asyncio.CancelledError:
            # the caller went away (a shutdown past its grace period): a job not yet started is
            # dropped, so nothing is applied that nobody is told about
            fut.cancel()
            raise

    # ---- sessions ---------------------------------------------------------------------------

    async def _call(self, fn, *args):
        """A store call in the engine's own small thread pool (a micro-batch may hold the store's
        lock, the store may stall): it never takes threads the HTTP side needs."""
        self.check_ready()
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, lambda: fn(*args))

    async def create_session(self, rule: str, classes: Optional[list[str]], hyperparameters: dict,
                             init: str = "zeros", session_id: Optional[str] = None, tenant: Optional[str] = None,
                             quota: int = 0, idempotency: Optional[tuple[str, str]] = None,
                             guard: Optional[dict] = None, actor: Optional[str] = None) -> tuple[SessionInfo, bool]:
        return await self._call(self.store.create, rule, classes, hyperparameters, init, session_id, tenant, quota,
                                idempotency, guard, actor)

    async def get_session(self, key: str) -> SessionInfo:
        return await self._call(self.store.info, key)

    async def reset_session(self, key: str, actor: Optional[str] = None) -> SessionInfo:
        return await self._call(self.store.reset, key, actor)

    async def delete_session(self, key: str) -> None:
        await self._call(self.store.delete, key)

    async def export_session(self, key: str) -> bytes:
        return await self._call(self.store.export, key)

    async def import_session(self, key: str, data: bytes, quota: int = 0,
                             actor: Optional[str] = None) -> tuple[SessionInfo, bool]:
        return await self._call(self.store.import_, key, data, quota, actor)

    # ---- versions, guards ---------------------------------------------------------------------

    async def session_versions(self, key: str, limit: int = 100,
                               before: Optional[int] = None) -> tuple[list[dict], int, int]:
        """Retained versions, newest first -> (entries, oldest retained version, current version)."""
        return await self._call(self.store.versions, key, limit, before)

    async def rollback_session(self, key: str, version: int, actor: Optional[str] = None,
                               idempotency: Optional[tuple[str, str]] = None) -> tuple[dict, bool]:
        """Version `version`'s state made current as a new version -> ({id, version,
        rolled_back_to}, replayed)."""
        return await self._call(self.store.rollback, key, version, actor, idempotency)

    async def fork_session(self, key: str, version: Optional[int], session_id: Optional[str],
                           tenant: Optional[str], quota: int = 0, actor: Optional[str] = None,
                           idempotency: Optional[tuple[str, str]] = None) -> tuple[SessionInfo, bool]:
        return await self._call(self.store.fork, key, version, session_id, tenant, quota, actor, idempotency)

    async def patch_session(self, key: str, patch: SessionPatch) -> SessionInfo:
        guard = patch.guard if patch.guard_given else UNSET
        return await self._call(self.store.patch, key, guard, patch.frozen)

    async def list_sessions(self, tenant: Optional[str], after: Optional[str] = None, limit: int = 100,
                            rule: Optional[str] = None, tier: Optional[str] = None) -> tuple[list[SessionInfo], bool]:
        """A tenant's sessions in id order after the id `after` -> (at most `limit`, more follow?)."""
        return await self._call(self.store.list_sessions, tenant, after, limit, rule, tier)

    async def rules(self) -> list[RuleInfo]:
        """Every registered rule, and whether this server can use it (learned rules need their
        parameters for this backbone)."""
        self.check_ready()
        out = []
        for rule in RULES.values():
            try:
                self.store.check_trained(rule)
                reason = None
            except InvalidInput as e:
                reason = e.message
            hyper = {k: {"default": h.default, "low": h.low, "low_excluded": h.low_open,
                         "high": h.high if math.isfinite(h.high) else None, "flag": h.flag, "help": h.help}
                     for k, h in rule.hyper.items()}
            out.append(RuleInfo(rule.name, rule.description, rule.needs_labels, bool(rule.learned), reason is None,
                                reason, hyper, rule.base_init))
        return out

    async def tenant_counts(self, tenants: list[str]) -> dict[str, int]:
        return await self._call(lambda: {t: self.store.tenant_count(t) for t in tenants})


def learned_rule_params(bb, files: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The learned rules' parameters for this backbone: those found beside its weights, then the
    files given with --rule-params (one trained for other weights stops the start with its
    reason). -> (rule -> tensors, rule -> why a file beside the weights was refused)."""
    from models import load_rule_params

    params = dict(getattr(bb, "rule_params", {}) or {})
    refused = dict(getattr(bb, "rule_params_refused", {}) or {})
    for path in files:
        p = load_rule_params(path, bb.fingerprint)  # RuleParamsMismatch: the start fails with its message
        params[p.rule] = p
        refused.pop(p.rule, None)
    for name, p in params.items():
        missing = sorted(set(RULES[name].learned) - set(p.tensors)) if name in RULES else []
        if missing:
            raise ValueError(f"the {name!r} parameters in {p.path} lack {', '.join(missing)}; retrain them with "
                             f"`fwserve train-rule {name}`")
        log.info("learned rule %s: parameters from %s", name, p.path,
                 extra={"event": "rule_params_loaded", "rule": name, "path": str(p.path)})
    for name, why in refused.items():
        log.warning("learned rule %s is unavailable: %s", name, why, extra={"event": "rule_params_refused", "rule": name})
    return {name: p.tensors for name, p in params.items()}, refused


def warm_head_ops(C: int, d: int, device, max_rows: int, learned: Optional[dict] = None) -> None:
    """Each rule's forward and update on throw-away heads as wide as one of the store's pools
    (C classes), over two sessions, at 1, 2 and max_rows rows (learned rules: when loaded)."""
    g = torch.Generator().manual_seed(0)
    for rule in RULES.values():
        if rule.learned and rule.name not in (learned or {}):
            continue
        hyper = rule.validate({})
        heads, state_rows = scratch_heads([(rule, hyper, C, None), (rule, hyper, 2, None)], C, d, device,
                                          learned=learned)
        for rows in sorted({1, 2, max_rows}):
            slots = torch.arange(rows, dtype=torch.int64, device=device) % 2
            x = torch.randn(rows, d, generator=g).to(device)
            y = torch.zeros(rows, dtype=torch.int64, device=device)
            sr = torch.tensor([state_rows[s] for s in slots.tolist()], dtype=torch.int64, device=device)
            batch = kernels.SlotBatch(slots)
            logits = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize,
                                          batch=batch)
            kw = {"logits": logits} if rule.reuses_logits and kernels.dispatch.logits_reusable(x) else {}
            rule.update(heads, x, y, slots, sr if rule.state else None, batch=batch, **kw)


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


def _after_next_iteration(loop: asyncio.AbstractEventLoop, fn) -> None:
    """Run fn one loop iteration after this one: the iteration in between polls for I/O and runs
    what it found, so by then every request whose bytes had arrived has been handled as far as
    it goes without waiting (for small bodies: decoded and submitted)."""
    loop.call_soon(fn)

"""Server settings: one pydantic-settings object, filled from ``FWSERVE_*`` environment
variables and (through ``server.cli``) command-line flags. Flags win over the environment,
the environment wins over the defaults below.

Every field's ``description`` is its ``--help`` text; the flag name is the field name with
dashes (``max_batch_size`` -> ``--max-batch-size``, env ``FWSERVE_MAX_BATCH_SIZE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FWSERVE_", extra="forbid", validate_default=True)

    # network
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0 = any free port).")
    log_level: str = Field("info", description="Log level of the server's and uvicorn's logs (critical, error, "
                           "warning, info, debug).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (access lines and engine events carry "
        "their fields as keys).",
    )
    grpc_port: Optional[int] = Field(
        None, ge=0, le=65535, description="Also serve the Open Inference Protocol over gRPC (KServe v2 "
        "GRPCInferenceService) on this port, on --host (0 = any free port; needs the grpc extra).",
    )

    # backbone
    backbone: str = Field(
        "fwserve-mnist-vit",
        description="Named backbone config (fwserve-mnist-vit, vit_tiny_patch16_224, "
        "vit_small_patch16_224, vit_base_patch16_224). Also the model name in the v2 API.",
    )
    weights: Optional[Path] = Field(
        None,
        description="timm-layout checkpoint (.safetensors or .pth) for the backbone; "
        "default: the bundled weights of the named backbone.",
    )
    random_init: bool = Field(
        False, description="Build the backbone with random weights (benchmarks at real sizes)."
    )
    device: str = Field("auto", description="Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch.set_num_threads for CPU inference; default: torch's choice."
    )
    warmup: bool = Field(True, description="Run one warm-up batch before reporting ready.")
    rule_params: str = Field(
        "", description="Comma-separated learned rules' parameter files (fwserve train-rule) to load beside those "
        "found next to the weights; a file trained for other backbone weights stops the server with an error.",
    )
    rule_modules: str = Field(
        "", description="Comma-separated Python modules imported at start; each registers adaptation rules "
        "(server.rules.register) that sessions may then use.",
    )

    # batching
    max_batch_size: int = Field(64, ge=1, description="Most rows (instances) in one micro-batch.")
    max_wait_ms: float = Field(
        2.0, ge=0, description="The longest the batcher waits to fill a micro-batch after its first request; "
        "it starts sooner once the event loop has caught up with the requests it had in hand."
    )
    batch_runner: Literal["auto", "thread", "loop"] = Field(
        "auto", description="What runs the micro-batches: thread (a worker thread, while the event loop goes on "
        "reading requests) or loop (the event loop itself, between reads: no hand-offs between threads, and every "
        "request that arrived during a batch joins the next; for a server on one core). auto: loop for one process "
        "(--api-workers 1) on a CPU with one torch thread (or one core), a directory store and durability none or "
        "snapshot; thread otherwise.",
    )
    max_queue_size: int = Field(
        1024, ge=1, description="Most requests waiting in the batch queue; beyond it requests get 503 + Retry-After."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a request may wait for its batch; a request that times out before "
        "its batch starts is dropped (an adapt is then not applied) and answered 504."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 responses.")
    shutdown_grace_s: Optional[float] = Field(
        None, gt=0, description="On SIGTERM: seconds to finish in-flight requests (the queue drains meanwhile) "
        "before the server stops; must exceed --request-timeout-s, so every queued adapt is answered (default: "
        "the request timeout + 30 s). A pod's terminationGracePeriodSeconds should be its preStop sleep plus "
        "this plus a few seconds.",
    )

    # sessions
    max_device_sessions: int = Field(
        1024, ge=1, description="Session heads resident in device slot tensors; least recently used ones move to host."
    )
    head_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Storage of the device tier's heads: bfloat16 halves their memory (the kernels "
        "compute in float32; a head is rounded to bfloat16 once, when it enters a slot). Rule state stays float32.",
    )
    max_host_sessions: int = Field(
        4096, ge=0, description="Session heads kept in host memory; beyond it least recently used ones go to disk."
    )
    snapshot_dir: Path = Field(
        Path("snapshots"), description="Directory for the disk tier (one safetensors file per session)."
    )
    store: Optional[str] = Field(
        None,
        description="Where sessions persist: a directory (default: --snapshot-dir; one process at a time) or "
        "redis://host:port/db (shared by replicas; run redis with appendonly yes, appendfsync always).",
    )
    durability: Literal["none", "snapshot", "wal"] = Field(
        "none",
        description="none: sessions live only in this process (the store is the spill tier, emptied at exit); "
        "snapshot: sessions are written to the store every --snapshot-interval-s and at shutdown, and load "
        "from it after a restart (adapts since the last snapshot are lost on a crash); wal: every adapt is "
        "logged to the store before it is acknowledged, replayed on load, compacted into snapshots.",
    )
    snapshot_interval_s: float = Field(
        30.0, gt=0, description="snapshot: seconds between writes of changed sessions; wal: seconds between "
        "compaction passes.",
    )
    wal_compact_records: int = Field(
        256, ge=1, description="wal: compact a session's log into a snapshot once it holds this many adapts."
    )
    wal_compact_bytes: int = Field(
        4 << 20, ge=1024, description="wal: compact a session's log into a snapshot once it holds this many bytes."
    )
    fsync: bool = Field(
        True, description="Directory store: fsync log appends and snapshot writes before acknowledging "
        "(--no-fsync survives a process crash but not a power loss). Redis: set by its appendfsync.",
    )
    idempotency_ttl_s: float = Field(
        86400.0, gt=0, description="How long an Idempotency-Key and the response to its request are kept for "
        "retries (24 h by default); a key belongs to its tenant for that long.",
    )
    idempotency_max_bytes: int = Field(
        1 << 20, ge=1024, description="Bytes of stored responses to Idempotency-Key requests kept per session; "
        "beyond it the oldest are dropped early (counted in fwserve_idempotency_evictions_total and logged).",
    )
    max_classes: int = Field(64, ge=2, description="Most classes a session head may have (slot tensor width).")
    max_sessions: int = Field(
        100_000, ge=1, description="Most sessions in all tiers together; creating more is refused (409)."
    )
    session_ttl_s: float = Field(
        30 * 86400.0, ge=0, description="A session neither used nor changed for this long is deleted "
        "(fwserve_sessions_expired_total; 0 keeps sessions forever).",
    )
    store_max_bytes: int = Field(
        0, ge=0, description="Directory store: most bytes its files may take (snapshots, logs); a write beyond it "
        "fails like a full disk (503, nothing acknowledged). 0: the disk is the limit.",
    )

    # history: every version addressable (server/sessions/history.py)
    history_versions: int = Field(
        64, ge=1, description="Versions of each session kept addressable (predict at a version, rollback, fork), "
        "the current one included; 1 keeps only the current version (no in-memory history without the log).",
    )
    history_max_age_s: float = Field(
        0.0, ge=0, description="Versions older than this many seconds are no longer addressable (0: no age limit; "
        "the current version always is).",
    )
    history_max_bytes: int = Field(
        1 << 20, ge=1024, description="Per session: bytes of log records of the addressable versions (wal: in the "
        "store; none/snapshot: all the in-memory history holds, records and state copies).",
    )
    version_cache_entries: int = Field(
        64, ge=0, description="Materialised version states kept in memory for predicts at a version (0: none).",
    )
    version_cache_ttl_s: float = Field(60.0, gt=0, description="Seconds a materialised version state is kept.")

    # tenants
    api_keys: Optional[str] = Field(
        None,
        description="API keys, one tenant per line (or ';'-separated): 'TENANT sha256:HEX [admin] "
        "[sessions=N] [rps=R]'. HEX is the sha256 of the key (`fwserve hash-key`). No keys: auth is off.",
    )
    api_keys_file: Optional[Path] = Field(None, description="File with API key lines (see --api-keys).")
    tenant_max_sessions: int = Field(
        10_000, ge=0, description="Default per-tenant session quota (0 = only --max-sessions); 429 beyond it."
    )
    tenant_rps: float = Field(
        0.0, ge=0, description="Default per-tenant requests per second (0 = unlimited); 429 + Retry-After beyond it."
    )
    tenant_burst: Optional[float] = Field(
        None, gt=0, description="Requests a tenant may send at once before --tenant-rps applies (default: max(1, rps))."
    )

    # requests
    max_instances: int = Field(256, ge=1, description="Most instances (or support examples) in one request.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 beyond).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest decoded image (width x height) accepted."
    )
    max_request_pixels: int = Field(
        32 * 1024 * 1024, ge=1, description="Most decoded image pixels (width x height, summed) in one request."
    )
    max_decode_queue: int = Field(
        256, ge=1, description="Most requests waiting to be decoded; beyond it requests get 503 + Retry-After."
    )
    max_top_k: int = Field(20, ge=1, description="Largest top_k a request may ask for.")
    max_episodic_steps: int = Field(100, ge=1, description="Most passes over the support set of an episodic head.")

    # feature cache and workers
    feature_cache_size: int = Field(
        4096, ge=0, description="Entries in the feature LRU cache keyed by image content hash (0 disables it)."
    )
    recent_images_mb: float = Field(
        16.0, ge=0, description="Memory for the last decoded base64 images, by their text (0 turns it off): an "
        "adapt on the image a predict just sent, or a retry, skips base64, PNG decoding and preprocessing. Per "
        "HTTP process.",
    )
    decode_workers: int = Field(4, ge=1, description="Threads decoding and preprocessing images off the event loop.")
    api_workers: int = Field(
        1, ge=1, le=64, description="HTTP worker processes in front of one engine process (1: one process does "
        "both). More workers parse, authenticate and decode requests in parallel while one engine batches them "
        "all: about one per core the engine does not need.",
    )
    decode_inline_bytes: int = Field(
        32 * 1024, ge=0, description="Request bodies up to this size are decoded on the event loop itself (a hop "
        "to the decode threads costs more than decoding a few small images); larger ones go to the threads.",
    )
    store_workers: int = Field(
        8, ge=1, description="Threads for session management calls (create, export, ...): a stalled store holds "
        "these, never the threads that serve other requests.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug, trace")
        return v

    @model_validator(mode="after")
    def _weights_xor_random(self) -> "Settings":
        if self.weights is not None and self.random_init:
            raise ValueError("weights and random_init exclude each other")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.durability == "snapshot" and (self.store or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("durability=snapshot keeps each replica's sessions to itself between writes, so a "
                             "shared (redis) store would fork them: use durability=wal with a shared store")
        if self.shutdown_grace_s is not None and self.shutdown_grace_s <= self.request_timeout_s:
            raise ValueError(f"shutdown_grace_s ({self.shutdown_grace_s:g}) must exceed request_timeout_s "
                             f"({self.request_timeout_s:g}): a queued adapt is answered within the timeout")
        return self

    @field_validator("store")
    @classmethod
    def _store(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            v = v.strip()
            if not v:
                return None
            if "://" in v and not v.startswith(("redis://", "rediss://", "unix://", "file://")):
                raise ValueError("store must be a directory, file://PATH or redis://host:port/db")
        return v

    @property
    def rule_module_list(self) -> list[str]:
        return [m.strip() for m in self.rule_modules.split(",") if m.strip()]

    def rule_param_files(self) -> list[str]:
        return [m.strip() for m in self.rule_params.split(",") if m.strip()]

    def shutdown_grace(self) -> float:
        return self.shutdown_grace_s if self.shutdown_grace_s is not None else self.request_timeout_s + 30.0

    def store_url(self) -> str:
        """The store as given, or the snapshot directory."""
        return self.store or str(self.snapshot_dir)

    def batches_on_loop(self, device: str) -> bool:
        """batch_runner resolved for a backbone on `device`: True when the event loop runs the batches.
        auto keeps the thread wherever a batch may wait on something other than this core: a GPU, a
        shared store (a slow Redis would stall the loop), a log append per adapt, or more torch threads;
        and behind API workers, whose messages reach the engine in a trickle: there the thread's wait
        for more (max_wait_ms) made batches of ~5 rows where the loop made ~3.8 (1 image, c=8)."""
        if self.batch_runner != "auto":
            return self.batch_runner == "loop"
        import os

        import torch

        one_core = torch.get_num_threads() == 1 or len(os.sched_getaffinity(0)) == 1
        shared = (self.store or "").startswith(("redis://", "rediss://", "unix://"))
        return (device.startswith("cpu") and one_core and not shared and self.durability != "wal"
                and self.api_workers == 1)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

"""The engine's seam: the plain data the API hands in and gets back.

Jobs carry decoded inputs (a float tensor plus the content hash that keys the feature cache),
session keys, labels and options — never request bodies. Results are dataclasses — never
response dicts. Everything here is plain data (tensors, strings, numbers), so the API and the
engine can live in different processes without either side's logic changing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch

Label = Union[int, str]


@dataclass
class Input:
    """One decoded instance."""

    key: Optional[str]  # content hash of what the client sent (feature-cache key); None: not cacheable
    pixels: torch.Tensor  # [C, H, W] float32, preprocessed for the backbone


@dataclass
class PredictJob:
    inputs: list[Input]
    session: Optional[str] = None  # session key; None: the backbone's base head
    top_k: int = 1
    tenant: Optional[str] = None  # whose request: the feature cache is kept apart per tenant
    deadline: Optional[float] = None  # time.monotonic() by which it is answered or dropped (504)
    version: Optional[int] = None  # answer from this retained version of the session (changes nothing)
    view: Optional[object] = None  # set by the engine: that version's head, materialised


@dataclass
class AdaptJob:
    session: str
    inputs: list[Input]
    labels: list[Optional[Label]]  # class names or indices; None: unlabelled (label-free rules)
    idempotency: Optional[tuple[str, str]] = None  # (Idempotency-Key, request fingerprint)
    tenant: Optional[str] = None
    deadline: Optional[float] = None
    actor: Optional[str] = None  # the API key id that sent it (its version's history entry)


@dataclass
class EpisodicJob:
    """Adapt a throw-away head on `support`, answer `inputs` with it, discard it."""

    inputs: list[Input]
    support: list[Input]
    labels: list[Label]
    rule: str = "prototype"
    hyperparameters: dict = field(default_factory=dict)
    classes: Optional[list[str]] = None  # default: the support labels in order of appearance
    steps: int = 1
    top_k: int = 1
    tenant: Optional[str] = None
    deadline: Optional[float] = None


Job = Union[PredictJob, AdaptJob, EpisodicJob]


@dataclass
class Scored:
    label: str
    index: int
    score: float


@dataclass
class Prediction:
    label: str
    index: int
    score: float
    top_k: list[Scored]
    true_label: Optional[str] = None  # adapt: the instance's label (None: unlabelled)
    correct: Optional[bool] = None  # adapt: was the pre-update prediction right


@dataclass
class PredictResult:
    head: str  # "session" | "base" | "episodic"
    session_id: Optional[str]
    version: Optional[int]  # the session version that answered (None for base/episodic heads)
    predictions: list[Prediction]
    applied: Optional[int] = None  # adapt_on_predict sessions: instances the session then adapted on
    latency_seconds: float = 0.0
    queue_seconds: float = 0.0  # time the job waited in the queue before its micro-batch started


@dataclass
class AdaptResult:
    session_id: str
    version: int  # after this update
    applied: int
    predictions: list[Prediction]  # made before the update (prequential)
    update_seconds: float
    latency_seconds: float = 0.0
    replayed: bool = False  # an Idempotency-Key retry answered from the first response
    queue_seconds: float = 0.0  # time the job waited in the queue before its micro-batch started
    guard: Optional[dict] = None  # what the session's guard did after this update (trigger, action, ...)

    def to_record(self) -> dict:
        """As kept for Idempotency-Key retries (plain JSON data)."""
        out = asdict(self)
        out.pop("replayed")
        out.pop("queue_seconds")  # this answer's, not the retry's
        return out

    @classmethod
    def from_record(cls, record: dict, replayed: bool = True) -> "AdaptResult":
        preds = [Prediction(**{**p, "top_k": [Scored(**t) for t in p["top_k"]]}) for p in record["predictions"]]
        return cls(**{**record, "predictions": preds, "replayed": replayed})


@dataclass
class SessionPatch:
    """PATCH /v1/sessions/{id}: what to change (a field not given stays as it is)."""

    guard_given: bool = False
    guard: Optional[dict] = None  # with guard_given: the new guard's settings, None removes it
    frozen: Optional[bool] = None


@dataclass
class RuleInfo:
    """GET /v1/rules: one registered rule as a client may use it here."""

    name: str
    description: str
    needs_labels: bool  # False: label-free (adapts on instances without labels)
    learned: bool  # its parameters were meta-trained offline (fwserve train-rule)
    available: bool  # usable on this server (a learned rule: trained for this backbone)
    reason: Optional[str]  # why not, when not available
    hyperparameters: dict  # name -> {"default", "low", "low_excluded", "high", "flag", "help"}
    base_init: bool  # may start from the backbone's base head (init="base")


@dataclass
class ModelInfo:
    """What the API needs to know of the served backbone."""

    name: str
    img_size: int
    in_chans: int
    embed_dim: int
    base_classes: list[str]
    max_classes: int

"""Request and response bodies of the HTTP API (pydantic v2). Shared by the routes and server/client.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from server.keys import SESSION_ID_PATTERN

HyperValue = Union[bool, float]
Label = Union[StrictInt, str]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- instances -----------------------------------------------------------------------------


class Instance(_Body):
    """One input: exactly one of ``image`` (base64 PNG/JPEG, any size; resized to the backbone's
    input) or ``array`` (nested list of pixel values 0..255, shape ``[H, W]`` or ``[H, W, C]``
    with H = W = the backbone's img_size and C in 1, 3, 4)."""

    image: Optional[str] = Field(None, description="base64-encoded PNG or JPEG")
    array: Optional[list[Any]] = Field(None, description="pixel values 0..255, [H, W] or [H, W, C]")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.image is None) == (self.array is None):
            raise ValueError("an instance needs exactly one of 'image' or 'array'")
        return self


class LabelledInstance(Instance):
    label: Label = Field(..., description="class name (string) or class index (integer)")


class AdaptInstance(Instance):
    label: Optional[Label] = Field(
        None, description="class name (string) or class index (integer); omit it to adapt a label-free "
        "rule (t3a, tent) on the instance itself"
    )


# --- sessions ------------------------------------------------------------------------------


class GuardSpec(_Body):
    """A session's guard (details and defaults: README, "Guards"); only `action` is required."""

    action: Literal["rollback", "freeze", "alert"]
    margin: Optional[float] = Field(None, description="accuracy (a fraction) the session may fall below its "
                                    "reference over a window (default 0.1)")
    window: Optional[int] = Field(None, description="labelled examples (or label-free predictions) compared "
                                  "(default 64)")
    reference: Optional[Union[Literal["base"], StrictInt]] = Field(
        None, description="'base' (the backbone's head) or a version of the session; default: base for sessions "
        "with the base classes, else the version current when the guard is set")
    collapse_share: Optional[float] = Field(None, description="label-free: top-class share of predictions (0.95)")
    entropy_drift: Optional[float] = Field(None, description="label-free: |entropy gap| to the reference (0.5)")
    feature_drift: Optional[float] = Field(None, description="label-free: mean-feature shift bound (off)")
    label_conflict: Optional[float] = Field(None, description="labelled: share of the window's labels the reference "
                                            "predicts otherwise (off)")
    max_examples: Optional[int] = Field(None, description="examples per adapt request")
    max_step_norm: Optional[float] = Field(None, description="norm of one request's head change")
    max_window_norm: Optional[float] = Field(None, description="sum of head-change norms over a window")
    max_lr: Optional[float] = Field(None, description="ceiling on the rule's lr / beta")


class SessionCreate(_Body):
    rule: str = Field(..., description="adaptation rule (GET /v1/rules lists them): sgd, delta, prototype, rls; "
                      "label-free: t3a, tent, feature_stats, feature_stats_t3a, lame; learned: meta_sgd, hyper")
    classes: Optional[list[str]] = Field(
        None, description="label names of the head; default: the backbone's base classes"
    )
    hyperparameters: dict[str, HyperValue] = Field(default_factory=dict)
    id: Optional[str] = Field(None, pattern=SESSION_ID_PATTERN, description="client-chosen id")
    init: Literal["zeros", "base"] = Field(
        "zeros", description="zeros, or base: start from the backbone's base head (classes must match)"
    )
    guard: Optional[GuardSpec] = Field(None, description="watch what the session learns; act when it learns harm")


class Prequential(BaseModel):
    correct: int
    total: int
    accuracy: Optional[float]


class SessionCreated(BaseModel):
    id: str
    version: int


class SessionPatch(_Body):
    guard: Optional[GuardSpec] = Field(None, description="set or replace the guard; null removes it; absent: as is")
    frozen: Optional[StrictBool] = Field(None, description="false unfreezes a frozen session; true freezes it")


class RollbackRequest(_Body):
    version: StrictInt = Field(..., ge=0, description="a retained version; its state becomes current as a new version")


class RolledBack(BaseModel):
    id: str
    version: int = Field(..., description="the new version (history is append-only)")
    rolled_back_to: int


class ForkRequest(_Body):
    id: Optional[str] = Field(None, pattern=SESSION_ID_PATTERN, description="the new session's id")
    version: Optional[StrictInt] = Field(None, ge=0, description="a retained version (default: the current one)")


class VersionEntry(BaseModel):
    version: int
    time: float = Field(..., description="seconds since 1970")
    kind: Literal["create", "adapt", "reset", "import", "rollback", "fork"]
    examples: int
    labelled: int = Field(..., description="examples with a label (0: label-free)")
    key_id: Optional[str] = Field(None, description="id of the API key that applied it (never the key)")
    by: Literal["client", "guard"]
    source: Optional[dict[str, Any]] = Field(None, description="rollback: {version}; fork/import: {session, version}")
    prequential: Prequential = Field(..., description="statistics so far")
    guard: Optional[dict[str, Any]] = Field(None, description="what the session's guard did at this version")


class VersionList(BaseModel):
    session_id: str
    version: int = Field(..., description="the current version")
    retained_from: int = Field(..., description="the oldest version still addressable")
    versions: list[VersionEntry] = Field(..., description="newest first")


class SessionInfo(BaseModel):
    id: str
    rule: str
    hyperparameters: dict[str, HyperValue]
    classes: list[str]
    init: str
    version: int
    examples_seen: int
    prequential: Prequential
    tier: Literal["device", "host", "disk"]
    created_at: datetime
    updated_at: datetime
    frozen: bool = Field(False, description="adapts refused until PATCH unfreezes it")
    guard: Optional[dict[str, Any]] = Field(None, description="the guard's settings")


class SessionSummary(BaseModel):
    id: str
    rule: str
    classes: list[str]
    init: str
    version: int
    tier: Literal["device", "host", "disk"]
    created_at: datetime


class SessionList(BaseModel):
    sessions: list[SessionSummary]
    next_cursor: Optional[str] = Field(None, description="pass as cursor for the next page; null: no more")


class HyperParameter(BaseModel):
    default: float
    low: float = Field(..., description="lower bound")
    low_excluded: bool = Field(..., description="the lower bound itself is not allowed")
    high: Optional[float] = Field(None, description="upper bound (allowed); null: none")
    flag: bool = Field(False, description="a switch: true/false")
    help: str = ""


class RuleInfo(BaseModel):
    name: str
    description: str
    needs_labels: bool = Field(..., description="false: label-free, adapts on instances without labels")
    learned: bool = Field(..., description="its parameters were meta-trained offline for a backbone")
    available: bool = Field(..., description="usable on this server (a learned rule: trained for its backbone)")
    reason: Optional[str] = Field(None, description="why the rule is not available")
    hyperparameters: dict[str, HyperParameter]
    base_init: bool = Field(..., description='may start from the backbone\'s base head (init="base")')


class RuleList(BaseModel):
    rules: list[RuleInfo]


# --- predict / adapt -----------------------------------------------------------------------


class Scored(BaseModel):
    label: str
    index: int
    score: float = Field(..., description="softmax probability over the head's classes")


class Prediction(Scored):
    top_k: list[Scored]


class PrequentialPrediction(Prediction):
    true_label: Optional[str] = Field(None, description="null for an unlabelled instance")
    correct: Optional[bool] = Field(None, description="null for an unlabelled instance")


class PredictRequest(_Body):
    session_id: Optional[str] = Field(None, pattern=SESSION_ID_PATTERN,
                                      description="session whose head answers; default: base head")
    instances: list[Instance] = Field(..., min_length=1)
    top_k: int = Field(1, ge=1)
    support: Optional[list[LabelledInstance]] = Field(
        None,
        min_length=1,
        description="episodic head: adapt a throw-away head on these examples, answer, discard",
    )
    rule: str = Field("prototype", description="episodic head only: its rule")
    hyperparameters: dict[str, HyperValue] = Field(default_factory=dict, description="episodic head only")
    classes: Optional[list[str]] = Field(
        None, description="episodic head only: label names; default: support labels in order of appearance"
    )
    steps: int = Field(1, ge=1, description="episodic head only: passes over the support set")
    version: Optional[StrictInt] = Field(None, ge=0, description="answer from this retained version of the "
                                         "session (changes nothing)")

    @model_validator(mode="after")
    def _session_xor_support(self):
        if self.session_id is not None and self.support is not None:
            raise ValueError("give either session_id or support, not both")
        if self.version is not None and self.session_id is None:
            raise ValueError("version needs a session_id")
        return self


class PredictResponse(BaseModel):
    head: Literal["session", "base", "episodic"]
    session_id: Optional[str]
    version: Optional[int] = Field(None, description="session version used (null for base/episodic)")
    predictions: list[Prediction]
    applied: Optional[int] = Field(
        None, description="sessions with adapt_on_predict: instances the session then adapted on (the "
        "predictions were made before; the session's version is now version + 1)"
    )


class AdaptRequest(_Body):
    session_id: str = Field(..., pattern=SESSION_ID_PATTERN)
    instances: list[AdaptInstance] = Field(..., min_length=1)


class AdaptResponse(BaseModel):
    session_id: str
    version: int = Field(..., description="the session's version after this update")
    applied: int = Field(..., description="examples applied")
    predictions: list[PrequentialPrediction] = Field(..., description="made before the update")
    update_seconds: float = Field(..., description="adaptation latency: the head update's kernel time")
    latency_seconds: float = Field(..., description="time from enqueue to result")
    guard: Optional[dict[str, Any]] = Field(None, description="what the session's guard did after this update "
                                            "(trigger, action; rollback: to, rollback_version)")


# --- Open Inference Protocol v2 --------------------------------------------------------------


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    data: Any = Field(None, description="row-major values; absent when the tensor travels as binary data "
                      "(parameters.binary_data_size)")
    parameters: Optional[dict[str, Any]] = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[InferTensor] = Field(..., min_length=1)
    outputs: Optional[list[dict[str, Any]]] = None


class InferResponse(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[InferTensor]


class V2Error(BaseModel):
    """The protocol's error body (every /v2 route)."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]

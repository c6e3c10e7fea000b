"""The engine: batching, one micro-batch's execution, the feature cache and metrics, behind a
facade of plain messages (``Engine``; server/engine/messages.py). It receives decoded tensors
and content hashes, never request bodies, and raises domain errors, never HTTP statuses."""

from server.engine.engine import Engine, episodic_labels, resolve_episodic
from server.engine.messages import (
    AdaptJob, AdaptResult, EpisodicJob, Input, ModelInfo, Prediction, PredictJob, PredictResult, RuleInfo, Scored,
    SessionPatch,
)
from server.sessions import SessionInfo

__all__ = ["AdaptJob", "AdaptResult", "Engine", "EpisodicJob", "Input", "ModelInfo", "Prediction", "PredictJob",
           "PredictResult", "RuleInfo", "Scored", "SessionInfo", "SessionPatch", "episodic_labels", "resolve_episodic"]

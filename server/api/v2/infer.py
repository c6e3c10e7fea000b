"""One inference request of the Open Inference Protocol, whatever carried it (HTTP JSON, HTTP
binary, gRPC): parameters, inputs -> an engine job -> output tensors and response parameters.

Parameters understood:
    session_id      the session whose head answers (default: the base head)
    sequence_id     Triton's sequence id, an alias of session_id (a number or a string; 0 or ""
                    is none); sequence_start / sequence_end are accepted and have no effect: a
                    session outlives its sequence
    top_k           1..--max-top-k (predict only); > 1 adds the top_k_* outputs
    session_version a retained version of the session to answer from (predict only; changes
                    nothing); the response's session_version says which version answered
    binary_data_output  HTTP: every output binary unless an output says otherwise
    priority, timeout   Triton scheduling hints, accepted and ignored (--request-timeout-s applies)
Anything else is refused (422), so a misspelt parameter does not pass silently.

Inputs: one image tensor (named ``image``; any name but ``label`` is taken for it) and, to adapt,
a ``label`` tensor: then the request is an adapt of the session, test-then-train: the outputs
are the predictions made before the update (and ``correct``), the parameters carry the new
``session_version`` and ``applied``. Over HTTP an ``Idempotency-Key`` header makes an adapt's
retry safe, as on /v1/adapt (gRPC: the ``idempotency-key`` metadata).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from server.api.access import AccessRecord
from server.api.auth import Principal
from server.api.context import Api, fingerprint
from server.api.v2.model import OUTPUTS
from server.api.v2.tensors import Output, Tensor
from server.engine import AdaptJob, PredictJob
from server.errors import invalid
from server.keys import SESSION_ID_PATTERN

SESSION_ID = re.compile(SESSION_ID_PATTERN)

IGNORED_PARAMETERS = ("sequence_start", "sequence_end", "priority", "timeout")
PARAMETERS = ("session_id", "sequence_id", "top_k", "binary_data_output", "session_version",
              *IGNORED_PARAMETERS)
OUTPUT_TYPES = {n: t for n, t, _ in OUTPUTS}


@dataclass
class Options:
    session_id: Optional[str]
    top_k: int
    binary_output: bool
    version: Optional[int] = None


@dataclass
class Requested:
    """A requested output; binary: its parameters.binary_data (None: the request's default)."""

    name: str
    binary: Optional[bool] = None


@dataclass
class Outcome:
    outputs: list[Output]
    parameters: dict[str, Any]
    replayed: bool = False


def options(params: Optional[dict]) -> Options:
    params = params or {}
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise invalid("invalid_parameters", f"unknown parameters {unknown}; understood: {', '.join(PARAMETERS)}")
    sid = params.get("session_id")
    if sid is not None and not isinstance(sid, str):
        raise invalid("invalid_parameters", "parameters.session_id must be a string")
    seq = params.get("sequence_id")
    if seq is not None:
        if isinstance(seq, bool) or not isinstance(seq, (int, str)) or (isinstance(seq, int) and seq < 0):
            raise invalid("invalid_parameters", "parameters.sequence_id must be a non-negative integer or a string")
        seq = None if seq in (0, "") else str(seq)
        if sid is not None and seq is not None and seq != sid:
            raise invalid("invalid_parameters", "parameters.session_id and sequence_id name different sessions")
        sid = sid if sid is not None else seq
    if sid is not None and not SESSION_ID.match(sid):
        raise invalid("invalid_parameters", f"a session id matches {SESSION_ID_PATTERN}")
    top_k = params.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise invalid("invalid_parameters", "parameters.top_k must be a positive integer")
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise invalid("invalid_parameters", "parameters.binary_data_output must be a boolean")
    version = params.get("session_version")
    if version is not None:
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise invalid("invalid_parameters", "parameters.session_version must be a non-negative integer")
        if sid is None:
            raise invalid("invalid_parameters", "parameters.session_version needs a session_id (or sequence_id)")
    return Options(sid, top_k, binary, version)


def requested_outputs(outputs: Optional[list[dict]]) -> Optional[list[Requested]]:
    """Requested outputs as the request lists them ({name, parameters?}), validated."""
    if outputs is None:
        return None
    out, seen = [], set()
    for i, o in enumerate(outputs):
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str):
            raise invalid("invalid_outputs", f"outputs[{i}] needs a name")
        if name not in OUTPUT_TYPES:
            raise invalid("unknown_output", f"unknown output {name!r}; this model has {', '.join(OUTPUT_TYPES)}")
        if name in seen:
            raise invalid("invalid_outputs", f"output {name!r} is requested twice")
        seen.add(name)
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid("invalid_outputs", f"outputs[{i}].parameters must be an object")
        if "classification" in params:
            raise invalid("unsupported", "the classification extension is not supported; request top_k_label and "
                          "top_k_score with parameters.top_k instead")
        if any(k.startswith("shared_memory") for k in params):
            raise invalid("unsupported", "the shared-memory extensions are not supported")
        unknown = set(params) - {"binary_data"}
        if unknown:
            raise invalid("invalid_outputs", f"outputs[{i}]: unknown parameters {sorted(unknown)}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise invalid("invalid_outputs", f"outputs[{i}].parameters.binary_data must be a boolean")
        out.append(Requested(name, binary))
    return out


async def infer(api: Api, p: Principal, inputs: list[Tensor], opts: Options,
                requested: Optional[list[Requested]], idempotency_key: Optional[str],
                rec: AccessRecord, deadline: Optional[float] = None) -> Outcome:
    """`deadline` (time.monotonic()): when the request's time is up; default --request-timeout-s from now."""
    if deadline is None:
        deadline = time.monotonic() + api.settings.request_timeout_s
    labels = [i for i, t in enumerate(inputs) if t.name == "label"]
    images = [i for i, t in enumerate(inputs) if t.name != "label"]
    if len(images) != 1 or len(labels) > 1:
        raise invalid("invalid_inputs", "expected one image input tensor ('image') and, to adapt a session, one "
                      f"'label' tensor; got {[t.name for t in inputs]}")
    api.check_top_k(opts.top_k)
    img = inputs[images[0]]
    x = await api.decode(api.decoder.tensor, img.datatype, img.shape, img.data, f"inputs[{images[0]}]",
                         deadline=deadline)
    key = p.key(opts.session_id)
    rec.update(session_key=key, rows=len(x))
    names = [r.name for r in requested] if requested is not None else None
    if not labels and names and "correct" in names:  # refused before anything runs
        raise invalid("unknown_output", "output 'correct' is only produced by an adapt (a request with a label "
                      "input)")
    if labels:
        if key is None:
            raise invalid("missing_session", "a label input adapts a session: give parameters.session_id (or "
                          "sequence_id)")
        if opts.top_k > 1:
            raise invalid("invalid_parameters", "top_k applies to predictions; an adapt answers its top-1 "
                          "pre-update predictions")
        if opts.version is not None:
            raise invalid("invalid_parameters", "parameters.session_version names a version to predict with; "
                          "an adapt always updates the current one")
        lab = inputs[labels[0]]
        ys = api.decoder.labels(lab.datatype, lab.shape, lab.data, len(x), f"inputs[{labels[0]}]")
        idem = None
        if idempotency_key is not None:  # the request as content, whatever its encoding (JSON, binary, gRPC)
            idem = (idempotency_key, fingerprint({"session_id": opts.session_id,
                                                  "instances": [[i.key, y] for i, y in zip(x, ys)]}))
        res = await api.engine.adapt(AdaptJob(key, x, ys, idem, tenant=p.tenant, deadline=deadline, actor=p.key_id))
        rec.update(queue_seconds=res.queue_seconds)
        preds = res.predictions
        available = _prediction_outputs(preds, 1)
        available["correct"] = Output("correct", "BOOL", [len(preds)], [bool(q.correct) for q in preds])
        default = ["label", "label_index", "score", "correct"]
        params = {"session_id": res.session_id, "session_version": res.version, "applied": res.applied}
        return Outcome(_select(available, names or default), params, res.replayed)
    res = await api.engine.predict(PredictJob(x, session=key, top_k=opts.top_k, tenant=p.tenant, deadline=deadline,
                                              version=opts.version))
    rec.update(queue_seconds=res.queue_seconds)
    available = _prediction_outputs(res.predictions, opts.top_k)
    default = ["label", "label_index", "score"] + (["top_k_label", "top_k_index", "top_k_score"]
                                                   if opts.top_k > 1 else [])
    params = {k: v for k, v in (("session_id", res.session_id), ("session_version", res.version),
                                ("applied", res.applied)) if v is not None}
    return Outcome(_select(available, names or default), params)


def _prediction_outputs(preds, top_k: int) -> dict[str, Output]:
    B = len(preds)
    k = min([top_k] + [len(q.top_k) for q in preds])
    return {
        "label": Output("label", "BYTES", [B], [q.label for q in preds]),
        "label_index": Output("label_index", "INT64", [B], [q.index for q in preds]),
        "score": Output("score", "FP32", [B], [q.score for q in preds]),
        "top_k_label": Output("top_k_label", "BYTES", [B, k], [t.label for q in preds for t in q.top_k[:k]]),
        "top_k_index": Output("top_k_index", "INT64", [B, k], [t.index for q in preds for t in q.top_k[:k]]),
        "top_k_score": Output("top_k_score", "FP32", [B, k], [t.score for q in preds for t in q.top_k[:k]]),
    }


def _select(available: dict[str, Output], names: list[str]) -> list[Output]:
    return [available[n] for n in names]

"""The engine seam on the wire: the messages of server/engine/messages.py (and the engine's other
arguments and answers) as one JSON header plus raw buffers, for API worker processes talking to
the engine process (server/engine/remote.py).

    header, buffers = encode(value)      # buffers: tensors' and bytes' memory, not copied
    value = decode(header, frames)       # tensors are views of the received frames

Plain JSON values travel as themselves. Everything else is a tagged object: dataclasses of the
engine's vocabulary by name, tuples, tensors and bytes as an index into the buffers, and domain
errors by class, code, message and retry_after, so the other side raises the same error.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import orjson
import torch

from server import errors
from server.engine import messages
from server.sessions import SessionInfo

_DATACLASSES = {c.__name__: c for c in (
    messages.Input, messages.PredictJob, messages.AdaptJob, messages.EpisodicJob, messages.Scored,
    messages.Prediction, messages.PredictResult, messages.AdaptResult, messages.ModelInfo,
    messages.RuleInfo, SessionInfo)}
_ERRORS = {c.__name__: c for c in (
    errors.DomainError, errors.InvalidInput, errors.NotFound, errors.Conflict, errors.QuotaExceeded,
    errors.Unavailable, errors.TimedOut, errors.Internal)}
SMALL_FRAME_BYTES = 1 << 16
_FIELDS = {c: tuple(f.name for f in dataclasses.fields(c)) for c in _DATACLASSES.values()}
_PLAIN = frozenset({type(None), bool, int, float, str})
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
           torch.uint8: "uint8"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def encode(value: Any) -> tuple[bytes, list]:
    buffers: list = []
    return orjson.dumps(_pack(value, buffers)), buffers


def decode(header: bytes, frames: list) -> Any:
    return _unpack(orjson.loads(header), frames)


def encode_error(e: BaseException) -> bytes:
    if isinstance(e, errors.DomainError) and type(e).__name__ in _ERRORS:
        return orjson.dumps({"n": type(e).__name__, "code": e.code, "message": e.message,
                             "retry_after": e.retry_after})
    return orjson.dumps({"n": "Internal", "code": "internal", "message": "the engine failed to run this request; "
                         "nothing was changed", "retry_after": None})


def decode_error(payload: bytes) -> errors.DomainError:
    d = orjson.loads(payload)
    return _ERRORS.get(d["n"], errors.Internal)(d["code"], d["message"], d["retry_after"])


def _pack(v: Any, buffers: list) -> Any:
    kind = type(v)
    if kind in _PLAIN:  # exact types first: most of a result is labels and scores
        return v
    names = _FIELDS.get(kind)
    if names is not None:
        return {"__t": "dc", "n": kind.__name__, "f": {f: _pack(getattr(v, f), buffers) for f in names}}
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_pack(x, buffers) for x in v]
    if isinstance(v, tuple):
        return {"__t": "tuple", "v": [_pack(x, buffers) for x in v]}
    if isinstance(v, dict):
        return {"__t": "dict", "v": [[k, _pack(x, buffers)] for k, x in v.items()]}
    if isinstance(v, torch.Tensor):
        t = v.detach() if v.requires_grad else v  # checks first: each torch call costs more than they do
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        buffers.append(t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy())
        return {"__t": "tensor", "i": len(buffers) - 1, "s": list(t.shape), "d": _DTYPES[t.dtype]}
    if isinstance(v, (bytes, bytearray, memoryview)):
        buffers.append(v)
        return {"__t": "bytes", "i": len(buffers) - 1}
    raise TypeError(f"cannot send a {kind.__name__} across the engine seam")


def _unpack(v: Any, frames: list) -> Any:
    kind = type(v)
    if kind is list:
        return [_unpack(x, frames) for x in v]
    if kind is not dict:
        return v
    tag = v.get("__t")
    if tag == "dc":
        cls = _DATACLASSES[v["n"]]
        return cls(**{k: _unpack(x, frames) for k, x in v["f"].items()})
    if tag == "tuple":
        return tuple(_unpack(x, frames) for x in v["v"])
    if tag == "dict":
        return {k: _unpack(x, frames) for k, x in v["v"]}
    if tag == "bytes":
        return bytes(_buffer(frames[v["i"]]))
    if tag == "tensor":
        return _tensor(_buffer(frames[v["i"]]), _TORCH[v["d"]]).reshape(v["s"])
    raise ValueError(f"unknown tag {tag!r} on the engine seam")


def _tensor(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-d tensor over a received frame. A small frame is copied into writable memory (less
    work than silencing torch's read-only warning); a large one is used in place (read-only:
    the engine only reads pixels)."""
    if not len(buf):
        return torch.empty(0, dtype=dtype)
    if buf.nbytes < SMALL_FRAME_BYTES:
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(buf, dtype=torch.uint8)
    return raw.view(dtype)


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


__all__ = ["decode", "decode_error", "encode", "encode_error"]

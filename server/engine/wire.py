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
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_pack(x, buffers) for x in v]
    if isinstance(v, tuple):
        return {"__t": "tuple", "v": [_pack(x, buffers) for x in v]}
    if isinstance(v, dict):
        return {"__t": "dict", "v": [[k, _pack(x, buffers)] for k, x in v.items()]}
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        buffers.append(t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy())
        return {"__t": "tensor", "i": len(buffers) - 1, "s": list(t.shape), "d": _DTYPES[t.dtype]}
    if isinstance(v, (bytes, bytearray, memoryview)):
        buffers.append(v)
        return {"__t": "bytes", "i": len(buffers) - 1}
    if dataclasses.is_dataclass(v) and type(v).__name__ in _DATACLASSES:
        return {"__t": "dc", "n": type(v).__name__,
                "f": {f.name: _pack(getattr(v, f.name), buffers) for f in dataclasses.fields(v)}}
    raise TypeError(f"cannot send a {type(v).__name__} across the engine seam")


def _unpack(v: Any, frames: list) -> Any:
    if isinstance(v, list):
        return [_unpack(x, frames) for x in v]
    if not isinstance(v, dict):
        return v
    tag = v.get("__t")
    if tag == "tuple":
        return tuple(_unpack(x, frames) for x in v["v"])
    if tag == "dict":
        return {k: _unpack(x, frames) for k, x in v["v"]}
    if tag == "bytes":
        return bytes(_buffer(frames[v["i"]]))
    if tag == "tensor":
        buf, dtype = _buffer(frames[v["i"]]), _TORCH[v["d"]]
        with warnings.catch_warnings():  # a received frame is read-only: the engine only reads pixels
            warnings.simplefilter("ignore", UserWarning)
            if dtype == torch.bfloat16:
                t = torch.frombuffer(buf, dtype=torch.uint8).view(torch.bfloat16)
            else:
                t = torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)
        return t.reshape(v["s"])
    if tag == "dc":
        cls = _DATACLASSES[v["n"]]
        return cls(**{k: _unpack(x, frames) for k, x in v["f"].items()})
    raise ValueError(f"unknown tag {tag!r} on the engine seam")


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


__all__ = ["decode", "decode_error", "encode", "encode_error"]

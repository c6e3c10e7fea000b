"""Tensors as the Open Inference Protocol carries them, and the binary tensor extension of its
HTTP form.

Binary tensor extension: a request whose header ``Inference-Header-Content-Length: N`` is
present has a JSON inference header in its first N body bytes, followed by the raw data of
every input whose ``parameters.binary_data_size`` is set, in input order. A response is binary
the same way when an output is asked for binary (``parameters.binary_data_output: true`` on the
request, or ``parameters.binary_data`` on a requested output, which wins): its JSON header lists
the output with ``parameters.binary_data_size`` and no ``data``, its bytes follow the header.
Raw data is row-major and little-endian; a BYTES element is a 4-byte little-endian length and
then its bytes; BOOL is one byte per element.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from server.api.errors import bad_request
from server.api.schemas import InferRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT_DTYPES = {"BYTES": None, "BOOL": "?", "INT64": "<i8", "FP32": "<f4"}


@dataclass
class Tensor:
    """One input tensor: its data raw (bytes, binary) or a list (JSON, gRPC typed contents)."""

    name: str
    datatype: str
    shape: list[int]
    data: Union[bytes, list]


@dataclass
class Output:
    """One output tensor; data in row-major order (str for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: list

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return join_bytes([v.encode() if isinstance(v, str) else bytes(v) for v in self.data])
        return np.asarray(self.data, dtype=OUTPUT_DTYPES[self.datatype]).tobytes()

    def json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape, "data": self.data}


def join_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements -> their binary form (each: uint32 little-endian length, then its bytes)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# ---- HTTP requests ---------------------------------------------------------------------------


def split_body(body: bytes, header_length: Optional[str]) -> tuple[Any, bytes]:
    """The JSON inference header (parsed, not yet validated) and the binary data after it."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise bad_request("invalid_header_length", f"{HEADER_LENGTH} must be the byte length of the JSON "
                              f"header, at most the body's {len(body)} bytes; got {header_length!r}")
        n = int(header_length)
        head, tail = body[:n], body[n:]
    try:
        return json.loads(head), tail
    except (ValueError, UnicodeDecodeError):
        raise bad_request("invalid_json", "the inference header is not valid JSON") from None


def inputs_of(req: InferRequest, tail: bytes) -> list[Tensor]:
    """Each input with its data: the next binary_data_size bytes of the tail, or its JSON data."""
    out, at = [], 0
    for i, t in enumerate(req.inputs):
        params = t.parameters or {}
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request("invalid_binary_data", f"inputs[{i}].parameters.binary_data_size must be a "
                                  "non-negative integer")
            if t.data is not None:
                raise bad_request("invalid_binary_data", f"inputs[{i}] has both data and binary_data_size")
            if at + size > len(tail):
                raise bad_request("invalid_binary_data", f"inputs[{i}]: binary_data_size {size} runs past the "
                                  f"{len(tail)} bytes of binary data")
            out.append(Tensor(t.name, t.datatype, list(t.shape), tail[at:at + size]))
            at += size
        else:
            if t.data is None:
                raise bad_request("invalid_inputs", f"inputs[{i}] has no data (nor binary_data_size)")
            if any(k.startswith("shared_memory") for k in params):
                raise bad_request("unsupported", "the shared-memory extensions are not supported")
            out.append(Tensor(t.name, t.datatype, list(t.shape), t.data))
    if at != len(tail):
        raise bad_request("invalid_binary_data", f"{len(tail) - at} bytes of binary data follow the inputs' "
                          "binary_data_size total")
    return out


# ---- HTTP responses --------------------------------------------------------------------------


def encode_response(header: dict, outputs: list[Output], binary: list[bool]) -> tuple[bytes, Optional[int]]:
    """The response body, and the JSON header's length when any output is binary (else None)."""
    tensors, blobs = [], []
    for out, as_binary in zip(outputs, binary):
        if as_binary:
            raw = out.raw()
            blobs.append(raw)
            tensors.append({"name": out.name, "datatype": out.datatype, "shape": out.shape,
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            tensors.append(out.json())
    head = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)

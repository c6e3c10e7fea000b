"""How the Python client puts instances and tensors on the wire (server/client.py): /v1 bodies as
JSON or as raw tensor bytes (the /v1 binary input path), and Open Inference Protocol tensors as
JSON or with the binary tensor extension, both ways."""

from __future__ import annotations

import base64
import json
import struct
from typing import Callable, Optional, Sequence

import httpx
import numpy as np

from server.api.schemas import InferResponse

HEADER_LENGTH = "Inference-Header-Content-Length"


# ---- how instances travel on /v1 ------------------------------------------------------------


def _json_instances(path: str, body: dict) -> dict:
    """The /v1 JSON bodies as they are (instances as {"image": b64} / {"array": [...]})."""
    return {"json": body}


def _binary_instances(path: str, body: dict) -> dict:
    """The /v1 binary input path (raw tensor bytes, server/api/binary.py): arrays of one shape as
    UINT8 (integral 0..255) or FP32 pixels, encoded images as BYTES elements. Anything else
    (an episodic support set, a mix) travels as JSON."""
    insts = body["instances"]
    if "support" in body or not insts:
        return {"json": body}
    headers = {"content-type": "application/octet-stream"}
    if body.get("session_id") is not None:
        headers["x-session-id"] = body["session_id"]
    if body.get("top_k", 1) != 1:
        headers["x-top-k"] = str(body["top_k"])
    if body.get("version") is not None:
        headers["x-version"] = str(body["version"])
    if path == "/v1/adapt":
        headers["x-labels"] = json.dumps([i.get("label") for i in insts])
    if all("array" in i for i in insts):
        try:
            arr = np.asarray([i["array"] for i in insts], dtype=np.float32)
        except ValueError:  # ragged
            return {"json": body}
        whole = bool(np.all(arr == np.rint(arr)) and arr.min() >= 0 and arr.max() <= 255)
        arr = arr.astype(np.uint8) if whole else arr
        headers.update({"x-shape": ",".join(str(n) for n in arr.shape), "x-datatype": "UINT8" if whole else "FP32"})
        return {"content": arr.tobytes(), "headers": headers}
    if all("image" in i for i in insts):
        blobs = [base64.b64decode(i["image"]) for i in insts]
        headers.update({"x-shape": str(len(blobs)), "x-datatype": "BYTES"})
        return {"content": b"".join(struct.pack("<I", len(b)) + b for b in blobs), "headers": headers}
    return {"json": body}


# encoding name -> (path, JSON body) -> keyword arguments of the request (json= or content= + headers=)
V1_ENCODINGS: dict[str, Callable[[str, dict], dict]] = {"json": _json_instances, "binary": _binary_instances}


# ---- the Open Inference Protocol (/v2) -----------------------------------------------------

_NP_TYPES = {"UINT8": "<u1", "INT64": "<i8", "FP32": "<f4", "FP64": "<f8", "BOOL": "?", "UINT16": "<u2",
             "INT32": "<i4", "FP16": "<f2"}


def _bytes_tensor(values: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _bytes_values(raw: bytes) -> list[str]:
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + n].decode("utf-8", "replace"))
        at += 4 + n
    return out


def _tensor(name: str, values, datatype: Optional[str], binary: bool) -> tuple[dict, Optional[bytes]]:
    """An input tensor's JSON entry, and its raw data when binary."""
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], (bytes, bytearray, str)):
        elems = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        entry = {"name": name, "shape": [len(elems)], "datatype": "BYTES"}
        if binary:
            raw = _bytes_tensor(elems)
            return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
        data = [v if isinstance(v, str) else base64.b64encode(bytes(v)).decode() for v in values] \
            if name != "label" else [e.decode() for e in elems]
        return {**entry, "data": data}, None
    arr = np.asarray(values)
    datatype = datatype or ("INT64" if arr.dtype.kind in "iu" else "FP32")
    entry = {"name": name, "shape": list(arr.shape), "datatype": datatype}
    if binary:
        raw = np.ascontiguousarray(arr, dtype=_NP_TYPES[datatype]).tobytes()
        return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**entry, "data": arr.reshape(-1).tolist()}, None


def _infer_response(r: httpx.Response):
    """An infer response (JSON, or the binary extension) -> InferResponse with every output's data."""
    n = r.headers.get(HEADER_LENGTH.lower())
    if n is None:
        return InferResponse.model_validate(r.json())
    body = r.content
    head, at = json.loads(body[:int(n)]), int(n)
    for out in head.get("outputs", []):
        size = (out.get("parameters") or {}).pop("binary_data_size", None)
        if size is None:
            continue
        raw = body[at:at + size]
        at += size
        out["data"] = (_bytes_values(raw) if out["datatype"] == "BYTES"
                       else np.frombuffer(raw, dtype=_NP_TYPES[out["datatype"]]).tolist())
    return InferResponse.model_validate(head)

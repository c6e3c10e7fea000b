"""The /v1 binary input path: raw tensor bytes instead of JSON, for clients that care about the
request path's cost (no base64, no nested lists, no JSON parse of pixel data).

    POST /v1/predict | /v1/adapt
    Content-Type: application/octet-stream
    X-Shape: N,H,W  or  N,H,W,C      the batch of images (required)
    X-Datatype: UINT8 (default), UINT16, FP32, ... or BYTES (N encoded PNG/JPEG images, each
                                     a 4-byte little-endian length then its bytes)
    X-Session-ID: <id>               the session (predict: absent = the base head)
    X-Top-K: <k>                     predict only (default 1)
    X-Version: <n>                   predict only: answer from this retained version
    X-Labels: ["7", "5"] or 7,5      adapt only: one label per image (class names, or indices as
                                     JSON numbers); JSON when it starts with "["
    Idempotency-Key                  as on the JSON path

The body is decoded by the same ``Decoder.tensor`` the Open Inference Protocol's binary tensor
extension uses, so a binary request and its JSON twin give the same inputs (content hashes and
pixels), the same predictions and the same versions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from server.errors import invalid
from server.keys import SESSION_ID_PATTERN

_SESSION = re.compile(SESSION_ID_PATTERN)


@dataclass
class BinaryRequest:
    shape: list[int]
    datatype: str
    session_id: Optional[str]
    top_k: int
    labels: Optional[list]
    version: Optional[int] = None  # X-Version: predict at a retained version


def parse_headers(headers, adapt: bool) -> BinaryRequest:
    raw_shape = headers.get("x-shape")
    if not raw_shape:
        raise invalid("invalid_binary", "a binary body needs X-Shape: N,H,W or N,H,W,C")
    try:
        shape = [int(v) for v in raw_shape.split(",")]
    except ValueError:
        raise invalid("invalid_binary", f"X-Shape {raw_shape[:64]!r} is not comma-separated integers") from None
    datatype = headers.get("x-datatype", "UINT8").strip().upper()
    sid = headers.get("x-session-id")
    if sid is not None and not _SESSION.match(sid):
        raise invalid("invalid_binary", f"X-Session-ID must match {SESSION_ID_PATTERN}")
    if adapt and sid is None:
        raise invalid("invalid_binary", "a binary adapt needs X-Session-ID")
    top_k = headers.get("x-top-k", "1")
    if not top_k.isdigit() or int(top_k) < 1:
        raise invalid("invalid_binary", "X-Top-K must be a positive integer")
    version = headers.get("x-version")
    if version is not None:
        if adapt or not version.isdigit():
            raise invalid("invalid_binary", "X-Version is a non-negative integer, on a predict only")
        if sid is None:
            raise invalid("invalid_binary", "X-Version needs X-Session-ID")
        version = int(version)
    labels = None
    if adapt:
        text = headers.get("x-labels")
        if text is None:
            raise invalid("invalid_binary", "a binary adapt needs X-Labels (one label per image)")
        labels = _labels(text)
        if shape and len(labels) != shape[0]:
            raise invalid("invalid_binary", f"{len(labels)} labels for {shape[0]} images")
    return BinaryRequest(shape, datatype, sid, int(top_k), labels, version)


def _labels(text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            out = json.loads(text)
        except ValueError:
            raise invalid("invalid_binary", "X-Labels is not a JSON array") from None
        if not isinstance(out, list) or not all(
                isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) or v is None for v in out):
            raise invalid("invalid_binary", "X-Labels holds class names, class indices or null (unlabelled)")
        return out
    return [v.strip() for v in text.split(",")]

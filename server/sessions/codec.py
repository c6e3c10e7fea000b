"""Byte formats of a session: exports and store snapshots, and write-ahead-log records.

Both are safetensors blobs whose metadata holds one JSON object under ``"fwserve"``:

- an **export** / **snapshot** (``fwserve-session/2``): tensors ``W [n, d]``, ``b [n]`` and the
  rule's state; metadata: backbone, embed_dim, the sha256 of the backbone's weights
  (``weights``), the session's rule, hyper-parameters, classes, init, version and statistics. A
  store snapshot adds its key, incarnation and idempotency entries (``internal``).
- a **log record** (``fwserve-wal/2``): one adapt, with the weights' sha256 (``w``): for every
  head-update call it took part in,
  this session's rows ``x{i}``, ``y{i}`` and the row counts of the other sessions of that call
  (``others``: the torch kernels choose their code path from the call's shape; replay rebuilds
  it with kernels.replay_slots); plus the adapt's statistics, its Idempotency-Key entry and its
  history entry (``info``: who applied it, the statistics so far, what the guard did).
- a **state record** (``fwserve-wal-state/1``): a version whose state is not computed from the
  one before (reset, import, rollback): the whole state as tensors ``s.W``, ``s.b``, ``s.<rule
  state>``, the statistics it starts from (``stats``), its history entry and Idempotency-Key
  entry. A release that does not know the format refuses the log instead of misreading it.

Decoding raises ``CodecError`` (a ValueError) on anything that is not such a blob. The /1 formats
of the first release (no weights fingerprint) are read as well; tests/server/sessions/fixtures
holds a store and exports written by it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

EXPORT_FORMAT = "fwserve-session/2"
RECORD_FORMAT = "fwserve-wal/2"
STATE_FORMAT = "fwserve-wal-state/1"
# formats this release reads: /1 (the first release: no weights fingerprint) and /2
EXPORT_FORMATS = ("fwserve-session/1", EXPORT_FORMAT)
RECORD_FORMATS = ("fwserve-wal/1", RECORD_FORMAT, STATE_FORMAT)


class CodecError(ValueError):
    """Bytes that are not a fwserve session export, snapshot or log record."""


def encode(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"fwserve": json.dumps(meta)})


def read_meta(data: bytes) -> dict:
    """The fwserve JSON metadata of a blob (header only, no tensor is read)."""
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["fwserve"])
    except Exception:
        raise CodecError("not a fwserve safetensors blob") from None
    if not isinstance(meta, dict):
        raise CodecError("fwserve metadata is not an object")
    return meta


def decode(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a blob."""
    meta = read_meta(data)
    try:
        tensors = st_load(data)
    except Exception:
        raise CodecError("unreadable safetensors tensors") from None
    return meta, tensors


def snapshot_head(data: bytes) -> tuple[str, int]:
    """(incarnation, version) of a store snapshot."""
    m = read_meta(data)
    return str(m["incarnation"]), int(m["version"])


def record_head(data: bytes) -> tuple[str, int]:
    """(incarnation, version) of a log record."""
    m = read_meta(data)
    return str(m["inc"]), int(m["v"])


Step = tuple[torch.Tensor, torch.Tensor, list]  # this session's rows x [m, d], y [m]; the others' row counts


@dataclass
class Record:
    """One version as logged: an adapt (its head-update steps and statistics) or, with `state`,
    a state record (the whole state of a reset, import or rollback)."""

    version: int
    n: int
    correct: int
    labelled: int
    t: float
    steps: list[Step]
    idem: Optional[dict] = None  # {"key", "fp", "expires", "response"}
    weights: Optional[str] = None  # sha256 of the backbone weights it was computed with (None: a /1 record)
    info: dict = field(default_factory=dict)  # the version's history entry (server/sessions/history.py)
    state: Optional[dict[str, torch.Tensor]] = None  # state records: the session's tensors
    stats: Optional[tuple[int, int, int]] = None  # state records: (seen, correct, total) it starts from

    def encode(self, inc: str) -> bytes:
        meta = {"inc": inc, "v": self.version, "t": self.t, "idem": self.idem, "w": self.weights}
        if self.info:
            meta["info"] = self.info
        if self.state is not None:
            meta.update(format=STATE_FORMAT, stats=list(self.stats or (0, 0, 0)))
            return encode({f"s.{k}": v for k, v in self.state.items()}, meta)
        tensors = {}
        for i, (x, y, _) in enumerate(self.steps):
            tensors[f"x{i}"], tensors[f"y{i}"] = x, y
        meta.update(format=RECORD_FORMAT, n=self.n, correct=self.correct, labelled=self.labelled,
                    steps=len(self.steps), others=[o for _, _, o in self.steps])
        return encode(tensors, meta)

    @classmethod
    def decode(cls, data: bytes) -> tuple[str, "Record"]:
        """(incarnation, record)."""
        m, t = decode(data)
        if m.get("format") not in RECORD_FORMATS:
            raise CodecError(f"log record format {m.get('format')!r} is none of {RECORD_FORMATS}")
        try:
            info = m.get("info") or {}
            if not isinstance(info, dict):
                raise TypeError
            if m["format"] == STATE_FORMAT:
                state = {k[2:]: v for k, v in t.items() if k.startswith("s.")}
                seen, correct, total = (int(v) for v in m["stats"])
                return str(m["inc"]), cls(int(m["v"]), 0, 0, 0, float(m["t"]), [], m.get("idem"), m.get("w"),
                                          info, state, (seen, correct, total))
            k = int(m["steps"])
            others = m.get("others") or [[]] * k
            steps = [(t[f"x{i}"], t[f"y{i}"], [int(c) for c in others[i]]) for i in range(k)]
            return str(m["inc"]), cls(int(m["v"]), int(m["n"]), int(m["correct"]), int(m.get("labelled", m["n"])),
                                      float(m["t"]), steps, m.get("idem"), m.get("w"), info)
        except (KeyError, TypeError, ValueError, IndexError):
            raise CodecError("malformed log record") from None

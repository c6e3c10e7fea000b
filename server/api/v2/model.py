"""What the Open Inference Protocol says about the served model: metadata, configuration, the
extensions implemented. One description for HTTP and gRPC.

The model is the backbone (``--backbone``, e.g. ``fwserve-mnist-vit``), version ``1``. Its head
is the base head, or a session's head with ``parameters.session_id``.

Inputs: ``image`` (pixels, a numeric datatype, ``[B, S, S]`` or ``[B, S, S, C]``; or BYTES
``[B]`` of PNG/JPEG) and, to adapt a session, ``label`` (BYTES class names or INT64 indices, ``[B]``).
Outputs: ``label``, ``label_index``, ``score``; with ``top_k`` > 1 also ``top_k_label``,
``top_k_index``, ``top_k_score`` ``[B, k]``; an adapt adds ``correct`` (its pre-update
predictions against the labels).
"""

from __future__ import annotations

from typing import Optional

from server import __version__
from server.api.errors import model_not_found, version_not_found

VERSION = "1"
PLATFORM = "pytorch"
# exactly what this server implements (Triton's names for them)
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters"]

OUTPUTS = [  # name, datatype, shape (-1: batch or k)
    ("label", "BYTES", [-1]),
    ("label_index", "INT64", [-1]),
    ("score", "FP32", [-1]),
    ("top_k_label", "BYTES", [-1, -1]),
    ("top_k_index", "INT64", [-1, -1]),
    ("top_k_score", "FP32", [-1, -1]),
    ("correct", "BOOL", [-1]),
]
_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}


def check_model(served: str, name: str, version: Optional[str] = None) -> str:
    """The model name when it is the one served (and the version is 1), else 404."""
    if name != served:
        raise model_not_found(name, served)
    if version is not None and version != VERSION:
        raise version_not_found(name, version)
    return name


def server_metadata() -> dict:
    return {"name": "fwserve", "version": __version__, "extensions": list(EXTENSIONS)}


def image_dims(model) -> list[int]:
    s = model.img_size
    return [s, s] if model.in_chans == 1 else [s, s, model.in_chans]


def metadata(model) -> dict:
    return {"name": model.name, "versions": [VERSION], "platform": PLATFORM,
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *image_dims(model)]},
                       {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in OUTPUTS]}


def config(model, max_batch_size: int, max_top_k: int) -> dict:
    """The model configuration, in the field names of Triton's model_config.proto (dims without
    the batch dimension, as max_batch_size > 0 says)."""
    outputs = []
    for n, t, s in OUTPUTS:
        per_row = {"dims": [1], "reshape": {"shape": []}} if len(s) == 1 else {"dims": [-1]}
        outputs.append({"name": n, "data_type": _CONFIG_TYPES[t], **per_row})
    return {
        "name": model.name, "platform": PLATFORM, "backend": "fwserve", "max_batch_size": max_batch_size,
        "version_policy": {"specific": {"versions": [int(VERSION)]}},
        "input": [{"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": image_dims(model)},
                  {"name": "label", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []},
                   "optional": True}],
        "output": outputs,
        "parameters": {"base_classes": {"string_value": ",".join(model.base_classes)},
                       "max_top_k": {"string_value": str(max_top_k)},
                       "sessions": {"string_value": "parameters.session_id (or sequence_id) picks a session's "
                                                    "head; a label input adapts it"}},
    }

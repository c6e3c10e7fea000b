"""Learned rules' parameters, stored beside the backbone they were trained for.

A learned adaptation rule (server/rules/meta_sgd.py, server/rules/hyper.py) has parameters that
were meta-trained offline on one backbone's features (`fwserve train-rule`, eval/train_rule.py).
They mean nothing for any other features, so the file records the backbone's fingerprint
(`Backbone.fingerprint`: every tensor of its state dict) and loading it with other weights is
refused with an error that names both.

The file for rule R and weights `X.safetensors` is `X.rule-R.safetensors` (its tensors; metadata:
"rule", "backbone_fingerprint", and "card", a JSON object with how the parameters were made:
data, episodes, seeds, the selection-split results). A model card beside it
(`X.rule-R.md`) says the same for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


class RuleParamsMismatch(ValueError):
    """A rule's parameters were trained for other backbone weights."""


@dataclass
class RuleParams:
    """One learned rule's tensors (CPU float32) and the card they were saved with."""

    rule: str
    tensors: dict[str, torch.Tensor]
    fingerprint: str
    card: dict = field(default_factory=dict)
    path: Optional[Path] = None


def rule_params_path(weights: Path, rule: str) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + f".rule-{rule}.safetensors")


def save_rule_params(path: Path, params: RuleParams) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in params.tensors.items()}, str(path),
              metadata={"rule": params.rule, "backbone_fingerprint": params.fingerprint,
                        "card": json.dumps(params.card, sort_keys=True)})
    path.chmod(0o644)  # a shipped file, readable like the weights beside it
    return path


def read_rule_params(path: Path) -> RuleParams:
    """The file as it is, whatever backbone it was made for."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    if "rule" not in meta or "backbone_fingerprint" not in meta:
        raise ValueError(f"{path} is not a rule parameter file (no rule / backbone_fingerprint metadata)")
    return RuleParams(meta["rule"], tensors, meta["backbone_fingerprint"], json.loads(meta.get("card") or "{}"), path)


def load_rule_params(path: Path, fingerprint: str) -> RuleParams:
    """The parameters in `path`, or RuleParamsMismatch when they were trained for other weights."""
    params = read_rule_params(path)
    if params.fingerprint != fingerprint:
        raise RuleParamsMismatch(
            f"the {params.rule!r} parameters in {path} were trained for backbone weights "
            f"{params.fingerprint[:16]}..., not for these ({fingerprint[:16]}...); retrain them on this backbone "
            f"with `fwserve train-rule {params.rule}`")
    return params


def bundled_rule_params(weights: Optional[Path], fingerprint) -> tuple[dict[str, RuleParams], dict[str, str]]:
    """Every rule parameter file beside `weights`: (rule -> params that match these weights,
    rule -> why a file was refused). `fingerprint`: a callable, asked only when there is a file."""
    found: dict[str, RuleParams] = {}
    refused: dict[str, str] = {}
    if weights is None:
        return found, refused
    weights = Path(weights)
    prefix = weights.name.removesuffix(".safetensors") + ".rule-"
    for path in sorted(weights.parent.glob(prefix + "*.safetensors")):
        try:
            params = load_rule_params(path, fingerprint())
        except RuleParamsMismatch as e:
            refused[path.name[len(prefix):].removesuffix(".safetensors")] = str(e)
            continue
        found[params.rule] = params
    return found, refused

"""Which methods a benchmark runs, with which settings.

Settings come from the pre-registration (docs/eval/preregistration.json, written by
`python -m eval.validate` from the selection split before the test split is scored); without
one (CI subsets, ad-hoc runs) the defaults below are used and the report says so.

Base-class benchmarks (shift, shifts, domain: the backbone's own classes) run
- static: the base head, never updated (zero labels);
- static after k labels: finetune@k (the base head fine-tuned offline on the first k labels of
  each class, then frozen) and prototype@k (prototypes of the first k labels, then frozen);
- the supervised rules on the labelled stream, and the label-free rules on the same stream
  without labels (they never see one).
New-class benchmarks (novel digits, user data, episodes) run static = prototype@k, the
supervised rules and the learned rules (when the backbone has their trained parameters);
label-free rules cannot learn new classes without labels and are not run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from eval.simulate import Method, method
from server.rules import RULES

# hand-made rules (their settings are searched by eval.validate) and learned ones (meta-trained
# by `fwserve train-rule`, which chose their settings on the selection split; run when trained)
SUPERVISED = tuple(name for name, rule in RULES.items() if rule.needs_labels and not rule.learned)
LEARNED = tuple(name for name, rule in RULES.items() if rule.learned)
LABEL_FREE = tuple(name for name, rule in RULES.items() if not rule.needs_labels)
SHOTS = 5  # k of "static after k labels"
PREREGISTRATION = Path(__file__).resolve().parents[1] / "docs" / "eval" / "preregistration.json"

DEFAULT_SETTINGS = {
    "base": {
        "sgd": {"hyper": {"lr": 0.01}, "init": "base"},
        "delta": {"hyper": {"beta": 0.1}},
        "prototype": {"hyper": {"temperature": 10.0}},
        "rls": {"hyper": {"lambda": 10.0}},
        "t3a": {"hyper": {"max_entropy": 1.0, "supports_per_class": 20}},
        "tent": {"hyper": {"lr": 0.001, "min_confidence": 0.9}},
        "feature_stats": {"hyper": {"prior_count": 0.0}},
        "feature_stats_t3a": {"hyper": {"prior_count": 0.0, "max_entropy": 1.0}},
        "lame": {"hyper": {"prior_count": 0.0}},
        "finetune": {"hyper": {"lr": 0.1}, "epochs": 20},
    },
    "novel": {
        "sgd": {"hyper": {"lr": 0.01}},
        "delta": {"hyper": {"beta": 0.1}},
        "prototype": {"hyper": {"temperature": 10.0}},
        "rls": {"hyper": {"lambda": 10.0}},
        # learned rules: their settings were chosen on the selection split by `fwserve train-rule`
        "meta_sgd": {"hyper": {}},
        "hyper": {"hyper": {}},
    },
}


def load_settings(path: Optional[Path] = PREREGISTRATION) -> tuple[dict, Optional[dict]]:
    """(settings, the pre-registration or None)."""
    if path is not None and Path(path).is_file():
        reg = json.loads(Path(path).read_text())
        return reg["settings"], reg
    return DEFAULT_SETTINGS, None


def _init(rule: str, s: dict) -> str:
    if rule in LABEL_FREE:
        return "base"
    return s.get("init", "zeros")


def base_methods(settings: dict, rules) -> list[Method]:
    s = settings["base"]
    ft = s.get("finetune", DEFAULT_SETTINGS["base"]["finetune"])
    out = [method("static", None, init="base"),
           method(f"finetune@{SHOTS}", "sgd", ft["hyper"], init="base", budget=SHOTS, fit_epochs=int(ft["epochs"])),
           method(f"prototype@{SHOTS}", "prototype", s.get("prototype", {}).get("hyper"), budget=SHOTS)]
    for r in rules:
        if r not in s and r not in DEFAULT_SETTINGS["base"]:
            continue
        cfg = s.get(r, DEFAULT_SETTINGS["base"].get(r, {}))
        out.append(method(r, r, cfg.get("hyper"), init=_init(r, cfg), labelled=r not in LABEL_FREE))
    return out


def novel_methods(settings: dict, rules) -> list[Method]:
    s = settings["novel"]
    out = [method(f"prototype@{SHOTS}", "prototype", s.get("prototype", {}).get("hyper"), budget=SHOTS)]
    for r in rules:
        if r in LABEL_FREE or (r not in s and r not in DEFAULT_SETTINGS["novel"]):
            continue
        cfg = s.get(r, DEFAULT_SETTINGS["novel"].get(r, {}))
        out.append(method(r, r, cfg.get("hyper"), steps=int(cfg.get("steps", 1))))
    return out


def episode_methods(settings: dict, rules) -> list[Method]:
    """Episodic heads of the supervised rules (prototype: the prototypes of the shots, which is
    also the static baseline); sgd takes 20 passes over the shots."""
    s = settings["novel"]
    out = []
    for r in rules:
        if r in LABEL_FREE or (r not in s and r not in DEFAULT_SETTINGS["novel"]):
            continue
        cfg = s.get(r, DEFAULT_SETTINGS["novel"].get(r, {}))
        out.append(method(r, r, cfg.get("hyper"), steps=20 if r == "sgd" else 1))
    return out

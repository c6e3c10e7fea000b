"""What a rule is: its hyper-parameters, its per-session state and one grouped update.

A rule never owns tensors. The sessions package (or the engine, for throw-away episodic heads)
hands it the stacked heads (``Heads``) and the rows of one micro-batch, and the rule makes its
grouped kernel call(s) over them. Rules talk to ``kernels/`` only; they know nothing of
sessions, tiers or requests.

Adding a rule: one module with a ``Rule`` subclass, registered with ``register(MyRule())``
(see server/rules/__init__.py), plus its kernel in ``kernels/`` when no existing op does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

from server.errors import invalid

ShapeFn = Callable[[int, int], tuple[int, ...]]  # (classes, embed_dim) -> shape of one session's state


@dataclass
class Heads:
    """Stacked head tensors a rule updates in place (one slot per head)."""

    W: torch.Tensor  # [S, C, d] float32
    b: torch.Tensor  # [S, C] float32
    n_classes: torch.Tensor  # [S] int64
    normalize: torch.Tensor  # [S] bool
    hyper: dict[str, torch.Tensor]  # name -> [S] float32 (per-slot hyper-parameters)
    pools: dict[str, dict[str, torch.Tensor]]  # rule name -> state name -> [R, ...]
    # learned rules' meta-trained parameters, shared by every slot: rule name -> name -> a tensor
    # on the heads' device, or a float for 0-dimensional ones (read on the host, no device sync)
    learned: dict[str, dict[str, torch.Tensor | float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Hyper:
    default: float
    low: float
    high: float = math.inf
    low_open: bool = True  # low excluded
    per_slot: bool = True  # lives in a per-slot tensor used by the kernel
    help: str = ""
    flag: bool = False  # a switch: true/false (or 1/0), kept as 1.0/0.0

    def check(self, rule: str, name: str, value) -> float:
        if self.flag:
            if isinstance(value, bool) or value in (0, 1):
                return float(value)
            raise invalid("invalid_hyperparameter", f"{rule}.{name} must be true or false")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("invalid_hyperparameter", f"{rule}.{name} must be a number")
        v = float(value)
        ok = math.isfinite(v) and (v > self.low if self.low_open else v >= self.low) and v <= self.high
        if not ok:
            lo = "(" if self.low_open else "["
            raise invalid(
                "invalid_hyperparameter", f"{rule}.{name}={value} is outside {lo}{self.low:g}, {self.high:g}]"
            )
        return v


ADAPT_ON_PREDICT = Hyper(0.0, 0.0, 1.0, low_open=False, per_slot=False, flag=True,
                         help="adapt on every /v1/predict of the session (test-time adaptation)")


class Rule:
    """Subclass and set the class attributes; override ``update`` (and ``init_state`` when the
    state does not start at zero)."""

    name: ClassVar[str]
    normalize: ClassVar[bool] = False  # does head_forward use unit-norm features for this rule?
    hyper: ClassVar[dict[str, Hyper]] = {}
    state: ClassVar[dict[str, ShapeFn]] = {}  # per-session state tensors beyond W and b
    base_init: ClassVar[bool] = False  # may start from the backbone's base head
    needs_labels: ClassVar[bool] = True
    inf_state: ClassVar[tuple[str, ...]] = ()  # state tensors where +inf is a legal value (an empty entry)
    # update() takes logits= (the round's head_forward of these rows, before the update) and uses
    # them instead of reading the heads again; see kernels.ops (only the Triton path gets them)
    reuses_logits: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # hyper-parameter values the offline validation tries (python -m eval.validate): name -> values
    search_space: ClassVar[dict[str, tuple]] = {}
    # names of the meta-trained tensors the rule needs (models/rule_params.py), found in
    # heads.learned[rule.name]; a rule with any cannot be used until they are loaded
    learned: ClassVar[tuple[str, ...]] = ()
    # keys of the backbone's source statistics init_state reads from `head` whatever the init
    # (e.g. "feature_within_cov"); sessions and scratch heads hand them in when the backbone has them
    source_keys: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<rule {self.name}>"

    def validate(self, given: dict) -> dict[str, float]:
        """The full hyper-parameter dict (defaults filled in), or InvalidInput."""
        unknown = sorted(set(given) - set(self.hyper))
        if unknown:
            known = ", ".join(sorted(self.hyper)) or "none"
            raise invalid(
                "invalid_hyperparameter", f"rule {self.name!r} has no hyper-parameter {unknown[0]!r} (known: {known})"
            )
        out = {k: h.check(self.name, k, given.get(k, h.default)) for k, h in self.hyper.items()}
        self.check_together(out)
        return out

    def check_together(self, hyper: dict[str, float]) -> None:
        """Raise InvalidInput for combinations of values under which heads would not stay finite."""

    def state_shapes(self, n: int, d: int) -> dict[str, tuple[int, ...]]:
        return {name: shape(n, d) for name, shape in self.state.items()}

    def init_state(self, n: int, d: int, hyper: dict[str, float],
                   head: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """A fresh session's rule state (CPU float32 tensors) for a head of n classes. `head`
        ({"W", "b"}): the session's initial head, with the backbone's source statistics the rule
        names in source_keys (and, from the base head, "feature_mean"/"feature_var"); a rule
        may return "W"/"b" to replace it."""
        return {name: torch.zeros(shape, dtype=torch.float32) for name, shape in self.state_shapes(n, d).items()}

    def update(self, heads: Heads, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
               state_rows: Optional[torch.Tensor], batch=None) -> int:
        """One grouped kernel call over this rule's rows, in place. y = -1 marks an unlabelled
        row (label-free rules only). `batch`: the kernels.SlotBatch of `slots`, shared by every
        op the rule calls. Returns the sessions the rule's own safeguard reset (label-free
        collapse guards): their slots as a tensor, or just how many (an int; 0: none).
        A rule with reuses_logits = True also takes `logits=None`: head_forward's output for
        these rows and heads, which it must treat exactly as its own forward's."""
        raise NotImplementedError(f"rule {self.name!r} defines no update")


def learned_tensors(heads: Heads, rule: Rule) -> dict[str, torch.Tensor | float]:
    """A learned rule's parameters on the heads' device (check_trained has let it in)."""
    try:
        return heads.learned[rule.name]
    except KeyError:
        raise invalid("rule_not_trained", f"rule {rule.name!r} has no trained parameters here") from None


def check_trained(rule: Rule, learned: dict, refused: Optional[dict[str, str]] = None) -> None:
    """InvalidInput unless a learned rule's parameters are loaded (`learned`: rule -> tensors)."""
    if not rule.learned or rule.name in learned:
        return
    why = (refused or {}).get(rule.name) or (
        f"this backbone has no trained parameters for it; make them with `fwserve train-rule {rule.name}` "
        "(they are found beside the weights, or given with --rule-params)")
    raise invalid("rule_not_trained", f"rule {rule.name!r} cannot be used: {why}")


def device_learned(learned: Optional[dict[str, dict[str, torch.Tensor]]], device) -> dict:
    """The learned parameters (rule -> name -> tensor) as float32 tensors on `device`; a
    0-dimensional tensor (a count, a setting read on the host) becomes a float."""
    return {r: {k: (float(t) if not isinstance(t, torch.Tensor) or t.dim() == 0
                    else t.to(device=device, dtype=torch.float32).contiguous()) for k, t in ts.items()}
            for r, ts in (learned or {}).items()}


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Make a rule available by name to sessions, episodic heads, evaluation and benchmarks.
    Register before the server starts: slot tensors and metrics are sized from the registry."""
    if not getattr(rule, "name", None):
        raise ValueError("a rule needs a name")
    if rule.name in RULES and type(RULES[rule.name]) is not type(rule):
        raise ValueError(f"a different rule is already registered as {rule.name!r}")
    RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise invalid("unknown_rule", f"unknown rule {name!r}; known: {', '.join(RULES)}") from None


def per_slot_hyper() -> dict[str, float]:
    """Per-slot hyper-parameter tensors a head set keeps: name -> value for slots of other rules."""
    return {name: 0.0 for rule in RULES.values() for name, h in rule.hyper.items() if h.per_slot}


def source_head(rule: Rule, n: int, d: int, source: Optional[dict[str, torch.Tensor]],
                head: Optional[dict[str, torch.Tensor]] = None) -> Optional[dict[str, torch.Tensor]]:
    """init_state's `head` for a rule: `head` (None: a zero head, given only when the rule reads
    source statistics) with the source statistics the rule names in source_keys."""
    picked = {k: source[k] for k in rule.source_keys if source and k in source}
    if head is None:
        return {"W": torch.zeros(n, d), "b": torch.zeros(n), **picked} if picked else None
    return {**head, **picked}


def scratch_heads(entries: list[tuple[Rule, dict, int, Optional[dict[str, torch.Tensor]]]], C: int, d: int,
                  device, head_dtype: torch.dtype = torch.float32,
                  learned: Optional[dict[str, dict[str, torch.Tensor]]] = None,
                  source: Optional[dict[str, torch.Tensor]] = None) -> tuple[Heads, list[int]]:
    """Heads for a few sessions outside any slot pool: slot i holds entries[i] =
    (rule, hyper, classes, tensors). `tensors` ({"W", "b", state...}, CPU or device) starts the
    head where it is; None starts it at zero with the rule's initial state. Every registered
    per-slot hyper-parameter gets a tensor; each rule's state rows are compact and returned as
    state_rows[i] (episodic heads, log replay, offline validation). `head_dtype`: W and b storage
    (log replay matches the pool the session lives in). `learned`: the learned rules' parameters
    (rule -> name -> tensor), moved to `device`. `source`: the backbone's source statistics by
    init_state key (source_head), for rules that start from them (Rule.source_keys)."""
    E = len(entries)
    defaults = per_slot_hyper()
    heads = Heads(
        W=torch.zeros(E, C, d, dtype=head_dtype, device=device),
        b=torch.zeros(E, C, dtype=head_dtype, device=device),
        n_classes=torch.tensor([n for _, _, n, _ in entries], dtype=torch.int64, device=device),
        normalize=torch.tensor([r.normalize for r, _, _, _ in entries], dtype=torch.bool, device=device),
        hyper={k: torch.tensor([float(h.get(k, v)) for _, h, _, _ in entries], device=device)
               for k, v in defaults.items()},
        pools={},
        learned=device_learned(learned, device),
    )
    state_rows, members = [], {}
    for _i, (rule, _, _, _) in enumerate(entries):
        state_rows.append(len(members.setdefault(rule.name, [])))
        members[rule.name].append(_i)
    for name, idx in members.items():
        rule = entries[idx[0]][0]
        if rule.state:
            heads.pools[name] = {k: torch.zeros((len(idx), *shape(C, d)), device=device)
                                 for k, shape in rule.state.items()}
    for i, (rule, hyper, n, tensors) in enumerate(entries):
        if tensors is None:
            tensors = rule.init_state(n, d, hyper, head=source_head(rule, n, d, source))
        else:
            heads.W[i, :n] = tensors["W"].to(device, head_dtype)
            heads.b[i, :n] = tensors["b"].to(device, head_dtype)
        for k, pool in heads.pools.get(rule.name, {}).items():
            src = tensors[k]
            pool[state_rows[i]][tuple(slice(0, s) for s in src.shape)] = src.to(device)
    return heads, state_rows

"""Adapt cost per update call of the learned rules beside the hand-made ones, side by side.

    python -m loadtests.rule_update_bench [--sessions 1000] [--rows 1 8 64] [--repeats 200] [--json FILE]

What the executor times as fwserve_head_update_seconds: one rule.update over a micro-batch's
rows, on the pool heads of --sessions 10-class sessions (the bundled backbone's d = 128,
float32, the CPU path, one torch thread), rows spread over distinct sessions, features and
labels fresh per call. The learned rules use the parameters shipped beside the bundled weights.
Prints the median per call of every rule (alternating rules per repeat, so drift hits all
alike) and each rule's ratio to sgd's: the learned rules' target is <= 2x sgd's per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

RULE_NAMES = ("sgd", "meta_sgd", "hyper", "prototype", "rls")
CLASSES = 10


def build(rule_name: str, sessions: int, d: int, learned: dict):
    from server.rules import RULES, scratch_heads

    rule = RULES[rule_name]
    hp = rule.validate({})
    heads, rows = scratch_heads([(rule, hp, CLASSES, None)] * sessions, CLASSES, d, "cpu", learned=learned)
    return rule, heads, torch.tensor(rows)


def time_rules(sessions: int, rows: int, repeats: int, learned: dict, d: int, seed: int = 0) -> dict[str, float]:
    import kernels

    g = torch.Generator().manual_seed(seed)
    built = {name: build(name, sessions, d, learned) for name in RULE_NAMES}
    times: dict[str, list[float]] = {name: [] for name in RULE_NAMES}
    for i in range(repeats + 5):  # 5 warm-up calls per rule
        x = torch.randn(rows, d, generator=g)
        y = torch.randint(0, CLASSES, (rows,), generator=g)
        slots = torch.randperm(sessions, generator=g)[:rows] if rows <= sessions else torch.arange(rows) % sessions
        for name in RULE_NAMES:
            rule, heads, state = built[name]
            sr = state.index_select(0, slots) if rule.state else None
            batch = kernels.SlotBatch(slots)  # built once per round by the executor, shared with the forward
            t0 = time.perf_counter()
            rule.update(heads, x, y, slots, sr, batch=batch)
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from models import load_backbone

    bb = load_backbone()
    learned = {name: params.tensors for name, params in bb.rule_params.items()}
    missing = [r for r in ("meta_sgd", "hyper") if r not in learned]
    if missing:
        raise SystemExit(f"the bundled backbone has no parameters for {missing} (fwserve train-rule)")
    steps = int(learned["meta_sgd"]["steps"])
    out = {"sessions": args.sessions, "d": bb.embed_dim, "classes": CLASSES, "meta_sgd_steps": steps, "rows": {}}
    print(f"rule.update per call, median of {args.repeats}; {args.sessions} sessions, d={bb.embed_dim}, "
          f"{CLASSES} classes, CPU, 1 thread; meta_sgd takes {steps} inner steps")
    print(f"{'rows':>5} " + " ".join(f"{n:>16}" for n in RULE_NAMES))
    for rows in args.rows:
        med = time_rules(args.sessions, rows, args.repeats, learned, bb.embed_dim)
        out["rows"][rows] = {n: {"us": round(1e6 * v, 1), "vs_sgd": round(v / med["sgd"], 2)} for n, v in med.items()}
        print(f"{rows:>5} " + " ".join(f"{1e6 * med[n]:>8.0f} us {med[n] / med['sgd']:>4.2f}x" for n in RULE_NAMES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

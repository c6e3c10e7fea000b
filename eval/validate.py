"""Choosing the rules' settings on the *training* split, never on the held-out digits:

    python -m eval.validate --out docs/eval/validation.md

The shift protocol of ``fwserve eval`` (stratified 60/40 stream / test split, i.i.d. and
correlated orders, requests of 10), run in this process on backbone features with the rules'
own code (server.rules, the same kernels the server calls), over 100 training images per known
class under every corruption at severity 5. The backbone was trained on these images clean, so
the corruption is the only shift. Prints and writes, per setting, the mean final accuracy and
prequential accuracy over corruptions and orders.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import kernels
from eval import data as D
from server.rules import RULES, scratch_heads

def grid(rule_name: str) -> list[dict]:
    """Every combination of the rule's search space (server/rules: Rule.search_space)."""
    space = RULES[rule_name].search_space
    return [dict(zip(space, values)) for values in itertools.product(*space.values())] or [{}]


INIT = {"sgd": "base", "t3a": "base", "tent": "base"}  # as in fwserve eval's shift benchmark; others from zero


def session(rule_name: str, hyper: dict, W0: torch.Tensor, b0: torch.Tensor, init: str) -> tuple:
    rule = RULES[rule_name]
    hp = rule.validate(hyper)
    n, d = W0.shape
    head = {"W": W0.clone(), "b": b0.clone()} if init == "base" else {"W": torch.zeros(n, d), "b": torch.zeros(n)}
    state = rule.init_state(n, d, hp, head=dict(head))
    heads, _ = scratch_heads([(rule, hp, n, {**head, **state})], n, d, "cpu")
    return rule, heads


def simulate(rule_name, hyper, W0, b0, init, xs, ys, xt, yt, labelled, batch=10) -> tuple[float, float]:
    """(prequential, final) accuracy of one rule over a stream, like a server session."""
    rule, heads = session(rule_name, hyper, W0, b0, init)
    correct = 0
    for i in range(0, len(xs), batch):
        x, y = xs[i:i + batch], ys[i:i + batch]
        slots = torch.zeros(len(x), dtype=torch.int64)
        logits = kernels.head_forward(x, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
        correct += int((logits.argmax(1) == y).sum())
        rule.update(heads, x, y if labelled else torch.full_like(y, -1), slots, slots if rule.state else None)
    slots = torch.zeros(len(xt), dtype=torch.int64)
    logits = kernels.head_forward(xt, heads.W, heads.b, slots, heads.n_classes, normalize=heads.normalize)
    return correct / len(xs), float((logits.argmax(1) == yt).float().mean())


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m eval.validate")
    p.add_argument("--out", type=Path, default=Path("docs/eval/validation.md"))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--corruptions", default=",".join(D.CORRUPTIONS), help="comma list")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--weights", type=Path, help="backbone checkpoint (default: the bundled weights)")
    args = p.parse_args(argv)
    from models import load_backbone

    bb = load_backbone("fwserve-mnist-vit", weights=args.weights, random_init=args.random_init)
    W0, b0 = bb.head.weight.detach().float(), bb.head.bias.detach().float()
    base = D.per_class(D.mnist("train", (0, 1, 2, 3, 4)), args.per_class, seed=1)
    rows = []
    corruptions = args.corruptions.split(",")
    for name in corruptions:
        data = D.corrupted(base, name, args.severity, seed=1, cache_dir=args.cache_dir)
        stream, test = D.stratified_split(data, 0.6, seed=1)
        with torch.no_grad():
            fs = bb.features(torch.stack([bb.preprocess(i) for i in stream.images]))
            ft = bb.features(torch.stack([bb.preprocess(i) for i in test.images]))
        yt = torch.as_tensor(test.labels)
        static = float(((ft @ W0.T + b0).argmax(1) == yt).float().mean())
        for order in ("iid", "correlated"):
            idx = torch.as_tensor(D.stream_order(stream.labels, order, seed=1))
            xs, ys = fs[idx], torch.as_tensor(stream.labels)[idx]
            static_preq = float(((xs @ W0.T + b0).argmax(1) == ys).float().mean())
            rows.append((name, order, "static", "-", static_preq, static))
            for rule_name in RULES:
                labelled = RULES[rule_name].needs_labels
                for hyper in grid(rule_name):
                    preq, final = simulate(rule_name, hyper, W0, b0, INIT.get(rule_name, "zeros"), xs, ys, ft, yt,
                                           labelled)
                    rows.append((name, order, rule_name, str(hyper), preq, final))
        print(name, "done", flush=True)
    lines = ["# Rule settings chosen on the training split", "",
             f"`python -m eval.validate {' '.join(argv or [])}` — {args.per_class} training images per known "
             f"class under {', '.join(corruptions)} at severity {args.severity} (never the held-out digits); "
             "stream / test split 60/40; mean over those corruptions. Accuracy in %.", "",
             "| rule | setting | iid prequential | iid final | correlated prequential | correlated final |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r[2], r[3]) for r in rows}, key=lambda k: (k[0] != "static", k))
    for rule_name, hyper in keys:
        vals = []
        for order in ("iid", "correlated"):
            sel = [r for r in rows if r[1] == order and r[2] == rule_name and r[3] == hyper]
            vals += [f"{100 * np.mean([r[4] for r in sel]):.1f}", f"{100 * np.mean([r[5] for r in sel]):.1f}"]
        lines.append(f"| {rule_name} | {hyper} | " + " | ".join(vals) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

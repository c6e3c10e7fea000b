"""Would a SHOT-style diversity term help head entropy minimisation on frozen features? An
upper bound, on the selection split only:

    python -m eval.infomax_check --out docs/eval/infomax_check.md

For every corruption at severity 5 (seed-0 stream / test split of the selection digits 0-4) the
stream's features are re-standardised onto the source statistics with the stream's own mean
and variance (feature_stats after the whole stream), then the base head is trained offline,
full batch, 100 Adam steps (lr 0.01), on the stream without labels to minimise
    mean_i H(p_i) - diversity * H(mean_i p_i)
(diversity 0: entropy minimisation; 1: information maximisation, SHOT's objective), and scored
on the test part. An online rule sees each row once in small requests, so it would do no
better than this offline fit; if the bound does not beat re-standardisation alone, the rule is
not worth building.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from eval.benchmarks import Plan, base_streams

STEPS, LR = 100, 0.01


def information_maximisation(W, b, X, diversity: float):
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    opt = torch.optim.Adam([W, b], lr=LR)
    for _ in range(STEPS):
        p = torch.softmax(X @ W.T + b, 1)
        entropy = -(p * torch.log(p + 1e-12)).sum(1).mean()
        marginal = p.mean(0)
        loss = entropy + diversity * (marginal * torch.log(marginal + 1e-12)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W.detach(), b.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.infomax_check")
    p.add_argument("--out", type=Path, default=Path("docs/eval/infomax_check.md"))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/fwserve-eval-cache"))
    args = p.parse_args(argv)
    from eval.features import FeatureBank

    torch.manual_seed(0)
    bank = FeatureBank(cache_dir=args.cache_dir)
    plan = Plan(split="selection", benchmarks=("shift",), severities=(5,), seeds=1, base_orders=("iid",),
                cache_dir=args.cache_dir, workers=1)
    streams, _ = base_streams(plan, bank)
    W0, b0 = bank.W0.double(), bank.b0.double()
    src_mean, src_var = bank.source_stats["mean"].double(), bank.source_stats["var"].double()
    rows = []
    for s in streams:
        if s.key["shift"] == "clean":
            continue
        xs = torch.from_numpy(s.features[s.order]).double()
        xt = torch.from_numpy(s.features[s.test]).double()
        yt = torch.from_numpy(s.labels[s.test])
        a = ((src_var + 1e-5) / (xs.var(0, unbiased=False) + 1e-5)).sqrt()
        t = src_mean - a * xs.mean(0)

        def err(W, b, x):
            return float(((x @ W.T + b).argmax(1) != yt).double().mean())

        r = {"corruption": s.key["shift"], "static": err(W0, b0, xt), "feature_stats": err(W0, b0, xt * a + t)}
        for div in (0.0, 1.0):
            W, b = information_maximisation(W0, b0, xs * a + t, div)
            r[f"+ entropy, diversity {div:g}"] = err(W, b, xt * a + t)
        rows.append(r)
    keys = [k for k in rows[0] if k != "corruption"]
    lines = ["# A SHOT-style diversity term on frozen features: an offline upper bound", "",
             f"`python -m eval.infomax_check {' '.join(argv or [])}` — selection split, severity 5, seed-0 split; final "
             "error (%) on the test part. See the module docstring of eval/infomax_check.py.", "",
             "| corruption | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {r['corruption']} | " + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |" for r in rows]
    lines.append("| **mean** | " + " | ".join(f"**{100 * np.mean([r[k] for r in rows]):.1f}**" for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Meta-train a learned rule's parameters on the backbone's own training classes.

    fwserve train-rule meta_sgd [--out PATH]      (or python -m eval.train_rule meta_sgd)
    fwserve train-rule hyper

Data: the training split's digits 0-4 (the images the backbone was trained on, and nothing
else: never the novel digits 5-9, never the selection or held-out splits), through the
server's preprocessing and the backbone (eval/features.py). Because a backbone separates its
own five classes almost perfectly, episodes over them alone teach a rule nothing about classes
it has never seen; so, by default, each digit under each of the 8 symmetries of the square
(rotations by 90 degrees, flips, transposes) is a class of its own: 40 classes, 35 of them
shapes the backbone never saw as a class, still drawn only from those training images.

Episodes: N-way k-shot (k alternating over --shots) with --queries queries per class, labels
permuted per episode; the rule's head starts at zero, adapts once on the shuffled support set
(one adapt call), and the loss is the cross-entropy of its queries: the same computation the
server runs (eval/simulate.py replays it with the server's kernels).

- meta_sgd: learns log per-feature rates [d] and a log bias rate for each candidate number of
  inner steps (--steps), by Adam through the unrolled steps.
- hyper: the metric M = scale * (S_w / mean eigenvalue + lam I)^-1, S_w the within-class
  covariance of the backbone's features on its own five training classes; learns log lam and
  log scale through the eigendecomposition; further candidates: the shrinkages of --lams with
  the learned scale, and (for each --finetune value > 0) a full factor A, M = A^T A, started
  at the learned metric.

Every candidate is scored on episodes of the selection split's digits 5-9 (never the held-out
split); the best mean of its 1-shot and 5-shot accuracy is saved, with a card of what was done
(data, episodes, seeds, every candidate's selection accuracy) in the file's metadata and in a
Markdown card beside it. Seeded: the same command gives the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

LEARNED_RULES = ("meta_sgd", "hyper")
SYMMETRIES = ("identity", "rot90", "rot180", "rot270", "flip_lr", "flip_ud", "transpose", "anti_transpose")


def _symmetry(images: np.ndarray, name: str) -> np.ndarray:
    ops = {"identity": lambda a: a, "rot90": lambda a: np.rot90(a, 1, (1, 2)), "rot180": lambda a: np.rot90(a, 2, (1, 2)),
           "rot270": lambda a: np.rot90(a, 3, (1, 2)), "flip_lr": lambda a: a[:, :, ::-1],
           "flip_ud": lambda a: a[:, ::-1, :], "transpose": lambda a: np.transpose(a, (0, 2, 1)),
           "anti_transpose": lambda a: np.rot90(np.transpose(a, (0, 2, 1)), 2, (1, 2))}
    return np.ascontiguousarray(ops[name](images))


def training_classes(bank, symmetries: tuple[str, ...] = SYMMETRIES) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, d] and class ids [N] of the meta-training set: digits 0-4 of the training
    split, each under each symmetry a class of its own (digit + 5 * symmetry index)."""
    from models.data import KNOWN_CLASSES, mnist_split

    train = mnist_split("train").subset(KNOWN_CLASSES)
    feats, labels = [], []
    for i, name in enumerate(symmetries):
        feats.append(bank(_symmetry(train.images, name)))
        labels.append(train.labels + len(KNOWN_CLASSES) * i)
    return torch.from_numpy(np.concatenate(feats)).float(), torch.from_numpy(np.concatenate(labels)).long()


def selection_episodes(bank, shots: int, count: int, ways: int = 5, queries: int = 15, seed: int = 0):
    """(features, episodes) of the selection split's digits 5-9, as the evaluation draws them."""
    from eval.benchmarks import Plan, episodes
    from models.data import NOVEL_CLASSES, mnist_split

    sel = mnist_split("selection").subset(NOVEL_CLASSES)
    feats = torch.from_numpy(bank(sel.images)).float()
    plan = Plan(split="selection", episodes=count, ways=ways, queries=queries)
    return feats, episodes(plan, sel.labels, np.arange(len(sel.labels)), shots, seed)


class EpisodeSampler:
    """Seeded N-way k-shot episodes over a labelled feature set (labels permuted per episode)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.x = x
        self.rows = [torch.nonzero(y == c).squeeze(1) for c in torch.unique(y)]
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, ways: int, shots: int, queries: int):
        chosen = torch.randperm(len(self.rows), generator=self.g)[:ways]
        support, query = [], []
        for c in chosen:
            r = self.rows[int(c)]
            r = r[torch.randperm(len(r), generator=self.g)[:shots + queries]]
            support.append(r[:shots])
            query.append(r[shots:])
        sy = torch.arange(ways).repeat_interleave(shots)
        perm = torch.randperm(len(sy), generator=self.g)  # the support arrives shuffled, as in a stream
        return (self.x[torch.cat(support)[perm]], sy[perm], self.x[torch.cat(query)],
                torch.arange(ways).repeat_interleave(queries))


# ---- the rules' heads as differentiable functions of their parameters --------------------------

def meta_sgd_head(xs: torch.Tensor, ys: torch.Tensor, ways: int, rates: torch.Tensor, bias_rate: torch.Tensor,
                  steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.sgd_step with feature_rates, `steps` times from a zero head on one adapt call."""
    W = xs.new_zeros(ways, xs.shape[1])
    b = xs.new_zeros(ways)
    onehot = F.one_hot(ys, ways).to(xs.dtype)
    for _ in range(steps):
        g = torch.softmax(xs @ W.T + b, 1) - onehot
        W = W - rates * (g.T @ xs) / len(xs)
        b = b - bias_rate * g.mean(0)
    return W, b


def class_mean_head(xs: torch.Tensor, ys: torch.Tensor, ways: int, metric: torch.Tensor):
    """kernels.class_mean_head_step on one adapt call: W = M m_c, b = -m_c^T M m_c / 2."""
    onehot = F.one_hot(ys, ways).to(xs.dtype)
    means = (onehot.T @ xs) / onehot.sum(0).clamp_min(1.0)[:, None]
    W = means @ metric.T
    return W, -0.5 * (W * means).sum(1)


def episode_accuracy(head: Callable, feats: torch.Tensor, eps: list[dict]) -> list[float]:
    out = []
    with torch.no_grad():
        for e in eps:
            ways = int(e["support_y"].max()) + 1
            W, b = head(feats[e["support"]], torch.from_numpy(e["support_y"]).long(), ways)
            pred = (feats[e["query"]] @ W.T + b).argmax(1).numpy()
            out.append(float((pred == e["query_y"]).mean()))
    return out


def within_class_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.double()
    centred = torch.cat([x[y == c] - x[y == c].mean(0) for c in torch.unique(y)])
    return centred.T @ centred / len(centred)


# ---- training ---------------------------------------------------------------------------------

def _fit(params: list[torch.Tensor], loss_fn: Callable, sampler: EpisodeSampler, iterations: int, lr: float,
         shots: tuple[int, ...], ways: int, queries: int, batch: int, desc: str, progress: bool) -> list[float]:
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    bar = _bar(iterations, desc, progress)
    for it in range(iterations):
        k = shots[it % len(shots)]
        loss = sum(loss_fn(*sampler(ways, k, queries), ways) for _ in range(batch)) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    if bar is not None:
        bar.close()
    return losses


def _bar(total: int, desc: str, on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)


def train_meta_sgd(x, y, d: int, args, progress: bool) -> list[dict]:
    out = []
    for steps in args.steps:
        torch.manual_seed(args.seed)
        log_rates = torch.full((d,), math.log(args.init_rate), requires_grad=True)
        log_bias = torch.tensor(math.log(args.init_rate), requires_grad=True)
        sampler = EpisodeSampler(x, y, args.seed)

        def loss_fn(xs, ys, xq, yq, ways, steps=steps):
            W, b = meta_sgd_head(xs, ys, ways, log_rates.exp(), log_bias.exp(), steps)
            return F.cross_entropy(xq @ W.T + b, yq)

        losses = _fit([log_rates, log_bias], loss_fn, sampler, args.iterations, args.meta_lr, args.shots, args.ways,
                      args.queries, args.batch, f"meta_sgd steps={steps}", progress)
        rates, bias = log_rates.detach().exp(), log_bias.detach().exp()
        out.append({"name": f"steps={steps}", "settings": {"steps": steps},
                    "tensors": {"feature_rates": rates.float(), "bias_rate": bias.reshape(1).float(),
                                "steps": torch.tensor(float(steps))},
                    "head": lambda xs, ys, ways, r=rates, bb=bias, k=steps: meta_sgd_head(xs, ys, ways, r, bb, k),
                    "final_loss": float(np.mean(losses[-50:]))})
    return out


def train_hyper(x, y, d: int, args, progress: bool) -> list[dict]:
    digits = y < 5  # the identity symmetry: the backbone's own classes as they are
    Sw = within_class_covariance(x[digits], y[digits])
    evals, evecs = torch.linalg.eigh(Sw / (torch.trace(Sw) / d))
    evals, evecs = evals.clamp_min(0.0).float(), evecs.float()
    torch.manual_seed(args.seed)
    log_lam = torch.tensor(math.log(args.init_lam), requires_grad=True)
    log_scale = torch.tensor(0.0, requires_grad=True)

    def metric_of(lam, scale):
        return (evecs * (scale / (evals + lam))) @ evecs.T

    def loss_fn(xs, ys, xq, yq, ways):
        W, b = class_mean_head(xs, ys, ways, metric_of(log_lam.exp(), log_scale.exp()))
        return F.cross_entropy(xq @ W.T + b, yq)

    losses = _fit([log_lam, log_scale], loss_fn, EpisodeSampler(x, y, args.seed), args.iterations, args.meta_lr,
                  args.shots, args.ways, args.queries, args.batch, "hyper shrinkage", progress)
    lam, scale = float(log_lam.detach().exp()), float(log_scale.detach().exp())
    out = []
    for name, lam_c in [("learned", lam)] + [("grid", v) for v in args.lams]:
        M = metric_of(torch.tensor(lam_c), torch.tensor(scale)).detach()
        out.append({"name": f"{name}: lam {lam_c:.3g}", "settings": {"lam": lam_c, "scale": scale, "finetune": 0},
                    "tensors": {"metric": M.float()}, "head": lambda xs, ys, ways, M=M: class_mean_head(xs, ys, ways, M),
                    "final_loss": float(np.mean(losses[-50:])) if name == "learned" else float("nan")})
    base = out[0]["tensors"]["metric"]
    for steps in [s for s in args.finetune if s > 0]:
        # M = A^T A, A started at M^(1/2): the metric stays positive semi-definite while it learns
        ev, V = torch.linalg.eigh(base.double())
        A = ((V * ev.clamp_min(0).sqrt()) @ V.T).float().requires_grad_(True)

        def loss_fn(xs, ys, xq, yq, ways, A=A):
            W, b = class_mean_head(xs, ys, ways, A.T @ A)
            return F.cross_entropy(xq @ W.T + b, yq)

        losses = _fit([A], loss_fn, EpisodeSampler(x, y, args.seed + 1), steps, args.finetune_lr, args.shots,
                      args.ways, args.queries, args.batch, f"hyper finetune={steps}", progress)
        M = (A.T @ A).detach()
        out.append({"name": f"learned + finetune={steps}", "settings": {"lam": lam, "scale": scale, "finetune": steps},
                    "tensors": {"metric": M.float()}, "head": lambda xs, ys, ways, M=M: class_mean_head(xs, ys, ways, M),
                    "final_loss": float(np.mean(losses[-50:]))})
    return out


def _ci(accs: list[float]) -> list[float]:
    from eval.stats import mean_interval

    _, lo, hi = mean_interval(np.asarray(accs)[None, :], replicates=1000)
    return [round(100 * lo, 2), round(100 * hi, 2)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fwserve train-rule", description=__doc__.split("\n\n")[0])
    p.add_argument("rule", choices=LEARNED_RULES)
    p.add_argument("--out", type=Path, default=None,
                   help="parameter file (default: beside the bundled weights, X.rule-RULE.safetensors)")
    p.add_argument("--backbone", default="fwserve-mnist-vit")
    p.add_argument("--weights", type=Path, default=None, help="backbone weights (default: the bundled ones)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (eval/features.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=400, help="meta-training iterations per candidate")
    p.add_argument("--batch", type=int, default=8, help="episodes per iteration")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--meta-lr", type=float, default=0.05)
    # more inner steps would cost more than 2x sgd's update per adapt call (one kernel call each)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="meta_sgd: inner-step candidates")
    p.add_argument("--init-rate", type=float, default=1.0, help="meta_sgd: starting step size")
    p.add_argument("--init-lam", type=float, default=0.3, help="hyper: starting shrinkage")
    p.add_argument("--lams", type=float, nargs="*", default=[0.1, 0.3, 1.0],
                   help="hyper: further shrinkage candidates (with the learned scale)")
    p.add_argument("--finetune", type=int, nargs="+", default=[0],
                   help="hyper: candidate iterations of full-metric fine-tuning (0: the shrinkage fit alone)")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--symmetries", choices=("all", "none"), default="all",
                   help="all: digit x symmetry classes (40); none: the five digits alone")
    p.add_argument("--selection-episodes", type=int, default=200)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from eval.features import FeatureBank
    from models import bundled_weights
    from models.rule_params import RuleParams, rule_params_path, save_rule_params

    t0 = time.time()
    bank = FeatureBank(args.backbone, weights=args.weights, cache_dir=args.cache_dir)
    weights = args.weights or bundled_weights(args.backbone)
    out_path = args.out or rule_params_path(weights, args.rule)
    syms = SYMMETRIES if args.symmetries == "all" else SYMMETRIES[:1]
    x, y = training_classes(bank, syms)
    d = x.shape[1]
    candidates = (train_meta_sgd if args.rule == "meta_sgd" else train_hyper)(x, y, d, args, not args.quiet)

    sel = {k: selection_episodes(bank, k, args.selection_episodes, ways=args.ways) for k in (1, 5)}
    proto = lambda xs, ys, ways: _prototype_head(xs, ys, ways)  # noqa: E731
    reference = {f"{k}-shot": round(100 * float(np.mean(episode_accuracy(proto, *sel[k]))), 2) for k in sel}
    results = []
    for c in candidates:
        accs = {f"{k}-shot": episode_accuracy(c["head"], *sel[k]) for k in sel}
        c["selection"] = {key: {"mean": round(100 * float(np.mean(a)), 2), "ci95": _ci(a)} for key, a in accs.items()}
        c["score"] = float(np.mean([np.mean(a) for a in accs.values()]))
        loss = None if math.isnan(c["final_loss"]) else round(c["final_loss"], 4)
        results.append({"candidate": c["name"], "settings": c["settings"], "final_loss": loss,
                        "selection": c["selection"]})
        if not args.quiet:
            print(f"{args.rule} {c['name']}: selection " +
                  ", ".join(f"{k} {v['mean']:.2f}" for k, v in c["selection"].items()), file=sys.stderr)
    best = max(candidates, key=lambda c: c["score"])
    card = {
        "rule": args.rule,
        "command": "fwserve train-rule " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backbone": args.backbone, "weights": str(weights.name if weights else "random"),
        "data": {"images": "training split, digits 0-4 (models/data.py)", "symmetries": list(syms),
                 "classes": int(len(torch.unique(y))), "examples": int(len(y))},
        "episodes": {"ways": args.ways, "shots": list(args.shots), "queries": args.queries, "batch": args.batch,
                     "iterations": args.iterations, "meta_lr": args.meta_lr},
        "seed": args.seed,
        "selection": {"split": "selection, digits 5-9", "episodes": args.selection_episodes, "queries": 15,
                      "prototype": reference, "candidates": results},
        "chosen": best["name"], "settings": best["settings"],
        "seconds": round(time.time() - t0, 1),
    }
    params = RuleParams(args.rule, best["tensors"], bank.bb.fingerprint, card)
    save_rule_params(out_path, params)
    card_path = out_path.with_suffix(".md")
    card_path.write_text(render_card(card))
    print(json.dumps({"out": str(out_path), "card": str(card_path), "chosen": best["name"],
                      "selection": best["selection"], "prototype": reference, "seconds": card["seconds"]}))
    return 0


def _prototype_head(xs, ys, ways):
    """The prototype rule's episodic head (cosine to the class means), for the card's reference."""
    onehot = F.one_hot(ys, ways).to(xs.dtype)
    means = F.normalize((onehot.T @ F.normalize(xs, dim=1)) / onehot.sum(0)[:, None], dim=1)
    return means, xs.new_zeros(ways)


def render_card(card: dict) -> str:
    sel = card["selection"]
    lines = [f"# Learned rule `{card['rule']}` for {card['backbone']}", "",
             f"Made by `{card['command']}` (seed {card['seed']}, {card['seconds']} s).", "",
             "## Data", "",
             f"- {card['data']['images']}, under {len(card['data']['symmetries'])} symmetries of the square "
             f"({', '.join(card['data']['symmetries'])}): {card['data']['classes']} classes, "
             f"{card['data']['examples']} examples. No novel digit (5-9), no selection or held-out image.",
             f"- Episodes: {card['episodes']['ways']}-way, shots {card['episodes']['shots']} alternating, "
             f"{card['episodes']['queries']} queries per class, {card['episodes']['batch']} episodes per iteration, "
             f"{card['episodes']['iterations']} iterations per candidate (Adam, lr {card['episodes']['meta_lr']}).",
             "", "## Selection split (digits 5-9; choices only, never reported as results)", "",
             f"{sel['episodes']} episodes per shot count, {sel['queries']} queries per class; accuracy (%) "
             "mean [95% bootstrap interval over episodes].", "",
             "| candidate | final loss | 1-shot | 5-shot |", "|---|---|---|---|",
             f"| prototype (reference) | — | {sel['prototype']['1-shot']:.2f} | {sel['prototype']['5-shot']:.2f} |"]
    for c in sel["candidates"]:
        s = c["selection"]
        loss = "—" if c["final_loss"] is None else f"{c['final_loss']:.3f}"
        lines.append(f"| {c['candidate']} | {loss} | {s['1-shot']['mean']:.2f} {s['1-shot']['ci95']} "
                     f"| {s['5-shot']['mean']:.2f} {s['5-shot']['ci95']} |")
    lines += ["", f"Chosen: **{card['chosen']}** (the best mean of 1-shot and 5-shot), settings "
              f"`{json.dumps(card['settings'], sort_keys=True)}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

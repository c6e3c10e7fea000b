"""How far the frozen features let a rule go: ceilings measured on the selection split only.

    python -m eval.diagnostics [--cache-dir DIR] [--json FILE]

Three questions the evaluation's missed targets raise, each answered with an upper bound that
no online rule on these features can beat (every figure on the selection split: choices and
diagnostics only, never the held-out test split):

- few-shot (the learned-rule targets): nearest class mean under the metric M = (S + lam I)^-1,
  S the within-class covariance of the backbone's own training digits 0-4 (what `hyper` ships),
  against the same metric with S taken from the novel digits 5-9 themselves: an oracle that
  knows the new classes' covariance, which no rule trained on digits 0-4 has.
- label-free (the corruption target): re-standardising each corrupted set per dimension onto
  the source statistics (what `feature_stats` does online) against aligning the full
  covariance (CORAL-style whitening and re-colouring), both with the statistics of the whole
  corrupted set at once: a batch oracle of any online estimate.
- new classes after k labels (the novel-class target): ridge regression onto one-hot targets
  (what `rls` computes) against ridge whose penalty is the source within-class covariance
  (W = Y^T X (X^T X + lam (S + gamma I))^-1): the prior that the new classes vary within a class
  the way the old ones do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

SHOTS = (1, 5)
LABELS_PER_CLASS = (5, 10, 20, 50)


def _normalised(S: torch.Tensor) -> torch.Tensor:
    return S / (torch.trace(S) / len(S))


def _inverse_shrunk(S: torch.Tensor, lam: float) -> torch.Tensor:
    ev, V = torch.linalg.eigh(_normalised(S))
    return (V * (1.0 / (ev.clamp_min(0.0) + lam))) @ V.T


def _within(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from eval.train_rule import within_class_covariance

    return within_class_covariance(x, y)


def _features(bank, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bank(images)).double()


def _split(name: str, classes, limit: Optional[int]):
    from eval.data import per_class
    from eval.data import mnist as dataset

    data = dataset(name, classes)
    return per_class(data, limit, seed=0) if limit else data


def few_shot(bank, episodes: int, limit: Optional[int], lams=(0.03, 0.1, 0.3, 1.0, 3.0)) -> dict:
    from eval.train_rule import class_mean_head, episode_accuracy, selection_episodes
    from models.data import KNOWN_CLASSES, NOVEL_CLASSES

    train = _split("train", KNOWN_CLASSES, limit)
    S_source = _within(_features(bank, train.images), torch.from_numpy(train.labels).long())
    novel = _split("selection", NOVEL_CLASSES, limit)
    S_novel = _within(_features(bank, novel.images), torch.from_numpy(novel.labels).long())
    sel = {k: selection_episodes(bank, k, episodes) for k in SHOTS}
    rows = []
    for source, S in (("digits 0-4 (training split)", S_source), ("oracle: digits 5-9 (selection split)", S_novel)):
        for lam in lams:
            M = _inverse_shrunk(S, lam).float()
            head = lambda xs, ys, ways, M=M: class_mean_head(xs, ys, ways, M)  # noqa: E731
            acc = {f"{k}-shot": round(100 * float(np.mean(episode_accuracy(head, *sel[k]))), 2) for k in SHOTS}
            rows.append({"covariance": source, "lam": lam, **acc})
    return {"episodes": episodes, "rows": rows}


def label_free(bank, corruptions: list[str], limit: Optional[int], cache_dir: Optional[Path],
               eps=(0.1, 0.3, 1.0)) -> dict:
    from eval.data import corrupted
    from models.data import KNOWN_CLASSES

    train = _split("train", KNOWN_CLASSES, limit)
    fs = _features(bank, train.images)
    mu_s, var_s, C_s = fs.mean(0), fs.var(0), torch.cov(fs.T)
    W0, b0 = bank.W0.double(), bank.b0.double()
    clean = _split("selection", KNOWN_CLASSES, limit)

    def power(C: torch.Tensor, p: float, e: float) -> torch.Tensor:
        ev, V = torch.linalg.eigh(C + e * torch.trace(C) / len(C) * torch.eye(len(C), dtype=C.dtype))
        return (V * ev.clamp_min(1e-12) ** p) @ V.T

    rows = []
    for name in corruptions:
        data = corrupted(clean, name, 5, cache_dir=cache_dir)
        f, y = _features(bank, data.images), torch.from_numpy(data.labels)
        err = lambda z: round(100 * float(((z @ W0.T + b0).argmax(1) != y).double().mean()), 2)  # noqa: E731
        mu_t = f.mean(0)
        row = {"corruption": name, "static": err(f),
               "per-dimension": err((f - mu_t) * ((var_s + 1e-5) / (f.var(0) + 1e-5)).sqrt() + mu_s)}
        C_t = torch.cov(f.T)
        for e in eps:
            row[f"full covariance, eps {e}"] = err((f - mu_t) @ (power(C_s, 0.5, e) @ power(C_t, -0.5, e)).T + mu_s)
        rows.append(row)
    keys = [k for k in rows[0] if k != "corruption"] if rows else []
    mean = {k: round(float(np.mean([r[k] for r in rows])), 2) for k in keys}
    ratio = {k: round(mean[k] / mean["static"], 3) for k in keys} if rows else {}
    return {"corruptions": corruptions, "rows": rows, "mean": mean, "ratio_to_static": ratio}


def ridge_head(xs: torch.Tensor, ys: torch.Tensor, ways: int, penalty: torch.Tensor) -> torch.Tensor:
    """W [ways, d] minimising ||xs W^T - onehot(ys)||^2 + tr(W penalty W^T); with penalty = lambda I
    it is the head rls reaches after these rows (server/rules/rls.py)."""
    T = F.one_hot(ys, ways).to(xs.dtype)
    return torch.linalg.solve(xs.T @ xs + penalty, xs.T @ T).T


def new_classes(bank, seeds: int, limit: Optional[int], lam: float, gammas=(0.01, 0.03, 0.1, 1.0),
                prior_lams=(10.0, 30.0, 100.0)) -> dict:
    from models.data import KNOWN_CLASSES, NOVEL_CLASSES

    train = _split("train", KNOWN_CLASSES, limit)
    S = _normalised(_within(_features(bank, train.images), torch.from_numpy(train.labels).long()))
    novel = _split("selection", NOVEL_CLASSES, limit)
    X, Y = _features(bank, novel.images), torch.from_numpy(novel.labels).long()
    Y = Y - Y.min()
    ways, d = int(Y.max()) + 1, X.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    per = min(int((Y == c).sum()) for c in range(ways))
    ks = [k for k in LABELS_PER_CLASS if k < per]

    methods = {f"ridge, lambda {lam:g} I (rls)": lam * eye}
    for pl in prior_lams:
        for g in gammas:
            methods[f"ridge, {pl:g} (S + {g:g} I)"] = pl * (S + g * eye)
    acc = {m: {k: [] for k in ks} for m in methods}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        order = [rng.permutation(np.nonzero(Y.numpy() == c)[0]) for c in range(ways)]
        test = np.concatenate([o[max(ks):] for o in order])
        for k in ks:
            rows = np.concatenate([o[:k] for o in order])
            for m, penalty in methods.items():
                W = ridge_head(X[rows], Y[rows], ways, penalty)
                acc[m][k].append(float(((X[test] @ W.T).argmax(1) == Y[test]).double().mean()))
    table = [{"method": m, **{f"after {k}/class": round(100 * float(np.mean(v)), 2) for k, v in a.items()}}
             for m, a in acc.items()]
    return {"seeds": seeds, "test_per_class": per - max(ks), "rows": table}


def markdown(res: dict) -> str:
    def table(rows: list[dict]) -> list[str]:
        keys = list(rows[0])
        return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
               ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]

    out = ["# Ceilings of the frozen features (selection split)", "",
           "Made by `python -m eval.diagnostics --markdown docs/eval/diagnostics.md` (eval/diagnostics.py: "
           "what each row computes). Diagnostics only: no figure here is a result of the report.", "",
           "## Few-shot episodes: class means under (S + lam I)^-1, accuracy (%)", ""]
    out += table(res["few_shot"]["rows"])
    lf = res["label_free"]
    out += ["", "## Label-free, severity 5: error (%) with the whole corrupted set's statistics", ""]
    out += table(lf["rows"] + [{"corruption": "mean", **lf["mean"]}, {"corruption": "ratio to static",
                                                                       **lf["ratio_to_static"]}])
    out += ["", "## New classes after k labels per class: held-out accuracy (%)", ""]
    out += table(res["new_classes"]["rows"])
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.diagnostics", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="feature and corruption cache (eval/features.py)")
    p.add_argument("--corruptions", nargs="*", default=None,
                   help="default: every corruption but the pre-registered degenerate ones")
    p.add_argument("--episodes", type=int, default=200, help="selection episodes per shot count")
    p.add_argument("--seeds", type=int, default=10, help="stream orders for the new-class rows")
    p.add_argument("--rls-lambda", type=float, default=None, help="default: the pre-registered novel rls lambda")
    p.add_argument("--limit", type=int, default=None, help="images per class of every split (a quick run)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from eval.data import CORRUPTIONS
    from eval.features import FeatureBank

    prereg_path = Path(__file__).resolve().parents[1] / "docs" / "eval" / "preregistration.json"
    prereg = json.loads(prereg_path.read_text()) if prereg_path.is_file() else {}
    corruptions = args.corruptions if args.corruptions is not None else \
        [c for c in CORRUPTIONS if c not in prereg.get("excluded_corruptions", {})]
    lam = args.rls_lambda or float(prereg.get("settings", {}).get("novel", {}).get("rls", {}).get("hyper", {})
                                   .get("lambda", 1.0))
    bank = FeatureBank("fwserve-mnist-vit", cache_dir=args.cache_dir)
    res = {"split": "selection",
           "few_shot": few_shot(bank, args.episodes, args.limit),
           "label_free": label_free(bank, corruptions, args.limit, args.cache_dir),
           "new_classes": new_classes(bank, args.seeds, args.limit, lam)}
    text = markdown(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

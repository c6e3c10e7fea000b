"""Every choice of the report, made on the *selection* split and written down before the test
split is scored:

    python -m eval.validate --out docs/eval

1. Settings. Each rule's grid (``Rule.search_space``; sgd and rls also try both inits; the
   offline fine-tune of the base head its learning rate and epochs) runs on the selection
   split's known digits under all 15 corruptions at the highest severity, in every stream order
   the report uses (i.i.d., Dirichlet label shift, class-correlated), 5 stream seeds (each its
   own 60/40 split). Score: the mean of final and prequential accuracy over all those streams. A
   numeric axis whose best value sits at the edge of its grid is extended past the edge (one
   grid step at a time, within the hyper-parameter's range) until the best value is inside or
   the range ends. New-class settings: the same on the novel streams (i.i.d. and
   class-incremental), score the mean of final accuracy over both orders and held-out
   accuracy after 20 labels per class (i.i.d.).
2. Decisions (pre-registration), from a full selection-split run with those settings (every
   benchmark at the highest severity, 10 seeds, the offline baselines):
   - degenerate corruptions, left out of the headline means: static's severity-5 error below
     5% (nothing to adapt to) or the reference's above 40% (the digit is gone);
   - static after k labels: finetune@5 or prototype@5, whichever errs less at severity 5;
   - the label-free rule of the targets: lowest error ratio to static at severity 5 among the
     label-free rules whose Dirichlet prequential error is not above static's (if none is, the
     lowest ratio);
   - the supervised rule: lowest severity-5 error; the new-class rule: highest held-out
     accuracy after 20 labels per class.
Writes validation.md (every grid point), preregistration.json (machine-readable; `fwserve
eval` reads it) and PREREGISTRATION.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from eval import data as D
from eval.benchmarks import Plan
from eval.evaluate import evaluate
from eval.protocol import LABEL_FREE, SHOTS, SUPERVISED
from eval.simulate import method
from server.rules import RULES, Hyper

FINETUNE_GRID = {"lr": (0.01, 0.1, 1.0), "epochs": (10, 100, 1000)}
FINETUNE_EPOCHS = Hyper(20.0, 1.0, 1000.0, low_open=False)  # passes over the 5 x 5 shots, at most 1000
INIT_CHOICES = {"sgd": ("base", "zeros"), "rls": ("zeros", "base")}
DEGENERATE_STATIC_ERROR = 0.05
DEGENERATE_REFERENCE_ERROR = 0.40
MAX_EXTENSIONS = 3


def grid(space: dict) -> list[dict]:
    return [dict(zip(space, values)) for values in itertools.product(*space.values())] or [{}]


def _numeric_axes(space: dict) -> list[str]:
    return [k for k, v in space.items() if len(v) >= 3 and all(isinstance(x, (int, float)) and x > 0 for x in v)]


def _extend(axis_values: tuple, best, hyper=None) -> Optional[float]:
    """The next value past the edge where `best` sits (a geometric step), or None."""
    vals = sorted(axis_values)
    if best not in (vals[0], vals[-1]) or best == 0 or (vals[0] == 0 and best == vals[-1] and len(vals) == 2):
        return None  # 0 is its own edge (e.g. rls.prior = 0, plain ridge): a geometric step never leaves it
    step = vals[1] / vals[0] if best == vals[0] else vals[-1] / vals[-2]
    new = best / step if best == vals[0] else best * step
    new = int(round(new)) if isinstance(best, int) else float(f"{new:.2g}")
    if hyper is not None and not (hyper.low < new <= hyper.high if hyper.low_open else hyper.low <= new <= hyper.high):
        return None
    return new


class Search:
    """Grid search of one rule (or the fine-tune baseline) in one family, with edge extension."""

    def __init__(self, family: str, name: str, space: dict, make, score, hypers: dict) -> None:
        self.family, self.name, self.space, self.make, self.score, self.hypers = family, name, dict(space), make, \
            score, hypers
        self.results: dict[tuple, float] = {}
        self.extended: list[str] = []
        self.at_edge: list[str] = []  # numeric axes still at an edge after MAX_EXTENSIONS

    def run(self, settings: list[dict]) -> None:
        todo = [s for s in settings if self._key(s) not in self.results]
        for s, value in zip(todo, self.score([self.make(s) for s in todo])):
            self.results[self._key(s)] = value

    def _key(self, s: dict) -> tuple:
        return tuple(sorted(s.items()))

    def best(self) -> dict:
        scored = {k: v for k, v in self.results.items() if not math.isnan(v)} or self.results
        return dict(max(scored, key=scored.get))

    def search(self) -> dict:
        self.run(grid(self.space))
        for axis in _numeric_axes(self.space):
            for _ in range(MAX_EXTENSIONS):
                b = self.best()
                new = _extend(tuple(self.space[axis]), b[axis], self.hypers.get(axis))
                if new is None:
                    break
                self.space[axis] = tuple(sorted(set(self.space[axis]) | {new}))
                self.extended.append(f"{axis}={new:g}")
                self.run([{**b, axis: new}])
            b = self.best()
            if _extend(tuple(self.space[axis]), b[axis], self.hypers.get(axis)) is not None:
                self.at_edge.append(axis)
        return self.best()


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def base_score(rows: list[dict], names: list[str]) -> list[float]:
    """Per method name: mean of (final + prequential) / 2 over every stream."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(0.5 * (r["final"] + r["prequential"]))
    return [_mean(by.get(n, [])) for n in names]


def novel_score(rows: list[dict], names: list[str]) -> list[float]:
    out = []
    for n in names:
        mine = [r for r in rows if r["method"] == n]
        fin = [_mean([r["final"] for r in mine if r["order"] == o]) for o in sorted({r["order"] for r in mine})]
        ck = _mean([r["ckpt"]["20"] for r in mine if r["order"] == "iid"])
        out.append(_mean(fin + [ck]))
    return out


def settings_search(bank, seeds: int, cache_dir, workers: int, subset=None, progress=False,
                    rules=SUPERVISED + LABEL_FREE) -> tuple[dict, list[Search]]:
    base_plan = Plan(split="selection", benchmarks=("shift",), severities=(5,), seeds=seeds, cache_dir=cache_dir,
                     workers=workers, subset=subset)
    novel_plan = Plan(split="selection", benchmarks=("novel",), seeds=seeds, cache_dir=cache_dir, workers=workers,
                      subset=subset)

    def scorer(plan, family, fn):
        def score(ms):
            t0 = time.time()
            rows = evaluate(plan, bank, {}, (), methods={family: ms}, baseline_seeds=0, pixels=False,
                            progress=progress)["streams"]
            rows = [r for r in rows if r["shift"] != "clean"]
            print(f"validate: {family} {len(ms)} settings ({ms[0].rule}) in {time.time() - t0:.0f} s", file=sys.stderr,
                  flush=True)
            return fn(rows, [m.name for m in ms])
        return score

    searches = []
    settings: dict = {"base": {}, "novel": {}}
    for r in rules:
        rule = RULES[r]
        space = dict(rule.search_space)
        inits = INIT_CHOICES.get(r, ("base",) if r in LABEL_FREE else ("zeros",))
        if len(inits) > 1:
            space["init"] = inits

        def make(s, r=r, inits=inits):
            hyper = {k: v for k, v in s.items() if k != "init"}
            return method(json.dumps(s, sort_keys=True), r, hyper, init=s.get("init", inits[0]),
                          labelled=r not in LABEL_FREE)

        sr = Search("base", r, space, make, scorer(base_plan, "base", base_score), rule.hyper)
        best = sr.search()
        settings["base"][r] = {"hyper": {k: v for k, v in best.items() if k != "init"}, "init": best.get("init",
                                                                                                         inits[0])}
        searches.append(sr)
        if r in SUPERVISED:
            nspace = dict(rule.search_space)
            sn = Search("novel", r, nspace,
                        lambda s, r=r: method(json.dumps(s, sort_keys=True), r, s, steps=1),
                        scorer(novel_plan, "novel", novel_score), rule.hyper)
            settings["novel"][r] = {"hyper": sn.search()}
            searches.append(sn)
    ft = Search("base", "finetune", FINETUNE_GRID,
                lambda s: method(json.dumps(s, sort_keys=True), "sgd", {"lr": s["lr"]}, init="base", budget=SHOTS,
                                 fit_epochs=int(s["epochs"])),
                scorer(base_plan, "base", base_score), {"lr": RULES["sgd"].hyper["lr"], "epochs": FINETUNE_EPOCHS})
    b = ft.search()
    settings["base"]["finetune"] = {"hyper": {"lr": b["lr"]}, "epochs": int(b["epochs"])}
    searches.append(ft)
    return settings, searches


def decisions(results: dict, top: int) -> dict:
    """The pre-registered choices, from a selection run with the chosen settings."""
    rows = results["streams"]
    shift = [r for r in rows if r["benchmark"] == "shift" and r["severity"] == top]

    def err(method_name, order="iid", key="final", exclude=()):
        cells = [1 - r[key] for r in shift if r["method"] == method_name and r["order"] == order
                 and r["shift"] not in exclude]
        return _mean(cells)

    corruptions = sorted({r["shift"] for r in shift})
    static_err = {c: _mean([1 - r["final"] for r in shift if r["shift"] == c and r["method"] == "static"
                            and r["order"] == "iid"]) for c in corruptions}
    ref_err = {c: _mean([1 - b["reference"] for b in results["baselines"] if b["benchmark"] == "shift"
                         and b["shift"] == c and b["severity"] == top]) for c in corruptions}
    excluded = {c: (f"static error {100 * static_err[c]:.1f}% < {100 * DEGENERATE_STATIC_ERROR:.0f}%: "
                    "nothing to adapt to") for c in corruptions if static_err[c] < DEGENERATE_STATIC_ERROR}
    excluded.update({c: f"reference error {100 * ref_err[c]:.1f}% > {100 * DEGENERATE_REFERENCE_ERROR:.0f}%: the "
                     "digit is gone" for c in corruptions if ref_err[c] > DEGENERATE_REFERENCE_ERROR})
    ex = tuple(excluded)
    static = err("static", exclude=ex)
    k_base = {m: err(m, exclude=ex) for m in (f"finetune@{SHOTS}", f"prototype@{SHOTS}")}
    static_k = min(k_base, key=k_base.get)
    lf = {}
    for m in LABEL_FREE:
        if not any(r["method"] == m for r in shift):
            continue
        ratio = err(m, exclude=ex) / static
        gap = err(m, "dirichlet", "prequential", ex) - err("static", "dirichlet", "prequential", ex)
        lf[m] = {"ratio": ratio, "dirichlet_gap": gap}
    safe = {m: v for m, v in lf.items() if v["dirichlet_gap"] <= 0}
    pool = safe or lf
    label_free = min(pool, key=lambda m: pool[m]["ratio"])
    sup = {m: err(m, exclude=ex) for m in SUPERVISED if any(r["method"] == m for r in shift)}
    supervised = min(sup, key=sup.get)
    novel = [r for r in rows if r["benchmark"] == "novel" and r["order"] == "iid"]
    nov = {m: _mean([r["ckpt"]["20"] for r in novel if r["method"] == m]) for m in SUPERVISED
           if any(r["method"] == m for r in novel)}
    novel_rule = max(nov, key=nov.get)
    return {"excluded_corruptions": excluded, "static_after_k": static_k, "label_free_rule": label_free,
            "supervised_rule": supervised, "novel_rule": novel_rule,
            "selection": {"static_error": static, "static_after_k_error": k_base, "label_free": lf,
                          "supervised_error": sup, "novel_after_20": nov}}


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m eval.validate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/eval"))
    p.add_argument("--seeds", type=int, default=10, help="stream seeds of the decisions run (as the report)")
    p.add_argument("--search-seeds", type=int, default=5, help="stream seeds of every grid point")
    p.add_argument("--subset", type=int, help="at most this many examples per class (a quick check, not a choice)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/fwserve-eval-cache"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--weights", type=Path, help="backbone checkpoint (default: the bundled weights)")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import torch

    from eval import report
    from eval.features import FeatureBank

    torch.set_num_threads(1)
    started = time.time()
    bank = FeatureBank(weights=args.weights, random_init=args.random_init, cache_dir=args.cache_dir)
    settings, searches = settings_search(bank, args.search_seeds, args.cache_dir, args.workers, args.subset,
                                         progress=not args.quiet)
    plan = Plan(split="selection", seeds=args.seeds, cache_dir=args.cache_dir, workers=args.workers,
                subset=args.subset, severities=(5,))
    results = evaluate(plan, bank, settings, SUPERVISED + LABEL_FREE, progress=not args.quiet)
    dec = decisions(results, plan.top_severity)
    reg = {
        "written_before_the_test_split_was_scored": True,
        "command": "python -m eval.validate " + " ".join(argv), "commit": _git_commit(),
        "weights_sha256": bank.weights_sha256, "seeds": args.seeds, "search_seeds": args.search_seeds,
        "subset": args.subset,
        "settings": settings, **{k: v for k, v in dec.items() if k != "selection"},
        "reference": {"model": "multinomial logistic regression on standardised features",
                      "C_grid": list(report.REFERENCE_CS), "folds": report.REFERENCE_FOLDS,
                      "max_iter": report.REFERENCE_MAX_ITER},
        "targets": report.TARGETS, "bootstrap": {"replicates": report.BOOTSTRAP, "seed": report.BOOTSTRAP_SEED},
        "selection_estimates": dec["selection"], "duration_s": round(time.time() - started, 1),
        "at_grid_edge": {f"{s.family}/{s.name}": s.at_edge for s in searches if s.at_edge},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.md").write_text(validation_md(searches, reg, argv))
    (args.out / "preregistration.json").write_text(json.dumps(reg, indent=1) + "\n")
    (args.out / "PREREGISTRATION.md").write_text(report.preregistration_md(reg, results))
    print(json.dumps({k: reg[k] for k in ("label_free_rule", "supervised_rule", "novel_rule", "static_after_k",
                                          "excluded_corruptions")}, indent=1))
    return 0


def validation_md(searches: list[Search], reg: dict, argv) -> str:
    lines = ["# Settings chosen on the selection split", "",
             f"`python -m eval.validate {' '.join(argv)}` ({reg['duration_s'] / 60:.1f} minutes). Never the test split. "
             "Base-class settings: the selection split's digits 0-4 under all 15 corruptions at severity 5, stream "
             "orders i.i.d., Dirichlet and class-correlated, "
             f"{reg['search_seeds']} seeds (each its own 60/40 split); score = mean of final and prequential accuracy. "
             "New-class settings: novel streams (i.i.d. and class-incremental) scored on the selection split's "
             "5-9; score = mean of final accuracy (both orders) and held-out accuracy after 20 labels per class "
             "(i.i.d.). Values past a grid's edge were tried when the best sat on it. Score in %.", ""]
    for s in searches:
        best = s.best()
        lines += [f"## {s.name} ({'base classes' if s.family == 'base' else 'new classes'})", "",
                  f"chosen: `{json.dumps(best, sort_keys=True)}`" + (f"; extended past the edge: {', '.join(s.extended)}"
                                                                      if s.extended else "")
                  + (f"; **still at the edge** after {MAX_EXTENSIONS} extensions: {', '.join(s.at_edge)} (the score "
                     "still improves there)" if s.at_edge else ""), "",
                  "| setting | score |", "|---|---|"]
        for k, v in sorted(s.results.items(), key=lambda kv: -kv[1]):
            lines.append(f"| `{json.dumps(dict(k), sort_keys=True)}` | {100 * v:.2f}{' **chosen**' if dict(k) == best else ''} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation report: results.json, README.md (tables with 95% intervals, the pre-registered
targets) and PNG plots; also the headline table of the project README.

Rule for a target: it is met only if the whole 95% interval of its statistic (a paired,
two-way bootstrap over corruptions x stream seeds, eval/stats.py) lies on the right side of its
threshold; the estimate alone never meets a target.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from eval.baselines import REFERENCE_CS, REFERENCE_FOLDS, REFERENCE_MAX_ITER  # noqa: F401  (pre-registered)
from eval.protocol import LABEL_FREE, LEARNED, SHOTS, SUPERVISED
from eval.stats import BOOTSTRAP, SEED as BOOTSTRAP_SEED, mean_difference, mean_interval, paired_bootstrap, \
    ratio_of_means

RULE = ("A target counts as met only if its whole 95% interval (paired bootstrap over corruptions x stream "
        "seeds, or over seeds where there is one dataset) lies on the right side of its threshold.")
TARGETS = {
    "label_free": "the pre-registered label-free rule: severity-5 mean final error over the corruptions "
                  "(degenerate ones left out), i.i.d. streams, <= 0.75 x static's",
    "dirichlet": "the same rule and settings on Dirichlet label-shift streams at severity 5: prequential error "
                 "minus static's < +1 point",
    "novel": "new classes, i.i.d. streams: held-out accuracy of the pre-registered rule after 20 labels per class "
             "within 5 points of the cross-validated reference (all stream data)",
    "supervised": f"the pre-registered supervised rule: severity-5 mean final error <= 0.5 x the static-after-"
                  f"{SHOTS}-labels baseline (the pre-registered variant), i.i.d. streams",
    "learned_5shot": "the better learned rule (by its selection-split score, `fwserve train-rule`): 5-way 5-shot "
                     "episodes on the novel digits, accuracy >= prototype's + 5 points (paired over episodes)",
    "learned_1shot": "the same rule, 5-way 1-shot: >= prototype's + 3 points",
    "learned_stream": "the same rule on i.i.d. novel-digit streams: held-out accuracy after 5 labels per class >= "
                      "the best hand-made rule's (paired over seeds)",
}
LEARNED_TARGETS = ("learned_5shot", "learned_1shot", "learned_stream")  # at least: met when the interval is above
DEFAULT_DECISIONS = {"label_free_rule": "feature_stats", "supervised_rule": "rls", "novel_rule": "rls",
                     "static_after_k": f"prototype@{SHOTS}", "excluded_corruptions": {}}


# ---- cells -------------------------------------------------------------------------------------


def cells(rows: list[dict], method: str, value, **where) -> tuple[np.ndarray, list[str], list[int]]:
    """[shift, seed] matrix of value(row) for one method (NaN where missing)."""
    sel = [r for r in rows if r["method"] == method and all(r.get(k) == v for k, v in where.items())]
    shifts = sorted({r["shift"] for r in sel})
    seeds = sorted({r["seed"] for r in sel})
    out = np.full((len(shifts), len(seeds)), np.nan)
    for r in sel:
        v = value(r)
        out[shifts.index(r["shift"]), seeds.index(r["seed"])] = np.nan if v is None else v
    return out, shifts, seeds


def paired(rows, a: str, b: str, value, keep=None, **where) -> tuple[np.ndarray, np.ndarray]:
    """Aligned [shift, seed] cells of methods a and b (only shifts in `keep` when given)."""
    A, sa, ea = cells(rows, a, value, **where)
    B, sb, eb = cells(rows, b, value, **where)
    shifts = [s for s in sa if s in sb and (keep is None or s in keep)]
    seeds = [e for e in ea if e in eb]
    return (A[np.ix_([sa.index(s) for s in shifts], [ea.index(e) for e in seeds])],
            B[np.ix_([sb.index(s) for s in shifts], [eb.index(e) for e in seeds])])


def final_error(r):
    return 1.0 - r["final"]


def preq_error(r):
    return 1.0 - r["prequential"]


def _fmt(est, lo=None, hi=None, scale=100.0, digits=1) -> str:
    if est is None or not np.isfinite(est):
        return "—"
    s = f"{scale * est:.{digits}f}"
    if lo is not None and np.isfinite(lo):
        s += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    return s


def _table(header: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in body])


def _methods(rows) -> list[str]:
    order = ["static", f"finetune@{SHOTS}", f"prototype@{SHOTS}"] + list(SUPERVISED) + list(LEARNED) + list(LABEL_FREE)
    seen = {r["method"] for r in rows}
    return [m for m in order if m in seen] + sorted(seen - set(order))


# ---- targets -------------------------------------------------------------------------------------


def _included(rows, top, excluded) -> list[str]:
    return sorted({r["shift"] for r in rows if r["benchmark"] == "shift" and r["severity"] == top
                   and r["shift"] not in excluded and r["shift"] != "clean"})


def targets(results: dict, reg: dict) -> list[dict]:
    rows = results["streams"]
    shift_rows = [r for r in rows if r["benchmark"] == "shift"]
    out = []
    if shift_rows:
        top = max(r["severity"] for r in shift_rows)
        keep = _included(rows, top, reg["excluded_corruptions"])
        at = [r for r in shift_rows if r["severity"] == top]
        methods = {r["method"] for r in at}
        lf, sup, sk = reg["label_free_rule"], reg["supervised_rule"], reg["static_after_k"]
        if lf in methods:
            a, b = paired(at, lf, "static", final_error, keep, order="iid")
            out.append(_target("label_free", a, b, ratio_of_means, 0.75, "ratio", f"{lf}: {_fmt(np.nanmean(a))}% vs "
                               f"static {_fmt(np.nanmean(b))}% over {a.shape[0]} corruptions x {a.shape[1]} seeds"))
            a, b = paired(at, lf, "static", preq_error, keep, order="dirichlet")
            if a.size:
                out.append(_target("dirichlet", a, b, mean_difference, 0.01, "points",
                                   f"{lf}: {_fmt(np.nanmean(a))}% vs static {_fmt(np.nanmean(b))}% prequential error"))
        if sup in methods and sk in methods:
            a, b = paired(at, sup, sk, final_error, keep, order="iid")
            out.append(_target("supervised", a, b, ratio_of_means, 0.5, "ratio", f"{sup}: {_fmt(np.nanmean(a))}% vs "
                               f"{sk} {_fmt(np.nanmean(b))}%"))
    nov = [r for r in rows if r["benchmark"] == "novel" and r["order"] == "iid" and r["method"] == reg["novel_rule"]]
    ref = [b["reference"] for b in results.get("baselines", []) if b["benchmark"] == "novel"]
    if nov and ref:
        gaps = np.array([[ref[0] - (r["ckpt"]["20"] if r["ckpt"]["20"] is not None else np.nan)
                          for r in sorted(nov, key=lambda r: r["seed"])]])
        est, lo, hi = mean_interval(gaps)
        out.append({"id": "novel", "target": TARGETS["novel"], "estimate": est, "low": lo, "high": hi, "threshold": 0.05,
                    "met": bool(hi < 0.05), "value": f"{reg['novel_rule']} {_fmt(ref[0] - est)}% vs reference "
                    f"{_fmt(ref[0])}%: gap {_fmt(est, lo, hi)} points ({gaps.shape[1]} seeds)"})
    return out + learned_targets(results)


def better_learned_rule(results: dict) -> Optional[str]:
    """The learned rule with the best selection-split score among those the results ran."""
    ran = {e["method"] for e in results.get("episodes") or []} | {r["method"] for r in results["streams"]}
    scores = {r: v.get("selection_score", 0.0) for r, v in (results.get("learned_rules") or {}).items() if r in ran}
    if scores:
        return max(scores, key=scores.get)
    return next((r for r in LEARNED if r in ran), None)


def learned_targets(results: dict) -> list[dict]:
    rule = better_learned_rule(results)
    if rule is None:
        return []
    out = []
    eps = results.get("episodes") or []
    for tid, shots, gain in (("learned_5shot", 5, 0.05), ("learned_1shot", 1, 0.03)):
        a = next((e["accuracies"] for e in eps if e["shots"] == shots and e["method"] == rule), None)
        b = next((e["accuracies"] for e in eps if e["shots"] == shots and e["method"] == "prototype"), None)
        if a is None or b is None:
            continue
        a, b = np.array([a]), np.array([b])
        est, lo, hi = paired_bootstrap(a, b, mean_difference)
        out.append({"id": tid, "target": TARGETS[tid], "estimate": est, "low": lo, "high": hi, "threshold": gain,
                    "met": bool(lo > gain), "value": f"`{rule}` {_fmt(np.mean(a))}% vs prototype {_fmt(np.mean(b))}% "
                    f"over {a.shape[1]} episodes: {_fmt(est, lo, hi)} points"})
    nov = [r for r in results["streams"] if r["benchmark"] == "novel" and r["order"] == "iid"]
    at5 = lambda r: np.nan if r["ckpt"].get("5") is None else r["ckpt"]["5"]  # noqa: E731
    hand = [m for m in SUPERVISED if any(r["method"] == m for r in nov)]
    if any(r["method"] == rule for r in nov) and hand:
        best = max(hand, key=lambda m: np.nanmean([at5(r) for r in nov if r["method"] == m]))
        a, b = paired(nov, rule, best, at5)
        est, lo, hi = paired_bootstrap(a, b, mean_difference)
        out.append({"id": "learned_stream", "target": TARGETS["learned_stream"], "estimate": est, "low": lo,
                    "high": hi, "threshold": 0.0, "met": bool(lo > 0.0),
                    "value": f"`{rule}` {_fmt(np.nanmean(a))}% vs `{best}` {_fmt(np.nanmean(b))}% after 5 labels per "
                    f"class ({a.shape[1]} seeds): {_fmt(est, lo, hi)} points"})
    return out


def _target(tid, a, b, stat, threshold, unit, value) -> dict:
    est, lo, hi = paired_bootstrap(a, b, stat)
    shown = (f"ratio {est:.3f} [{lo:.3f}, {hi:.3f}]" if unit == "ratio"
             else f"{_fmt(est, lo, hi)} points")
    return {"id": tid, "target": TARGETS[tid], "estimate": est, "low": lo, "high": hi, "threshold": threshold,
            "met": bool(hi < threshold), "value": f"{value}; {shown}"}


def _miss(t: dict) -> str:
    if t["met"]:
        return "met"
    if t["id"] in LEARNED_TARGETS:
        if t["estimate"] > t["threshold"]:
            return "**no** (estimate above the threshold, interval crosses it)"
        return f"**no** (missed by {100 * (t['threshold'] - t['estimate']):.1f} points)"
    if t["estimate"] < t["threshold"]:
        return "**no** (estimate below the threshold, interval crosses it)"
    scale = 100.0 if t["id"] in ("dirichlet", "novel") else 1.0
    unit = " points" if scale == 100.0 else ""
    return f"**no** (missed by {scale * (t['estimate'] - t['threshold']):.{1 if scale == 100 else 3}f}{unit})"


# ---- tables --------------------------------------------------------------------------------------


def _mean_ci(rows, method, value, keep=None, **where) -> str:
    m, shifts, _ = cells(rows, method, value, **where)
    if keep is not None:
        m = m[[i for i, s in enumerate(shifts) if s in keep]]
    if not m.size or np.all(np.isnan(m)):
        return "—"
    return _fmt(*mean_interval(m))


def shift_md(results, reg) -> list[str]:
    rows = [r for r in results["streams"] if r["benchmark"] == "shift" and r["shift"] != "clean"]
    if not rows:
        return []
    top = max(r["severity"] for r in rows)
    keep = _included(results["streams"], top, reg["excluded_corruptions"])
    methods = _methods(rows)
    md = ["## Shift: the known digits under the ImageNet-C corruptions", "",
          "Final error (%) on each stream's test part, mean over corruptions and seeds [95% interval], i.i.d. "
          "streams." + (f" Severity {top} without the pre-registered degenerate corruptions: "
                        f"{', '.join(sorted(reg['excluded_corruptions'])) or 'none'}." if reg["excluded_corruptions"] else ""),
          ""]
    sevs = sorted({r["severity"] for r in rows})
    body = []
    for s in sevs:
        body.append([str(s)] + [_mean_ci(rows, m, final_error, None, severity=s, order="iid") for m in methods])
    if reg["excluded_corruptions"]:
        body.append([f"{top}, without degenerate"] + [_mean_ci(rows, m, final_error, keep, severity=top, order="iid")
                                                     for m in methods])
    md += [_table(["severity"] + methods, body), ""]
    base = defaultdict(list)
    for b in results.get("baselines", []):
        if b["benchmark"] == "shift" and b["severity"] == top:
            base.setdefault(b["shift"], []).append(b)
    at = [r for r in rows if r["severity"] == top and r["order"] == "iid"]
    corrs = sorted({r["shift"] for r in at})
    md += [f"Severity {top}, per corruption: final error (%), mean over seeds. *reference*: cross-validated probe on "
           "all labelled stream data (seeds 0-2); *pixels LR / NCM*: the same on raw pixels, nearest class mean.", ""]
    body = []
    for c in corrs:
        line = [c + (" (excluded)" if c in reg["excluded_corruptions"] else "")]
        line += [_fmt(np.nanmean(cells(at, m, final_error, shift=c)[0])) if any(r["method"] == m and r["shift"] == c
                                                                                 for r in at) else "—" for m in methods]
        bs = base.get(c, [])
        line += [_fmt(np.mean([1 - b["reference"] for b in bs])) if bs else "—",
                 _fmt(np.mean([1 - b["pixels_lr"] for b in bs if "pixels_lr" in b])) if bs else "—",
                 _fmt(np.mean([1 - b["pixels_ncm"] for b in bs if "pixels_ncm" in b])) if bs else "—"]
        body.append(line)
    md += [_table(["corruption"] + methods + ["reference", "pixels LR", "pixels NCM"], body), ""]
    md += non_iid_md(results, "shift", top, keep, f"Severity {top}")
    return md


def non_iid_md(results, bench, severity, keep, title) -> list[str]:
    rows = [r for r in results["streams"] if r["benchmark"] == bench and r["shift"] != "clean"
            and (severity is None or r["severity"] == severity)]
    orders = [o for o in ("dirichlet", "correlated", "incremental") if any(r["order"] == o for r in rows)]
    if not orders:
        return []
    methods = _methods(rows)
    reps = defaultdict(list)
    for r in results.get("repeat_previous", []):
        if r["benchmark"] == bench and (severity is None or r["severity"] == severity) and r["shift"] != "clean" \
                and (keep is None or r["shift"] in keep):
            reps[r["order"]].append(r["accuracy"])
    md = [f"{title}, non-i.i.d. streams: prequential error / final error (%), mean [95% interval]; "
          "*repeat previous*: predicting the last label revealed before each request (no learning).", ""]
    body = []
    for o in orders:
        for m in methods:
            body.append([o, m, _mean_ci(rows, m, preq_error, keep, order=o), _mean_ci(rows, m, final_error, keep, order=o)])
        body.append([o, "*repeat previous*", _fmt(1 - np.mean(reps[o])) if reps[o] else "—", "—"])
    return md + [_table(["order", "method", "prequential error", "final error"], body), ""]


def shifts_md(results, reg) -> list[str]:
    rows = [r for r in results["streams"] if r["benchmark"] == "shifts"]
    if not rows:
        return []
    methods = _methods(rows)
    names = sorted({r["shift"] for r in rows})
    base = defaultdict(list)
    for b in results.get("baselines", []):
        if b["benchmark"] == "shifts":
            base[b["shift"]].append(b)
    md = ["## Realistic shifts: rotation, inversion, stroke width, MNIST-M-style photo blends", "",
          "Final error (%), i.i.d. streams, mean over seeds; last row: mean over the shifts [95% interval].", ""]
    body = [[n] + [_fmt(np.nanmean(cells(rows, m, final_error, shift=n, order="iid")[0])) for m in methods]
            + [_fmt(np.mean([1 - b["reference"] for b in base[n]])) if base[n] else "—",
               _fmt(np.mean([1 - b["pixels_lr"] for b in base[n] if "pixels_lr" in b])) if base[n] else "—"]
            for n in names]
    body.append(["**mean**"] + [_mean_ci(rows, m, final_error, None, order="iid") for m in methods] + ["", ""])
    md += [_table(["shift"] + methods + ["reference", "pixels LR"], body), ""]
    return md + non_iid_md(results, "shifts", None, None, "Realistic shifts")


def domain_md(results) -> list[str]:
    rows = [r for r in results["streams"] if r["benchmark"] == "domain"]
    if not rows:
        return []
    methods = _methods(rows)
    bs = [b for b in results.get("baselines", []) if b["benchmark"] == "domain"]
    md = ["## Domain: scikit-learn's 8x8 digits 0-4, upsampled", "",
          "Final error / prequential error (%), mean over seeds [95% interval]" + (
              f"; reference {_fmt(np.mean([1 - b['reference'] for b in bs]))}%, pixels LR "
              f"{_fmt(np.mean([1 - b['pixels_lr'] for b in bs if 'pixels_lr' in b]))}%" if bs else "") + ".", ""]
    orders = [o for o in ("iid", "dirichlet", "correlated") if any(r["order"] == o for r in rows)]
    body = [[m] + [f"{_mean_ci(rows, m, final_error, order=o)} / {_mean_ci(rows, m, preq_error, order=o)}"
                   for o in orders] for m in methods]
    reps = defaultdict(list)
    for r in results.get("repeat_previous", []):
        if r["benchmark"] == "domain":
            reps[r["order"]].append(r["accuracy"])
    body.append(["*repeat previous*"] + [f"— / {_fmt(1 - np.mean(reps[o]))}" if reps[o] else "—" for o in orders])
    return md + [_table(["method"] + orders, body), ""]


def novel_md(results, bench: str = "novel", title: str = "New classes: digits 5-9, never seen by the backbone") -> list[str]:
    rows = [r for r in results["streams"] if r["benchmark"] == bench]
    md = []
    if rows:
        bs = [b for b in results.get("baselines", []) if b["benchmark"] == bench]
        ref = bs[0] if bs else None
        md += [f"## {title}", "",
               "Held-out accuracy (%) after k labels per class, and after the whole stream (final); mean over seeds "
               "[95% interval]." + (f" Reference (cross-validated probe on all {rows[0]['n_stream']} labelled stream "
                                    f"examples): **{_fmt(ref['reference'])}** (C = {ref['reference_C']:g}); pixels LR "
                                    f"{_fmt(ref.get('pixels_lr'))}, pixels NCM {_fmt(ref.get('pixels_ncm'))}."
                                    if ref else ""), ""]
        methods = _methods(rows)
        ks = sorted({int(k) for r in rows for k in r["ckpt"]})
        body = []
        for o in sorted({r["order"] for r in rows}):
            for m in methods:
                line = [o, m]
                for k in ks:
                    vals = np.array([[r["ckpt"][str(k)] if r["ckpt"][str(k)] is not None else np.nan
                                      for r in rows if r["method"] == m and r["order"] == o]])
                    line.append(_fmt(*mean_interval(vals)) if vals.size and not np.all(np.isnan(vals)) else "—")
                fin = np.array([[r["final"] for r in rows if r["method"] == m and r["order"] == o]])
                line.append(_fmt(*mean_interval(fin)) if fin.size else "—")
                pre = np.array([[r["prequential"] for r in rows if r["method"] == m and r["order"] == o]])
                line.append(_fmt(*mean_interval(pre)) if pre.size else "—")
                body.append(line)
            if o != "iid":
                reps = [r["accuracy"] for r in results.get("repeat_previous", []) if r["benchmark"] == bench
                        and r["order"] == o]
                body.append([o, "*repeat previous*"] + ["—"] * (len(ks) + 1) + [_fmt(np.mean(reps)) if reps else "—"])
        md += [_table(["order", "method"] + [f"after {k}/class" for k in ks] + ["final", "prequential"], body), ""]
    eps = results.get("episodes") or [] if bench == "novel" else []
    if eps:
        md += ["Episodes (5-way, supports shuffled, 15 queries per class): accuracy (%), mean [95% interval over "
               "episodes].", ""]
        methods = sorted({e["method"] for e in eps})
        body = [[f"{e0['ways']}-way {k}-shot"] + [
            _fmt(*mean_interval(np.array([next(e for e in eps if e["shots"] == k and e["method"] == m)["accuracies"]])))
            for m in methods] for k in sorted({e["shots"] for e in eps}) for e0 in [eps[0]]]
        md += [_table(["episode"] + methods, body), ""]
    return md


# ---- headline (project README) -------------------------------------------------------------------


def headline(results: dict) -> str:
    """The project README's headline table, generated from results.json (tests/test_readme.py
    checks the README carries exactly this)."""
    reg = results.get("decisions") or DEFAULT_DECISIONS
    rows = results["streams"]
    lf, sup, sk, nov = reg["label_free_rule"], reg["supervised_rule"], reg["static_after_k"], reg["novel_rule"]
    body = []
    shift = [r for r in rows if r["benchmark"] == "shift" and r["shift"] != "clean"]
    if shift:
        top = max(r["severity"] for r in shift)
        keep = _included(rows, top, reg["excluded_corruptions"])
        at = [r for r in shift if r["severity"] == top]
        ref = [1 - b["reference"] for b in results["baselines"] if b["benchmark"] == "shift" and b["severity"] == top
               and b["shift"] in keep]
        body.append([f"MNIST 0-4 under {len(keep)} ImageNet-C corruptions, severity {top}: final error",
                     _mean_ci(at, "static", final_error, keep, order="iid"),
                     _mean_ci(at, sk, final_error, keep, order="iid"),
                     f"`{lf}` " + _mean_ci(at, lf, final_error, keep, order="iid"),
                     f"`{sup}` " + _mean_ci(at, sup, final_error, keep, order="iid"), _fmt(np.mean(ref)) if ref else "—"])
        if any(r["order"] == "dirichlet" for r in at):
            body.append(["the same, Dirichlet label-shift streams: prequential error",
                         _mean_ci(at, "static", preq_error, keep, order="dirichlet"),
                         _mean_ci(at, sk, preq_error, keep, order="dirichlet"),
                         f"`{lf}` " + _mean_ci(at, lf, preq_error, keep, order="dirichlet"),
                         f"`{sup}` " + _mean_ci(at, sup, preq_error, keep, order="dirichlet"), "—"])
    for bench, title in (("shifts", "realistic shifts (rotation, inversion, stroke width, photo blends): final error"),
                         ("domain", "scikit-learn 8x8 digits (a new domain): final error")):
        rs = [r for r in rows if r["benchmark"] == bench]
        if rs:
            ref = [1 - b["reference"] for b in results["baselines"] if b["benchmark"] == bench]
            body.append([title, _mean_ci(rs, "static", final_error, order="iid"),
                         _mean_ci(rs, sk, final_error, order="iid"), f"`{lf}` " + _mean_ci(rs, lf, final_error, order="iid"),
                         f"`{sup}` " + _mean_ci(rs, sup, final_error, order="iid"), _fmt(np.mean(ref)) if ref else "—"])
    nv = [r for r in rows if r["benchmark"] == "novel" and r["order"] == "iid"]
    if nv:
        ref = [b["reference"] for b in results["baselines"] if b["benchmark"] == "novel"]

        def acc(m):
            v = np.array([[r["ckpt"]["20"] if r["ckpt"]["20"] is not None else np.nan for r in nv if r["method"] == m]])
            return _fmt(*mean_interval(v)) if v.size else "—"
        body.append(["unseen digits 5-9: held-out accuracy after 20 labels per class", "—", acc(f"prototype@{SHOTS}"),
                     "—", f"`{nov}` " + acc(nov), _fmt(ref[0]) if ref else "—"])
    header = ["benchmark (%, mean [95% interval])", "static head", f"static after {SHOTS} labels/class",
              "label-free (pre-registered)", "supervised (pre-registered)", "reference (CV probe, all labels)"]
    return _table(header, body)


# ---- pre-registration ------------------------------------------------------------------------------


def preregistration_md(reg: dict, selection: dict) -> str:
    sel = reg["selection_estimates"]
    lines = ["# Pre-registration", "",
             f"Written by `{reg['command']}` on the **selection split** (commit `{reg['commit']}`, weights sha256 "
             f"`{reg['weights_sha256'][:16]}`) and committed before `fwserve eval` scored the test split. "
             "`fwserve eval` reads [preregistration.json](preregistration.json); the report records its sha256.", "",
             "## Fixed before the test split is scored", "",
             f"- Label-free rule for the targets: **`{reg['label_free_rule']}`** with "
             f"`{json.dumps(reg['settings']['base'][reg['label_free_rule']]['hyper'], sort_keys=True)}`.",
             f"- Supervised rule: **`{reg['supervised_rule']}`** with "
             f"`{json.dumps(reg['settings']['base'][reg['supervised_rule']], sort_keys=True)}`; static after "
             f"{SHOTS} labels: **`{reg['static_after_k']}`**.",
             f"- New-class rule: **`{reg['novel_rule']}`** with "
             f"`{json.dumps(reg['settings']['novel'][reg['novel_rule']]['hyper'], sort_keys=True)}`.",
             "- Degenerate corruptions left out of the headline means: " + (
                 "; ".join(f"`{c}` ({why})" for c, why in sorted(reg["excluded_corruptions"].items())) or "none") + ".",
             f"- Reference: {reg['reference']['model']}, C chosen by {reg['reference']['folds']}-fold cross-validation "
             f"from {', '.join(f'{c:g}' for c in reg['reference']['C_grid'])}.",
             f"- Statistics: {RULE} Bootstrap: {reg['bootstrap']['replicates']} replicates, seed "
             f"{reg['bootstrap']['seed']}; {reg['seeds']} stream seeds, each with its own 60/40 stream/test split.",
             "- Every other rule's settings: [preregistration.json](preregistration.json) (`settings`), chosen as "
             "described in [validation.md](validation.md).", "", "## Targets", ""]
    lines += [f"- `{k}`: {v}" for k, v in reg["targets"].items()]
    lines += ["", "## What the selection split predicts (not a result)", "",
              f"- static: {_fmt(sel['static_error'])}% severity-5 error (without degenerate corruptions); "
              + "; ".join(f"{k} {_fmt(v)}%" for k, v in sel["static_after_k_error"].items()),
              "- label-free: " + "; ".join(f"`{m}` ratio {v['ratio']:.3f}, Dirichlet prequential gap "
                                           f"{100 * v['dirichlet_gap']:+.1f} points"
                                           for m, v in sorted(sel["label_free"].items())),
              "- supervised: " + "; ".join(f"`{m}` {_fmt(v)}%" for m, v in sorted(sel["supervised_error"].items())),
              "- new classes after 20 labels per class: " + "; ".join(f"`{m}` {_fmt(v)}%" for m, v in
                                                                     sorted(sel["novel_after_20"].items())), ""]
    return "\n".join(lines) + "\n"


# ---- markdown ----------------------------------------------------------------------------------


PROTOCOL = f"""## Protocol

- **Splits.** models/data.py: per class 100 held-out digits (this report's test split), 100 selection
  digits (every choice: [validation.md](validation.md), [PREREGISTRATION.md](PREREGISTRATION.md)), 300
  training digits (the backbone's, for 0-4; the labelled streams, for 5-9). The domain benchmark uses
  the test half of scikit-learn's digits.
- **Streams.** Sessions of the server's own rule code (server/rules, the same kernels) on cached
  backbone features; requests of 10 instances: each instance is predicted by the head as it is, then the
  request adapts it (prequential). Supervised rules get the labels; label-free rules the same requests
  without labels. Every dataset is split 60/40 into stream and test parts per class, a new split per
  seed; *final*: the adapted head on the test part. Orders: i.i.d.; Dirichlet label shift (ROID/RoTTA:
  slots of 10 rows, each class spread over the slots by Dirichlet(0.1)); class-correlated runs of up to
  50; class-incremental (new classes).
- **Baselines.** *static*: the base head (zero labels). *finetune@{SHOTS}* / *prototype@{SHOTS}*: the base
  head fine-tuned offline on the first {SHOTS} labels of each class, or their prototypes, then frozen
  (static after {SHOTS} labels; prototypes@{SHOTS} is the static baseline for new classes). *reference*:
  logistic regression on all labelled stream data, C by 5-fold cross-validation (a reference, not a
  ceiling). *pixels LR / NCM*: the same on raw pixels, and the nearest class mean. *repeat previous*:
  the last label revealed before each request.
- **Statistics.** {RULE}
"""


def markdown(results: dict, cfg: dict) -> str:
    reg = results.get("decisions") or DEFAULT_DECISIONS
    md = ["# fwserve evaluation report", "", "Generated by:", "", "```bash", cfg.get("command", ""), "```", "",
          f"Backbone `{results.get('backbone')}` (weights sha256 `{str(results.get('weights_sha256'))[:16]}`); "
          f"{results.get('duration_s', 0) / 60:.1f} minutes; split: **{results.get('split')}**. "
          + (f"Pre-registration: [preregistration.json](preregistration.json) (sha256 "
             f"`{results['preregistration_sha256'][:16]}`, written on the selection split before this run)."
             if results.get("preregistration_sha256") else
             "**No pre-registration: default settings and choices; the targets below are not results.**"), "",
          "How close each target is, what was missed and why, caveats: [NOTES.md](NOTES.md).", "", PROTOCOL]
    t = results.get("targets", [])
    if t:
        md += ["## Targets", "", RULE, "",
               _table(["target", "result (estimate [95% interval])", "threshold", "met"],
                      [[x["target"], x["value"], (f"{x['threshold']:g}" if x["id"] in ("label_free", "supervised")
                                                  else f"{'+' if x['id'] in LEARNED_TARGETS else ''}"
                                                  f"{100 * x['threshold']:g} points"), _miss(x)] for x in t]), ""]
    md += ["## Headline", "", headline(results), ""]
    md += shift_md(results, reg) + shifts_md(results, reg) + domain_md(results) + novel_md(results)
    md += novel_md(results, "data", "User data (--data): an ImageFolder as new classes")
    return "\n".join(md) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    by = defaultdict(list)
    for c in results.get("curves", []):
        by[c["benchmark"]].append(c)
    for bench, cs in sorted(by.items()):
        orders = sorted({c["order"] for c in cs})
        fig, axes = plt.subplots(1, len(orders), figsize=(5.5 * len(orders), 4), squeeze=False)
        for ax, o in zip(axes[0], orders):
            for c in sorted((c for c in cs if c["order"] == o), key=lambda c: c["method"]):
                st = c["method"] == "static"
                ax.plot(c["x"], [100 * v for v in c["y"]], label=c["method"], lw=2 if st else 1.2,
                        ls="--" if st else "-")
            ax.set_title(f"{bench} ({o})")
            ax.set_xlabel("examples seen")
            ax.set_ylabel("running prequential accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        name = f"{bench}_curves.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def write(results: dict, cfg: dict, out: Path, reg: Optional[dict], make_plots: bool = True,
          reg_path: Optional[Path] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["decisions"] = {k: reg[k] for k in DEFAULT_DECISIONS} if reg else None
    if reg_path is not None and Path(reg_path).is_file():
        results["preregistration_sha256"] = hashlib.sha256(Path(reg_path).read_bytes()).hexdigest()
    results["targets"] = targets(results, reg or DEFAULT_DECISIONS)
    results["plots"] = plots(results, out) if make_plots else []
    (out / "results.json").write_text(json.dumps({"config": cfg, **results}, default=str) + "\n")
    md = markdown(results, cfg)
    if results["plots"]:
        md += "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in results["plots"]) + "\n"
    (out / "README.md").write_text(md)


# ---- the project README's headline block -----------------------------------------------------------

README_BEGIN, README_END = "<!-- eval-headline:begin -->", "<!-- eval-headline:end -->"


def readme_block(results: dict) -> str:
    return f"{README_BEGIN}\n{headline(results)}\n{README_END}"


def update_readme(readme: Path, results_json: Path) -> bool:
    """Rewrite the block between the markers from results.json; True if it changed."""
    text = Path(readme).read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    new = text[:start] + readme_block(json.loads(Path(results_json).read_text())) + text[end:]
    Path(readme).write_text(new)
    return new != text


def main(argv=None) -> int:
    """python -m eval.report [--readme README.md] [--results docs/eval/results.json]: regenerate the
    project README's headline table from the report's results."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eval.report")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--results", type=Path, default=Path("docs/eval/results.json"))
    args = p.parse_args(argv)
    print("updated" if update_readme(args.readme, args.results) else "unchanged", args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

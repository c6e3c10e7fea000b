"""The evaluation report: results.json, README.md (Markdown tables, targets) and PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from eval.runner import LABEL_FREE


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _group(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _methods(rows) -> list[str]:
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return sorted(seen, key=lambda m: (m != "static", m))


# ---- targets -------------------------------------------------------------------------------------


def targets(results: dict, rules) -> list[dict]:
    out = []
    shift = [r for r in results["shift"] if r["order"] == "iid"]
    if shift:
        sev = max(r["severity"] for r in shift)
        at = [r for r in shift if r["severity"] == sev]
        err = {m: _mean([1 - r["final"] for r in rs]) for (m,), rs in _group(at, "method").items()}
        perr = {m: _mean([1 - r["prequential"] for r in rs]) for (m,), rs in _group(at, "method").items()}
        static = err.get("static")
        sup = {m: e for m, e in err.items() if m != "static" and m not in LABEL_FREE}
        lf = {m: e for m, e in err.items() if m in LABEL_FREE}
        if sup and static:
            best = min(sup, key=sup.get)
            out.append({
                "target": f"severity {sev}: supervised adaptation error <= 0.5 x static error (mean over "
                          f"{len({r['corruption'] for r in at})} corruptions, held-out test part)",
                "value": f"best {best}: {_pct(sup[best])}% vs static {_pct(static)}% "
                         f"(ratio {sup[best] / static:.2f}; prequential ratio {perr[best] / perr['static']:.2f})",
                "met": sup[best] <= 0.5 * static})
        if lf and static:
            best = min(lf, key=lf.get)
            out.append({
                "target": f"severity {sev}: label-free adaptation below static on average",
                "value": "; ".join(f"{m}: {_pct(e)}% (prequential {_pct(perr[m])}%)" for m, e in sorted(lf.items()))
                         + f" vs static {_pct(static)}% (prequential {_pct(perr['static'])}%)",
                "met": lf[best] < static})
    novel = [r for r in results["novel_streams"] if r["order"] == "iid"]
    probe = results.get("novel_probe")
    if novel and probe is not None:
        acc = {m: _mean([r["after_k_prequential"] for r in rs]) for (m,), rs in _group(novel, "method").items()
               if m != "static"}
        acc = {m: a for m, a in acc.items() if a is not None}
        if acc:
            best = max(acc, key=acc.get)
            out.append({
                "target": "novel classes: best rule's prequential accuracy after 20 labelled examples per class "
                          "within 5 points of the offline linear probe",
                "value": f"best {best}: {_pct(acc[best])}% vs probe {_pct(probe)}% "
                         f"(gap {100 * (probe - acc[best]):.1f} points)",
                "met": probe - acc[best] <= 0.05})
    corr = _correlated_gaps(results)
    if corr:
        worst = min(corr, key=lambda c: c["gap"])
        out.append({
            "target": "class-correlated streams: no rule more than 2 points below static (prequential accuracy)",
            "value": f"worst: {worst['method']} on {worst['benchmark']}, {100 * worst['gap']:+.1f} points",
            "met": worst["gap"] >= -0.02})
    return out


def _correlated_gaps(results: dict) -> list[dict]:
    """Per benchmark with correlated streams and per rule: mean prequential accuracy minus static's."""
    gaps = []
    for bench, order in (("shift", "correlated"), ("domain", "correlated"), ("novel_streams", "incremental"),
                         ("data", "incremental")):
        rows = [r for r in results.get(bench, []) if r["order"] == order]
        if not rows:
            continue
        acc = {m: _mean([r["prequential"] for r in rs]) for (m,), rs in _group(rows, "method").items()}
        fin = {m: _mean([r["final"] for r in rs]) for (m,), rs in _group(rows, "method").items()}
        for m, a in acc.items():
            if m != "static":
                gaps.append({"benchmark": bench, "method": m, "gap": a - acc["static"],
                             "final_gap": fin[m] - fin["static"]})
    return gaps


# ---- markdown ----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results: dict, cfg_dict: dict) -> str:
    md = ["# fwserve evaluation report", ""]
    md += ["Generated by:", "", "```bash", cfg_dict.get("command", ""), "```", ""]
    md += [f"Backbone `{results.get('backbone')}` (weights sha256 `{str(results.get('weights_sha256'))[:16]}`); {results.get('duration_s', 0) / 60:.1f} minutes; "
           f"stream requests of {cfg_dict['batch']} instances. Accuracies in %. *Prequential*: test-then-train "
           "accuracy over the stream; *final*: the adapted head on the held-out test part (no adaptation).", ""]
    md += [PROTOCOL]
    if results.get("warning"):
        md += [f"**Warning: {results['warning']}.**", ""]
    t = results.get("targets", [])
    if t:
        md += ["## Targets", "", _table(["target", "result", "met"],
                                        [[x["target"], x["value"], "yes" if x["met"] else "**no**"] for x in t]), ""]
    md += _shift_md(results) + _novel_md(results) + _domain_md(results, "domain", "Domain: scikit-learn digits 0-4 "
                                                                                   "(8x8, upsampled)")
    md += _domain_md(results, "data", "User data (--data)")
    md += _correlated_md(results) + _latency_md(results)
    return "\n".join(md) + "\n"


PROTOCOL = """## Protocol

- **Streams.** Each stream is sent in requests of `batch` instances (base64 PNG). Supervised rules adapt
  with `/v1/adapt` and labels; label-free rules (t3a, tent) get the same requests *without* labels on
  the shift and domain benchmarks. Prequential accuracy: each prediction comes from the request that
  then adapts on it. Final accuracy: the session predicts the held-out test part without adapting.
  One fresh session per method and stream; all methods see the same streams.
- **Static.** Shift and domain: the backbone's base head. Novel classes and `--data`: prototypes
  frozen after the first 5 labelled shots of each class (episodes: the prototypes of the shots).
- **Shift.** Held-out digits 0-4 (models.data split; 100 per class), stratified 60/40 into stream and
  test. imagecorruptions needs H x W x 3 images of at least 32 x 32: each digit is upsampled to
  32 x 32 (bilinear), stacked to 3 channels, corrupted, converted back to gray (luma) and resized to
  28 x 28; numpy's RNG is seeded per corruption and severity. Class-correlated streams (runs of up to
  50 examples of one class) at the highest severity.
- **Novel classes.** Digits 5-9: episodes (5-way, 1 and 5 shots, 15 queries per class) on the held-out
  split through episodic heads; online streams of the training split of 5-9 (2,000 images, never
  seen by the backbone) in i.i.d. and class-incremental order, tested on the held-out 5-9. *After 20
  per class*: prequential accuracy on the 100 stream examples that follow the point where every class
  has 20 labelled examples (i.i.d. streams), and the head's held-out accuracy at that point.
- **Domain.** scikit-learn's 8x8 digits 0-4 scaled to 0..255, upsampled to 20 x 20 and centred in
  28 x 28 (MNIST's layout); 60/40 split.
- **Ceiling.** An offline linear probe (standardised backbone features, logistic regression) on all
  labelled stream data, scored on the same test part.
- **Settings.** Every rule runs with fixed settings (`eval/runner.py`, `SETTINGS`); those of the
  label-free rules were chosen on the *training* split ([validation.md](validation.md)), never on
  these held-out images.

"""


def _shift_md(results) -> list[str]:
    rows = results["shift"]
    if not rows:
        return []
    md = ["## Shift: held-out digits 0-4 under ImageNet-C corruptions", ""]
    iid = [r for r in rows if r["order"] == "iid"]
    methods = _methods(iid)
    sevs = sorted({r["severity"] for r in iid})
    by = _group(iid, "severity", "method")
    md += ["Mean over corruptions, i.i.d. streams: final accuracy (prequential in brackets).", ""]
    md += [_table(["severity"] + methods,
                  [[str(s)] + [f"{_pct(_mean([r['final'] for r in by[(s, m)]]))} "
                               f"({_pct(_mean([r['prequential'] for r in by[(s, m)]]))})" for m in methods]
                   for s in sevs]), ""]
    sev = max(sevs)
    probes = {p["corruption"]: p["probe"] for p in results.get("shift_probe", []) if p["severity"] == sev}
    byc = _group([r for r in iid if r["severity"] == sev], "corruption", "method")
    corrs = sorted({c for c, _ in byc})
    md += [f"Severity {sev}, per corruption: final **error** (%) of each method; linear probe = offline ceiling.", ""]
    header = ["corruption"] + methods + (["probe"] if probes else [])
    body = []
    for c in corrs:
        body.append([c] + [_pct(1 - byc[(c, m)][0]["final"]) if (c, m) in byc else "—" for m in methods]
                    + ([_pct(1 - probes[c]) if c in probes else "—"] if probes else []))
    body.append(["**mean**"] + [_pct(_mean([1 - byc[(c, m)][0]["final"] for c in corrs if (c, m) in byc]))
                                for m in methods] + ([_pct(_mean([1 - p for p in probes.values()]))] if probes else []))
    md += [_table(header, body), ""]
    return md


def _novel_md(results) -> list[str]:
    md = []
    eps = results["novel_episodes"]
    if eps:
        md += ["## Novel classes (digits 5-9, never seen by the backbone)", "",
               "Episodes (held-out digits): accuracy on 15 queries per class, mean ± 95% interval.", ""]
        methods = _methods(eps)
        by = _group(eps, "shots", "method")
        shots = sorted({e["shots"] for e in eps})
        md += [_table(["episode"] + methods,
                      [[f"{eps[0]['ways']}-way {k}-shot"] + [
                          f"{_pct(by[(k, m)][0]['accuracy'])} ± {_pct(by[(k, m)][0]['ci95'])}" for m in methods]
                       for k in shots]), ""]
    rows = results["novel_streams"]
    if rows:
        md += _stream_table(rows, "Online streams: the novel training split as a labelled stream (static = "
                            "prototypes frozen after the first 5 shots per class), held-out split as test.",
                            results.get("novel_probe"), after_k=True)
    return md


def _stream_table(rows, title, probe, after_k=False) -> list[str]:
    md = [title, ""]
    methods = _methods(rows)
    header = ["order", "method", "prequential", "final"] + (["preq. after 20/class", "held-out at 20/class"]
                                                            if after_k else [])
    body = []
    for order in sorted({r["order"] for r in rows}):
        for m in methods:
            rs = [r for r in rows if r["order"] == order and r["method"] == m]
            if not rs:
                continue
            line = [order, m, _pct(_mean([r["prequential"] for r in rs])), _pct(_mean([r["final"] for r in rs]))]
            if after_k:
                line += [_pct(_mean([r.get("after_k_prequential") for r in rs])),
                         _pct(_mean([r.get("after_k_held_out") for r in rs]))]
            body.append(line)
    md += [_table(header, body), ""]
    if probe is not None:
        md += [f"Offline linear probe on all labelled stream data, on the same test set: **{_pct(probe)}**.", ""]
    return md


def _domain_md(results, key, title) -> list[str]:
    rows = results.get(key) or []
    if not rows:
        return []
    return [f"## {title}", ""] + _stream_table(rows, "Stream / test split 60/40 per class; mean over stream seeds.",
                                               results.get(f"{key}_probe"), after_k=(key == "data"))


def _correlated_md(results) -> list[str]:
    gaps = _correlated_gaps(results)
    if not gaps:
        return []
    md = ["## Class-correlated streams against static", "",
          "Accuracy of each rule minus static's, in points (shift: mean over corruptions at the highest severity; "
          "novel: class-incremental).", ""]
    body = [[g["benchmark"], g["method"], f"{100 * g['gap']:+.1f}", f"{100 * g['final_gap']:+.1f}"] for g in gaps]
    return md + [_table(["benchmark", "rule", "prequential", "final"], body), ""]


def _latency_md(results) -> list[str]:
    lat = results.get("latency") or {}
    if not lat:
        return []
    md = ["## Adaptation latency", "",
          "From the server's `fwserve_head_update_seconds` histogram (one grouped update call per rule and "
          "micro-batch), over this run.", ""]
    body = [[r, str(v["updates"]), f"{1e3 * v['mean_s']:.3f}", f"<= {1e3 * v['p50_le_s']:.2f}",
             f"<= {1e3 * v['p99_le_s']:.2f}"] for r, v in sorted(lat.items())]
    return md + [_table(["rule", "updates", "mean ms", "p50 ms", "p99 ms"], body), ""]


# ---- plots -------------------------------------------------------------------------------------


def _mean_curve(rows) -> tuple[np.ndarray, np.ndarray]:
    """Average of running-accuracy curves of equally long streams (interpolated on a grid)."""
    n = min(r["n_stream"] for r in rows)
    grid = np.linspace(1, n, 60)
    ys = [np.interp(grid, [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]) for r in rows if r["curve"]]
    return grid, np.mean(ys, axis=0)


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def curves(rows, orders, title, fname):
        fig, axes = plt.subplots(1, len(orders), figsize=(5.5 * len(orders), 4), squeeze=False)
        for ax, order in zip(axes[0], orders):
            sub = [r for r in rows if r["order"] == order]
            for m in _methods(sub):
                x, y = _mean_curve([r for r in sub if r["method"] == m])
                ax.plot(x, 100 * y, label=m, lw=2 if m == "static" else 1.3, ls="--" if m == "static" else "-")
            ax.set_title(f"{title} ({order})")
            ax.set_xlabel("examples seen")
            ax.set_ylabel("prequential accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)

    shift = results["shift"]
    if shift:
        sev = max(r["severity"] for r in shift)
        at = [r for r in shift if r["severity"] == sev]
        curves(at, sorted({r["order"] for r in at}), f"shift, severity {sev}", "shift_curves.png")
        iid = [r for r in shift if r["order"] == "iid"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in _methods(iid):
            sevs = sorted({r["severity"] for r in iid})
            ax.plot(sevs, [100 * _mean([1 - r["final"] for r in iid if r["severity"] == s and r["method"] == m])
                           for s in sevs], marker="o", label=m, ls="--" if m == "static" else "-")
        ax.set_xlabel("severity")
        ax.set_ylabel("final error (%), mean over corruptions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "shift_severity.png", dpi=110)
        plt.close(fig)
        files.append("shift_severity.png")
    if results["novel_streams"]:
        rows = results["novel_streams"]
        curves(rows, sorted({r["order"] for r in rows}), "novel classes", "novel_curves.png")
    for key in ("domain", "data"):
        rows = results.get(key) or []
        if rows:
            curves(rows, sorted({r["order"] for r in rows}), key, f"{key}_curves.png")
    return files


def write(results: dict, cfg_dict: dict, out: Path, rules, make_plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results, rules)
    results["plots"] = plots(results, out) if make_plots else []
    for rows in results.values():
        for r in rows if isinstance(rows, list) else ():
            if isinstance(r, dict) and "curve" in r:
                r["curve"] = [[n, round(acc, 4)] for n, acc in r["curve"]]
    (out / "results.json").write_text(json.dumps({"config": cfg_dict, **results}, indent=1, default=str) + "\n")
    md = markdown(results, cfg_dict)
    if (out / "NOTES.md").is_file():
        md = md.replace("## Protocol", "How close each target is, what was missed and why, caveats: [NOTES.md](NOTES.md).\n\n## Protocol", 1)
    if results["plots"]:
        md += "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in results["plots"]) + "\n"
    (out / "README.md").write_text(md)

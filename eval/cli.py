"""``fwserve eval``: the evaluation report.

    fwserve eval --out docs/eval                         # the full report, test split, pre-registered settings
    fwserve eval --out /tmp/eval --subset 20 --seeds 2   # a small run (CI)
    fwserve eval --url http://127.0.0.1:8000 --subset 20 --seeds 1 --out /tmp/served   # through a server
    fwserve eval --data ./my_images --out /tmp/mine      # an ImageFolder as a new-class benchmark

By default every stream runs in this process on cached backbone features with the server's own
rule code (eval/simulate.py: many sessions per kernel call). --url streams through a running
server over HTTP instead, --served through one started in this process (uvicorn in a thread).
Settings and choices come from the pre-registration (docs/eval/preregistration.json, written by
`python -m eval.validate` on the selection split); --preregistration none uses the defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from eval import data as D


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fwserve eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Stream the benchmarks through fwserve's rules and write a report "
                                "(README.md, results.json, PNG plots).")
    p.add_argument("--out", type=Path, default=Path("docs/eval"), help="report directory")
    p.add_argument("--split", choices=("test", "selection"), default="test",
                   help="test: the held-out split (the report); selection: the split every choice is made on")
    p.add_argument("--benchmarks", help="comma list of shift, shifts, domain, novel, episodes; default: all, or "
                   "none with --data")
    p.add_argument("--corruption", action="append", metavar="NAME",
                   help="corruption(s) for the shift benchmark (repeatable; any imagecorruptions name); "
                   "default: the 15 ImageNet-C corruptions. With --data: corrupt the user's images too")
    p.add_argument("--shifts", default=",".join(D.SHIFTS), help="realistic shifts (comma list)")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma list of severities 1-5")
    p.add_argument("--seeds", type=int, default=10, help="stream seeds (each its own stream / test split)")
    p.add_argument("--low-severity-seeds", type=int, default=3, help="stream seeds below the highest severity")
    p.add_argument("--baseline-seeds", type=int, default=3, help="seeds of the offline baselines (reference, pixels)")
    p.add_argument("--rules", help="rules to compare (default: every registered rule)")
    p.add_argument("--data", type=Path, help="an ImageFolder directory (one sub-folder per class) to stream")
    p.add_argument("--subset", type=int, help="at most this many examples per class in every dataset (CI)")
    p.add_argument("--episodes", type=int, default=100, help="episodes per N-way k-shot setting")
    p.add_argument("--batch", type=int, default=10, help="instances per stream request")
    p.add_argument("--workers", type=int, default=2, help="processes for corruptions and baselines; HTTP streams")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fwserve-eval-cache",
                   help="corrupted images and backbone features are cached here")
    p.add_argument("--preregistration", default=None,
                   help="pre-registration JSON (default: docs/eval/preregistration.json); 'none': defaults")
    p.add_argument("--url", help="stream through this running server over HTTP")
    p.add_argument("--served", action="store_true", help="stream through a server started in this process")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--backbone", default="fwserve-mnist-vit")
    p.add_argument("--weights", type=Path, help="checkpoint (default: bundled)")
    p.add_argument("--random-init", action="store_true", help="a random backbone (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    return p


def learned_summary(card: dict) -> dict:
    """What the report needs of a learned rule's card: its chosen candidate and selection score."""
    chosen = next((c for c in card.get("selection", {}).get("candidates", []) if c["candidate"] == card.get("chosen")),
                  None)
    score = None if chosen is None else sum(v["mean"] for v in chosen["selection"].values()) / len(chosen["selection"])
    return {"chosen": card.get("chosen"), "settings": card.get("settings"), "selection_score": score,
            "selection": None if chosen is None else chosen["selection"], "command": card.get("command")}


@contextmanager
def in_process_server(backbone):
    """The real app under uvicorn in a daemon thread on a free port, serving `backbone` (a
    models.Backbone, source statistics included); yields its URL."""
    from server.api import create_app
    from server.config import Settings
    from server.threaded import ThreadedServer

    with tempfile.TemporaryDirectory(prefix="fwserve-eval-") as tmp:
        settings = Settings(snapshot_dir=Path(tmp) / "snapshots", feature_cache_size=200_000, max_wait_ms=2.0,
                            max_queue_size=4096, request_timeout_s=300.0, log_level="warning", torch_threads=1)
        app = create_app(settings, backbone=backbone)
        with ThreadedServer(app).start(300, why=lambda: app.state.engine.load_error) as srv:
            yield srv.url


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    import torch

    from eval import report
    from eval.benchmarks import ALL_BENCHMARKS, Plan
    from eval.evaluate import evaluate
    from eval.features import FeatureBank
    from eval.protocol import PREREGISTRATION, load_settings
    from server.rules import RULES

    torch.set_num_threads(args.threads)
    names = D.corruption_names()
    corruptions = tuple(args.corruption) if args.corruption else D.CORRUPTIONS
    bad = [n for n in corruptions if n not in names] + [s for s in args.shifts.split(",") if s and s not in D.SHIFTS]
    if bad:
        print(f"fwserve eval: unknown corruption or shift {bad[0]!r}", file=sys.stderr)
        return 2
    rules = tuple(RULES) if args.rules is None else tuple(r for r in args.rules.split(",") if r)
    benchmarks = tuple(ALL_BENCHMARKS) if args.benchmarks is None and args.data is None else \
        tuple(b for b in (args.benchmarks or "").split(",") if b)
    if any(r not in RULES for r in rules) or any(b not in ALL_BENCHMARKS for b in benchmarks):
        print(f"fwserve eval: rules must be among {', '.join(RULES)}; benchmarks among {', '.join(ALL_BENCHMARKS)}",
              file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"fwserve eval: --data {args.data} is not a directory", file=sys.stderr)
        return 2
    reg_path = None if args.preregistration == "none" else Path(args.preregistration or PREREGISTRATION)
    settings, reg = load_settings(reg_path)
    plan = Plan(split=args.split, benchmarks=benchmarks, corruptions=corruptions,
                shifts=tuple(s for s in args.shifts.split(",") if s), severities=tuple(
                    int(s) for s in args.severities.split(",")), seeds=args.seeds,
                low_severity_seeds=args.low_severity_seeds, episodes=args.episodes, batch=args.batch,
                subset=args.subset, cache_dir=args.cache_dir, workers=args.workers,
                extra={"data_dir": str(args.data) if args.data else None,
                       "data_corruption": args.corruption[0] if args.data is not None and args.corruption else None})
    started = time.time()
    bank = FeatureBank(args.backbone, args.weights, args.random_init, args.cache_dir)
    if bank.bb.source_stats is None:  # the served backbone needs them for the label-free rules too
        bank.bb.source_stats = bank.source_stats
    run = lambda runner: evaluate(plan, bank, settings, rules, runner=runner,  # noqa: E731
                                  baseline_seeds=args.baseline_seeds, progress=not args.quiet)
    if args.url:
        from eval.served import http_runner

        results = run(http_runner(args.url, args.workers))
    elif args.served:
        from eval.served import http_runner

        with in_process_server(bank.bb) as url:
            results = run(http_runner(url, args.workers))
    else:
        results = run(None)
    results["backbone"] = args.backbone + (" (random init)" if args.random_init else "")
    results["learned_rules"] = {name: learned_summary(card) for name, card in bank.learned_cards.items()}
    results["weights_sha256"] = bank.weights_sha256
    results["backend"] = "http " + args.url if args.url else ("http (in-process server)" if args.served else "local")
    results["duration_s"] = time.time() - started
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()}
    cfg["command"] = "fwserve eval " + shlex.join(argv)
    report.write(results, cfg, args.out, reg, make_plots=not args.no_plots, reg_path=reg_path if reg else None)
    for t in results["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['id']}: {t['value']}")
    print(f"report: {args.out / 'README.md'} ({results['duration_s'] / 60:.1f} minutes)")
    return 0

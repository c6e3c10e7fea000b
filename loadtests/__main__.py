"""``python -m loadtests --url URL --scenario NAME (--rate R | --concurrency N) --duration S``

Rates and concurrencies take a comma list for a sweep (``--concurrency 1,8,32``); each level
runs ``--duration`` seconds after one warm-up. The Markdown summary goes to stdout; ``--json``,
``--csv``, ``--markdown`` and ``--plot`` write files. Progress lines go to stderr.

Examples:
    python -m loadtests --url http://127.0.0.1:8000 --scenario predict --rate 50,100,200 --duration 10
    python -m loadtests --url http://127.0.0.1:8000 --scenario prequential --concurrency 1,8,32 \\
        --duration 10 --json out.json --csv out.csv --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from typing import Optional, Sequence

from loadtests import generator, report, scenarios


def _levels(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list, got {s!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError("levels must be > 0")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--scenario", required=True, choices=sorted(scenarios.SCENARIOS))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rate", type=_levels, help="open loop: arrivals per second (comma list = sweep)")
    g.add_argument("--concurrency", type=_levels, help="closed loop: concurrent users (comma list = sweep)")
    p.add_argument("--duration", type=float, required=True, help="seconds per level")
    p.add_argument("--arrival", choices=generator.ARRIVALS[:2], default="poisson",
                   help="open-loop arrival process (the burst scenario always uses bursts)")
    p.add_argument("--burst-size", type=int, default=32, help="requests per burst (burst scenario, open loop)")
    p.add_argument("--sessions", type=int, default=None,
                   help="sessions to create (predict: 0 = base head); default per scenario: predict 16, adapt 16, "
                        "prequential 64, churn 256, burst 16, oip 64, oip-binary 64")
    p.add_argument("--rule", default="prototype", help="adaptation rule of the sessions")
    p.add_argument("--model", default="fwserve-mnist-vit", help="oip scenarios: the model name (the server's "
                   "--backbone)")
    p.add_argument("--instances", type=int, default=1, help="images per request")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--encoding", choices=("array", "png"), default="array",
                   help="instances as pixel arrays or base64 PNG (png for backbones whose input is not 28x28)")
    p.add_argument("--repeat-images", action="store_true",
                   help="send the image pool as is (feature-cache hits); default: every image made unique")
    p.add_argument("--synthetic", action="store_true", help="synthetic digits instead of MNIST")
    p.add_argument("--max-requests", type=int, default=100_000, help="most transactions per level")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: outstanding cap; beyond it sends drop")
    p.add_argument("--late-ms", type=float, default=10.0, help="open loop: a send this late counts as late")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for outstanding requests per level")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded warm-up seconds before the first level")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between levels")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cleanup", action="store_true", help="keep the sessions afterwards")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--csv", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="latency plot (PNG; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    return p


def build(args) -> tuple[generator.RunConfig, scenarios.Scenario]:
    if not args.allow_remote:
        generator.check_loopback(args.url)
    if args.duration <= 0 or args.duration > 24 * 3600:
        raise ValueError("--duration must be in (0, 86400]")
    if args.max_requests < 1:
        raise ValueError("--max-requests must be >= 1")
    mode = "open" if args.rate else "closed"
    cfg = generator.RunConfig(
        url=args.url.rstrip("/"), scenario=args.scenario, mode=mode, levels=args.rate or args.concurrency,
        duration=args.duration, arrival=args.arrival, max_requests=args.max_requests,
        max_in_flight=args.max_in_flight, drain_s=args.drain, late_ms=args.late_ms, warmup_s=args.warmup,
        pause_s=args.pause, timeout_s=args.timeout, seed=args.seed, progress=not args.quiet,
        command="python -m loadtests " + shlex.join(sys.argv[1:]) if args.command is None else args.command,
    )
    if args.scenario in ("adapt", "prequential", "churn") and args.sessions is not None and args.sessions < 1:
        raise ValueError(f"scenario {args.scenario} needs --sessions >= 1")
    pool = scenarios.ImagePool(synthetic=args.synthetic, unique=not args.repeat_images, encoding=args.encoding,
                               seed=args.seed)
    opts = scenarios.Options(sessions=args.sessions, rule=args.rule, instances=args.instances, top_k=args.top_k,
                             burst_size=args.burst_size, cleanup=not args.no_cleanup, model=args.model)
    return cfg, scenarios.make(args.scenario, pool, opts, seed=args.seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    args.command = None if argv is None else "python -m loadtests " + " ".join(shlex.quote(a) for a in argv)
    try:
        cfg, sc = build(args)
    except ValueError as e:
        print(f"loadtests: {e}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(generator.run_levels(cfg, sc))
    except KeyboardInterrupt:
        print("loadtests: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"loadtests: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for w in report.write_outputs(run, args.json, args.csv, args.markdown, args.plot):
        print(f"loadtests: {w}", file=sys.stderr)
    print(report.to_markdown(run), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

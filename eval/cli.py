"""``fwserve eval``: the evaluation harness's command line.

    fwserve eval --url http://127.0.0.1:8000 --out docs/eval      # against a running server
    fwserve eval --out /tmp/eval --subset 20 --episodes 5          # in-process server, small run

Without --url the harness starts the server in this process (uvicorn in a thread, any free
port) with --weights / --random-init, and stops it afterwards.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from eval import data as D


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fwserve eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Stream benchmarks through a fwserve server and write a report "
                                "(README.md, results.json, PNG plots).")
    p.add_argument("--url", help="a running server; default: start one in this process")
    p.add_argument("--out", type=Path, default=Path("docs/eval"), help="report directory")
    p.add_argument("--benchmarks", help="comma list of shift, novel, domain; default: all three, or none "
                   "with --data")
    p.add_argument("--corruption", action="append", metavar="NAME",
                   help="corruption(s) for the shift benchmark (repeatable; any imagecorruptions name); "
                   "default: the 15 ImageNet-C corruptions. With --data: corrupt the user's images too")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma list of severities 1-5")
    p.add_argument("--orders", default="iid,correlated", help="stream orders: iid, correlated "
                   "(novel classes and --data: class-incremental)")
    p.add_argument("--rules", default="sgd,delta,prototype,rls,t3a,tent", help="rules to compare with static")
    p.add_argument("--data", type=Path, help="an ImageFolder directory (one sub-folder per class) to stream")
    p.add_argument("--subset", type=int, help="at most this many examples per class in every dataset (CI)")
    p.add_argument("--episodes", type=int, default=100, help="episodes per N-way k-shot setting")
    p.add_argument("--stream-seeds", type=int, default=3, help="stream orders per novel / domain / data stream")
    p.add_argument("--batch", type=int, default=10, help="instances per stream request")
    p.add_argument("--workers", type=int, default=4, help="concurrent streams (and corruption processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fwserve-eval-cache",
                   help="corrupted images are cached here")
    p.add_argument("--no-probe", action="store_true", help="skip the offline linear probe (needs the backbone here)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backbone", default="fwserve-mnist-vit", help="in-process server and probe: backbone name")
    p.add_argument("--weights", type=Path, help="in-process server and probe: checkpoint (default: bundled)")
    p.add_argument("--random-init", action="store_true", help="in-process server and probe: random backbone")
    p.add_argument("--server-threads", type=int, help="in-process server: torch threads")
    return p


@contextmanager
def in_process_server(backbone: str, weights: Optional[Path], random_init: bool, threads: Optional[int]):
    """The real app under uvicorn in a daemon thread on a free port; yields its URL."""
    import uvicorn

    from server.api import create_app
    from server.client import Client
    from server.config import Settings

    with tempfile.TemporaryDirectory(prefix="fwserve-eval-") as tmp:
        settings = Settings(backbone=backbone, weights=weights, random_init=random_init, torch_threads=threads,
                            snapshot_dir=Path(tmp) / "snapshots", feature_cache_size=200_000, max_wait_ms=2.0,
                            max_queue_size=4096, request_timeout_s=300.0, log_level="warning")
        app = create_app(settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            with Client(url) as c:
                c.wait_ready(timeout=300)
            yield url
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()


def _weights_sha256(args) -> Optional[str]:
    """sha256 of the weights the in-process server and the probe load (None: random init)."""
    import hashlib

    from models import bundled_weights

    path = args.weights or (None if args.random_init else bundled_weights(args.backbone))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from eval import report
    from eval.harness import Config, Harness
    from eval.runner import RULES

    names = D.corruption_names()
    corruptions = tuple(args.corruption) if args.corruption else D.CORRUPTIONS
    for n in corruptions:
        if n not in names:
            print(f"fwserve eval: unknown corruption {n!r}; imagecorruptions offers: {', '.join(names)}",
                  file=sys.stderr)
            return 2
    rules = tuple(r for r in args.rules.split(",") if r)
    bad = [r for r in rules if r not in RULES]
    if args.benchmarks is None:
        args.benchmarks = "" if args.data is not None else "shift,novel,domain"
    benchmarks = tuple(b for b in args.benchmarks.split(",") if b)
    if bad or any(b not in ("shift", "novel", "domain") for b in benchmarks):
        print(f"fwserve eval: rules must be among {', '.join(RULES)}; benchmarks among shift, novel, domain",
              file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"fwserve eval: --data {args.data} is not a directory", file=sys.stderr)
        return 2
    cfg = Config(
        url=args.url or "", out=args.out, benchmarks=benchmarks, corruptions=corruptions,
        severities=tuple(int(s) for s in args.severities.split(",")), orders=tuple(args.orders.split(",")),
        rules=rules, subset=args.subset, episodes=args.episodes, stream_seeds=args.stream_seeds, batch=args.batch,
        workers=args.workers, seed=args.seed, data_dir=args.data, cache_dir=args.cache_dir, backbone=args.backbone,
        weights=args.weights, random_init=args.random_init, probe=not args.no_probe,
        command="fwserve eval " + shlex.join(argv), progress=not args.quiet,
        extra={"data_corruption": args.corruption[0] if args.data is not None and args.corruption else None},
    )
    started = time.time()
    weights_sha = _weights_sha256(args)
    if args.url:
        results = Harness(cfg).run()
    else:
        with in_process_server(args.backbone, args.weights, args.random_init, args.server_threads) as url:
            cfg.url = url
            results = Harness(cfg).run()
    results["backbone"] = args.backbone + (" (random init)" if args.random_init else "")
    results["weights_sha256"] = weights_sha
    if weights_sha != _weights_sha256(args):
        print("fwserve eval: the backbone weights changed during the run; the report mixes two backbones",
              file=sys.stderr)
        results["warning"] = "the backbone weights file changed during the run"
    results["duration_s"] = time.time() - started
    cfg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    report.write(results, cfg_dict, args.out, rules, make_plots=not args.no_plots)
    for t in results["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    print(f"report: {args.out / 'README.md'}")
    return 0

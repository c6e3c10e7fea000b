"""Command line: ``fwserve serve [flags]``, ``fwserve train-backbone [args]`` and
``fwserve hash-key`` (the ``sha256:...`` form of an API key read from stdin, for --api-keys).

Every ``Settings`` field is a ``serve`` flag (``--max-batch-size``; booleans as
``--random-init`` / ``--no-random-init``) and an environment variable (``FWSERVE_MAX_BATCH_SIZE``).
Flags given on the command line win over the environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, get_args

from pydantic import ValidationError

from server import __version__
from server.config import Settings


def _flag_type(annotation):
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    t = args[0]
    return t if t in (int, float, str, Path) else str


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fwserve serve",
        description="Run the fwserve HTTP server. Every flag can also be set through the environment "
        "variable shown with it; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "FWSERVE_" + name.upper()
        help_ = f"{field.description} [env {env}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_ + f" (default: {field.default})")
        else:
            metavar = "PATH" if _flag_type(field.annotation) is Path else name.upper()
            p.add_argument(flag, dest=name, type=_flag_type(field.annotation), default=argparse.SUPPRESS,
                           metavar=metavar, help=help_ + f" (default: {field.default})")
    return p


def settings_from_args(argv: Sequence[str]) -> Settings:
    args = serve_parser().parse_args(list(argv))
    return Settings(**vars(args))


def serve(argv: Sequence[str]) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as e:
        print(f"fwserve serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    err = preflight(settings)
    if err:
        print(f"fwserve serve: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from server import logs
    from server.api import create_app

    logs.configure(settings.log_level, settings.log_format)
    from server.api.auth import auth_warning

    warning = auth_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    # log_config=None: uvicorn's loggers write through the handler logs.configure set up
    if settings.api_workers > 1:  # HTTP worker processes in front of this process's engine
        from server import workers

        return workers.serve(settings)
    app = create_app(settings)
    app.state.engine.owns_process = True
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, access_log=False, timeout_graceful_shutdown=settings.shutdown_grace())
    return 0


def preflight(settings: Settings) -> Optional[str]:
    """Catch configuration mistakes before binding the port (unknown backbone, missing weights)."""
    from models import bundled_weights, get_config

    try:
        get_config(settings.backbone)
    except ValueError as e:
        return str(e)
    if settings.weights is not None and not settings.weights.is_file():
        return f"weights file {settings.weights} does not exist"
    if settings.weights is None and not settings.random_init and bundled_weights(settings.backbone) is None:
        return (f"backbone {settings.backbone!r} has no bundled weights: pass --weights PATH or --random-init "
                "(or train them with `fwserve train-backbone`)")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"device {settings.device!r} requested but CUDA is not available"
    from server.api.auth import Auth

    try:
        Auth(settings)
    except ValueError as e:
        return str(e)
    if settings.grpc_port is not None:
        missing = [m for m in ("grpc", "tritonclient.grpc") if _find(m) is None]
        if missing:
            return (f"--grpc-port needs the gRPC extra ({', '.join(missing)} not installed): "
                    "pip install 'fwserve[grpc]'")
    return None


def _find(module: str):
    import importlib.util

    try:
        return importlib.util.find_spec(module)
    except ImportError:  # a parent package is missing
        return None


def hash_key(argv: Sequence[str]) -> int:
    """Print the sha256 form of the API key on stdin (one line), for an --api-keys entry."""
    if argv:
        print("usage: fwserve hash-key < keyfile   (the key is read from stdin, never from the command line)",
              file=sys.stderr)
        return 2
    from server.api.auth import hash_key as _hash

    key = sys.stdin.readline().strip()
    if not key:
        print("fwserve hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(_hash(key))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: fwserve {serve,train-backbone,train-rule,eval,hash-key} [args]\n\n"
        "  serve           run the HTTP server (fwserve serve --help lists every setting)\n"
        "  train-backbone  train the bundled backbone (fwserve train-backbone --help)\n"
        "  train-rule      meta-train a learned rule (meta_sgd, hyper) for the backbone (fwserve train-rule --help)\n"
        "  eval            the evaluation report: benchmarks through the rules, offline or over HTTP (fwserve eval --help)\n"
        "  hash-key        print the sha256:... form of an API key read from stdin (for --api-keys)\n"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fwserve {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "hash-key":
        return hash_key(rest)
    if cmd == "eval":
        from eval.cli import main as eval_main

        return eval_main(rest)
    if cmd == "train-backbone":
        from eval import train_backbone

        rc = train_backbone.main(rest)
        return int(rc or 0)
    if cmd == "train-rule":
        from eval import train_rule

        return int(train_rule.main(rest) or 0)
    print(f"fwserve: unknown command {cmd!r}\n{usage}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The local multi-replica rehearsal (deploy/local/rehearse.py): Redis as the shared store,
three replicas behind nginx hashing on X-Session-ID, one replica killed; every session must
continue on the others at its latest acknowledged version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.deploy.helpers import DEPLOY, REPO, python_env, settings_fields


def _need(name: str, package: str) -> None:
    if not (shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")):
        pytest.skip(f"{name} not found: install the Debian package {package} (.ci/run does)")


def test_rehearsal_kill_one_replica():
    _need("redis-server", "redis-server")
    _need("nginx", "nginx")
    pytest.importorskip("redis", reason="the redis client (the server's Redis store) is not installed")
    assert {"store", "durability"} <= set(settings_fields()), "the server lost its --store / --durability settings"
    p = subprocess.run([sys.executable, str(DEPLOY / "local" / "rehearse.py"), "--sessions", "12", "--adapts", "2",
                        "--timeout", "90"], capture_output=True, text=True, timeout=170, cwd=REPO, env=python_env())
    summary = json.loads(p.stdout)
    assert p.returncode == 0 and summary["ok"], json.dumps(summary, indent=2)[-6000:]
    assert summary["moved_sessions"] > 0
    assert all(summary["checks"].values())

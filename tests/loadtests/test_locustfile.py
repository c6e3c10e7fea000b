"""The Locust file: one user class per scenario; run for a moment against the stub when Locust
is installed (it is optional, so otherwise only its structure is checked)."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import scenarios

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"
USERS = {"PredictUser", "StaticHeadUser", "AdaptUser", "PrequentialUser", "ChurnUser", "BurstUser"}
OIP_USERS = {"OipUser", "OipBinaryUser"}  # the stub speaks /v1 only: their structure is checked


def test_a_user_class_per_scenario():
    tree = ast.parse(LOCUSTFILE.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert USERS | OIP_USERS <= set(classes)
    declared = set()
    for name in USERS | OIP_USERS:
        for stmt in classes[name].body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "scenario" for t in stmt.targets):
                declared.add(stmt.value.value)
    assert declared == set(scenarios.SCENARIOS)


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is optional and not installed")
def test_locust_runs_every_user_against_the_stub(stub, tmp_path):
    env = {**os.environ, "FWSERVE_LT_SYNTHETIC": "1", "FWSERVE_LT_CHURN_SESSIONS": "8"}
    r = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", stub.url, "--headless",
                        "-u", "6", "-r", "6", "-t", "3s", "--only-summary", "--csv", str(tmp_path / "l"), *sorted(USERS)],
                       capture_output=True, text=True, timeout=60, env=env, cwd=str(LOCUSTFILE.parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    stats = (tmp_path / "l_stats.csv").read_text()
    assert "/v1/predict" in stats and "/v1/adapt" in stats
    assert stub.state()["paths"].count("predict") > 0

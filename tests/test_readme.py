"""The README's two commands are the project's front door: check they say and do what they promise."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must open with a code block of commands"
    assert text.index(block.group(0)) < 200, "the commands must open the README"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_readme_opens_with_exactly_the_two_commands():
    assert readme_commands() == ["make serve", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)


def test_make_targets_bootstrap_with_pinned_torch_first():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile[makefile.index("$(STAMP):") :]
    assert install.index("torch==$(TORCH_VERSION)") < install.index("-e '.[test]'")
    assert re.search(r"^TORCH_VERSION \?= 2\.13\.0$", makefile, re.M)
    for target in ("serve: $(STAMP)", "test: $(STAMP)"):
        assert target in makefile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "fwserve").exists(), reason="needs the bootstrapped .venv")
def test_make_serve_is_ready_within_60_seconds_and_predicts():
    port = _free_port()
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "FWSERVE_SNAPSHOT_DIR": str(ROOT / ".pytest_cache" / "readme-snapshots")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        output = "" if ready else (proc.stdout.read().decode() if proc.poll() is not None else "")
        assert ready, f"make serve was not ready within 60 s: {output[-2000:]}"
        digit = [[0.0] * 28 for _ in range(28)]
        for r in range(6, 22):
            digit[r][13] = digit[r][14] = 255.0  # a vertical stroke: a "1"
        reply = httpx.post(f"{url}/v1/predict", json={"instances": [{"array": digit}], "top_k": 3}, timeout=30)
        assert reply.status_code == 200, reply.text
        prediction = reply.json()["predictions"][0]
        assert prediction["label"] == "1"
        assert len(prediction["top_k"]) == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_readme_headline_is_the_evaluation_report():
    """The README's evaluation headline is generated from docs/eval/results.json
    (`python -m eval.report`); every number in it comes from the report."""
    import json

    from eval.report import readme_block

    results = json.loads((ROOT / "docs" / "eval" / "results.json").read_text())
    assert readme_block(results) in (ROOT / "README.md").read_text()
    report = (ROOT / "docs" / "eval" / "README.md").read_text()
    assert readme_block(results).split("\n", 1)[1].rsplit("\n", 1)[0] in report

"""The container build, without a Docker engine: the Dockerfile's install step is
deploy/install.sh, and this runs that script in a fresh virtual environment, then starts the
server the way the image does (entry point, FWSERVE_* environment, health check, SIGTERM).

Speed: installing torch into a new environment takes minutes on a small machine, so by
default the fresh environment sees the development environment's third-party packages
through a path entry (symlinks; never the project itself): install.sh runs every command,
pip (borrowed too) finds torch and the dependencies satisfied, and the project is built and
installed, not editable, into the fresh environment. FWSERVE_TEST_FULL_INSTALL=1 runs it
with nothing borrowed (torch from the local wheel or the index; several minutes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO, env_name, makefile_var, python_env, settings_fields

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
INSTALL = DEPLOY / "install.sh"
FULL = os.environ.get("FWSERVE_TEST_FULL_INSTALL") == "1"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_dockerfile_structure():
    stages = _stages()
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, final = stages
    args = {re.split(r"[= ]", rest)[0]: rest.partition("=")[2] for word, rest in _instructions() if word == "ARG"}
    assert args["FLAVOR"] == "cpu", "FLAVOR (cpu | cuda) is the build argument"
    # one torch pin everywhere
    pin = makefile_var("TORCH_VERSION")
    assert args["TORCH_VERSION"] == pin
    assert re.search(rf"TORCH_VERSION=\$\{{TORCH_VERSION:-{re.escape(pin)}\}}", INSTALL.read_text())

    runs = [rest for word, rest in build if word == "RUN"]
    assert any("deploy/install.sh" in r and 'FWSERVE_FLAVOR="$FLAVOR"' in r for r in runs), \
        "the build stage installs with deploy/install.sh"
    for word, rest in build + final:
        if word == "COPY" and "--from=" not in rest:
            for src in shlex.split(rest)[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
                ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
                assert f"!{src}" in ignore, f"{src} is excluded from the build context"

    final_d = dict((w, r) for w, r in final)
    assert re.fullmatch(r"\d+(:\d+)?", final_d["USER"]) and not final_d["USER"].startswith("0"), "numeric non-root USER"
    assert json.loads(final_d["ENTRYPOINT"]) == ["fwserve", "serve"]
    assert "healthcheck.py" in final_d["HEALTHCHECK"] and "CMD" in final_d["HEALTHCHECK"]
    env = dict(re.findall(r"(\w+)=(\S+)", final_d["ENV"]))
    fields = settings_fields()
    unknown = {k for k in env if k.startswith("FWSERVE_")} - {env_name(f) for f in fields}
    assert not unknown, f"image sets variables that are no server setting: {unknown}"
    assert env["FWSERVE_HOST"] == "0.0.0.0" and final_d["EXPOSE"] == env["FWSERVE_PORT"]
    assert env["HOME"].startswith("/tmp") and env["TRITON_CACHE_DIR"].startswith("/tmp"), \
        "writable paths under /tmp (read-only root filesystem)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_dependencies(venv_python: Path, root: Path) -> None:
    """Make the development environment's third-party packages visible to the fresh one (see
    the module docstring), leaving out the project and anything that is not a plain package."""
    dev_site = Path(sysconfig.get_paths()["purelib"])
    seed = root / "seed"
    seed.mkdir()
    skip = re.compile(r"^(fwserve|__editable__|_fwserve|server|models|kernels|loadtests|tests|distutils-precedence)", re.I)
    for entry in dev_site.iterdir():
        if skip.match(entry.name) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (seed / entry.name).symlink_to(entry)
    site = subprocess.check_output([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    Path(site, "zz_fwserve_test_seed.pth").write_text(str(seed) + "\n")


def test_install_in_fresh_venv_and_serve(tmp_path):
    venv = tmp_path / "venv"
    # seeded: without its own pip (ensurepip is slow); `python -m pip` is then the borrowed one,
    # and it installs into the fresh environment all the same
    subprocess.run([sys.executable, "-m", "venv", *([] if FULL else ["--without-pip"]), str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    if not FULL:
        _seed_dependencies(py, tmp_path)
    bundled = (REPO / "models" / "weights" / "fwserve-mnist-vit.safetensors").is_file()
    env = python_env() | {
        "PYTHON": str(py),
        "FWSERVE_FLAVOR": "cpu",
        # pip's configured index: torch from a local wheel (PIP_FIND_LINKS) where there is one
        "TORCH_INDEX_URL": "-",
        "REQUIRE_BUNDLED_WEIGHTS": "1" if bundled else "0",
    }
    p = subprocess.run(["sh", str(INSTALL), str(REPO)], env=env, capture_output=True, text=True,
                       timeout=900 if FULL else 150, cwd=tmp_path)
    assert p.returncode == 0, f"install.sh failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert "fwserve install: torch" in p.stdout

    # the project is installed into the fresh environment, not borrowed from the repository
    where = subprocess.check_output([str(py), "-c", "import server, models; print(server.__file__); "
                                     "print(models.bundled_weights('fwserve-mnist-vit'))"],
                                    text=True, cwd=tmp_path, env=python_env()).split()
    assert where[0].startswith(str(venv)), where
    assert (where[1] != "None") == bundled

    # start it as the image does: the entry point, configuration from the environment
    port = _free_port()
    snapshots = tmp_path / "snapshots"
    run_env = python_env() | {
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path), "TRITON_CACHE_DIR": str(tmp_path / "triton"), "PYTHONUNBUFFERED": "1",
        "FWSERVE_HOST": "127.0.0.1", "FWSERVE_PORT": str(port), "FWSERVE_SNAPSHOT_DIR": str(snapshots),
        "FWSERVE_DEVICE": "cpu", "FWSERVE_TORCH_THREADS": "1",
    }
    if not bundled:
        run_env["FWSERVE_RANDOM_INIT"] = "true"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([str(venv / "bin" / "fwserve"), "serve"], env=run_env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        health = [str(py), str(HEALTHCHECK)]
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            if subprocess.run(health, env=run_env, capture_output=True, timeout=10).returncode == 0:
                break
            assert time.monotonic() < deadline, f"not ready in 90 s: {(tmp_path / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/v2/health/live", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r"^fwserve_ready 1(\.0)?$", text, re.M)
        # what Kubernetes does after preStop: SIGTERM, then the server drains and exits
        # (uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    # the health check fails once the server is gone
    assert subprocess.run(health, env=run_env, capture_output=True, timeout=10).returncode != 0

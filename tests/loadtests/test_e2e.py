"""The load tools against the real server (random-init bundled backbone, small device and host
tiers so churn evicts): every scenario for a moment, and a short soak."""

import json

import pytest

from loadtests import soak
from loadtests.__main__ import main
from loadtests.serverproc import ServerProcess


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--random-init", "--max-device-sessions", "8", "--max-host-sessions", "8",
                        "--max-batch-size", "32", "--max-wait-ms", "2")
    srv.start(timeout=180)
    yield srv
    srv.close()


@pytest.mark.parametrize("scenario,extra", [
    ("predict", ["--concurrency", "4", "--sessions", "4"]),
    ("predict", ["--rate", "8", "--sessions", "0", "--encoding", "png"]),
    ("adapt", ["--concurrency", "2", "--sessions", "3", "--rule", "sgd"]),
    ("prequential", ["--rate", "5", "--sessions", "6"]),
    ("churn", ["--concurrency", "4", "--sessions", "24"]),
    ("burst", ["--rate", "8", "--burst-size", "4", "--sessions", "2"]),
    ("oip", ["--concurrency", "2", "--sessions", "3", "--instances", "2"]),
    ("oip-binary", ["--rate", "5", "--sessions", "3"]),
])
def test_scenario_against_the_server(server, tmp_path, scenario, extra):
    out = tmp_path / "o.json"
    argv = ["--url", server.url, "--scenario", scenario, "--duration", "1.5", "--warmup", "0.3", "--quiet",
            "--synthetic", "--drain", "60", "--json", str(out), *extra]
    assert main(argv) == 0
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["ok"] > 0 and lv["errors"] == {}, lv["errors"]
    srv = lv["server"]
    assert srv is not None and srv["batches"] > 0
    # features come from the backbone or, for images an earlier scenario already sent, the cache
    assert srv["backbone_forwards"] > 0 or srv["cache_hits"] > 0, srv
    if scenario in ("adapt", "prequential", "churn", "oip", "oip-binary"):
        assert srv["head_update_mean_ms"], srv
    if scenario in ("prequential", "oip", "oip-binary"):
        assert srv["cache_hits"] > 0  # the adapt reuses the features of its predict
        assert "prequential_accuracy" in lv["extras"]
    if scenario == "churn":
        assert srv["evictions"] > 0 and srv["restores"] > 0  # 24 sessions over 8 device slots


def test_short_soak(server, tmp_path, capsys):
    rc = soak.main(["--url", server.url, "--pid", str(server.pid), "--duration", "8", "--window", "4",
                    "--capacity", "10", "--fraction", "0.5", "--synthetic", "--sessions", "8",
                    "--json", str(tmp_path / "soak.json")])
    res = json.loads((tmp_path / "soak.json").read_text())
    assert rc == 0, capsys.readouterr()
    # how many windows close (and how short the last ones are) depends on timing: not asserted
    assert res["windows"] and res["summary"]["errors"] == 0
    assert res["summary"]["requests_ok"] == sum(w["ok"] for w in res["windows"]) > 0
    assert all(w["rss_mb"] is None or w["rss_mb"] > 10 for w in res["windows"])
    assert res["summary"]["rss_first_mb"] > 10

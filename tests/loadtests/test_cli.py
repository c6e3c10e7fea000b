"""``python -m loadtests`` end to end against the stub API: every scenario, both loops, files."""

import json

import pytest

from loadtests.__main__ import main


def _base(stub, tmp_path, scenario, *extra):
    return ["--url", stub.url, "--scenario", scenario, "--duration", "0.5", "--warmup", "0.2", "--quiet",
            "--synthetic", "--json", str(tmp_path / "o.json"), "--csv", str(tmp_path / "o.csv"),
            "--markdown", str(tmp_path / "o.md"), *extra]


@pytest.mark.parametrize("scenario,extra", [
    ("predict", ["--rate", "20,40", "--sessions", "0"]),
    ("adapt", ["--concurrency", "2,4", "--sessions", "3"]),
    ("prequential", ["--concurrency", "2", "--sessions", "5"]),
    ("churn", ["--rate", "30", "--arrival", "constant", "--sessions", "12"]),
    ("burst", ["--rate", "40", "--burst-size", "5", "--sessions", "2"]),
])
def test_scenarios_run_and_report(stub, tmp_path, capsys, scenario, extra):
    stub.reset(delay_s=0.002)
    assert main(_base(stub, tmp_path, scenario, *extra)) == 0
    run = json.loads((tmp_path / "o.json").read_text())
    out = capsys.readouterr().out
    assert f"### {scenario}" in out
    assert run["config"]["scenario"] == scenario
    for lv in run["levels"]:
        assert lv["ok"] > 0 and lv["errors"] == {}
        assert lv["server"]["batch_size_mean"] == pytest.approx(2.0)  # from the stub's /metrics
    st = stub.state()
    n_sessions = int(extra[extra.index("--sessions") + 1])
    assert st["created"] == n_sessions and st["deleted"] == n_sessions and st["sessions"] == 0
    if scenario == "prequential":
        # a predict then an adapt for every transaction
        assert run["levels"][0]["ops"]["predict"]["count"] == run["levels"][0]["ops"]["adapt"]["count"]
        assert "prequential_accuracy" in run["levels"][0]["extras"]
    if scenario == "churn":
        assert set(run["levels"][0]["ops"]) == {"predict", "adapt"}
    if scenario == "burst":
        assert run["levels"][0]["arrival"] == "burst"
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 1 + len(run["levels"])


def test_refuses_remote_targets_and_bad_args(tmp_path, capsys):
    assert main(["--url", "http://192.0.2.1:8000", "--scenario", "predict", "--rate", "1", "--duration", "1"]) == 2
    assert "non-loopback" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:1", "--scenario", "adapt", "--sessions", "0", "--rate", "1",
                 "--duration", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["--scenario", "predict", "--rate", "1", "--concurrency", "2", "--duration", "1"])
    with pytest.raises(SystemExit):
        main(["--scenario", "predict", "--rate", "0", "--duration", "1"])


def test_server_errors_are_counted_by_status(stub, tmp_path):
    stub.reset(error_every=3)
    assert main(_base(stub, tmp_path, "predict", "--sessions", "0", "--concurrency", "2", "--warmup", "0")) == 0
    lv = json.loads((tmp_path / "o.json").read_text())["levels"][0]
    assert set(lv["errors"]) == {"503"} and lv["errors"]["503"] >= 1 and lv["ok"] >= 1

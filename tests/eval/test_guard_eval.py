"""The guard evaluation's property, small enough for CI (eval/guard_eval.py, one seed, two of its
scenarios, through a real server): a burst of wrong labels and a collapsing label-free stream trip
the guard and its rollback, and the session ends at most 2 points below where it was before the
attack; the same streams without the attack never trip it, and guarded accuracy equals unguarded."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from eval import guard_eval as ge
from server.client import Client
from tests.server.conftest import backbone, live_server  # noqa: F401 (the shared backbone fixture)


def test_guards_undo_attacks_and_cost_nothing_on_clean_streams(backbone, tmp_path):
    by_name = {s.name: s for s in ge.SCENARIOS}
    # novel-rls as the report runs it (with a window of 32 and a shorter stream, the few examples
    # that judge each version let a rollback land on a version that has not recovered); the
    # label-free attack shorter, with a window of 32
    scenarios = [by_name["novel-rls"], replace(by_name["tent-corrupted"], attack=24, window=32)]
    with live_server(backbone, tmp_path, max_wait_ms=1.0) as srv, Client(srv.url) as c:
        rows = ge.evaluate(scenarios, [0], held_out=100, server=SimpleNamespace(client=c), extra_arms=False)
    verdicts = ge.verdicts(rows)
    assert len(verdicts) == 2
    for v in verdicts:
        assert v["attack_tripped"] and v["attack_within_2"], v
        assert v["clean_trips"] == 0 and v["clean_within_1"], v
    by = {(r["scenario"], r["stream"], r["arm"]): r for r in rows}
    assert all(t["action"] == "rollback" for t in by[("novel-rls", "attacked", "guarded")]["trips"])
    report = ge.report(rows, "pytest", 0.0)
    assert "**met**" in report and "novel-rls" in report

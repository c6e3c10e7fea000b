"""Chaos runs in CI (loadtests/chaos.py), small: Redis killed and restarted, a replica killed
behind nginx, a slow store, a full disk, hostile clients. Requests in flight may fail, but after
the clients' retries (same Idempotency-Keys) no acknowledged adapt is lost or doubled, no logical
adapt is left unacknowledged and every head equals its adapts applied one by one; where nothing
fails (slow store, hostile clients) the healthy clients see no error at all."""

from __future__ import annotations

import pytest

from loadtests import chaos


@pytest.mark.parametrize("scenario", list(chaos.SCENARIOS))
def test_chaos(scenario):
    _, _, needs = chaos.SCENARIOS[scenario]
    missing = [t for t in needs if chaos.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages; .ci/run installs them)")
    (result,) = chaos.run([scenario], sessions=3, adapts=5, budget=120).values()
    assert result["ok"], result
    assert result["acknowledged"] == result["logical"] == 15
    assert result["lost"] == result["doubled"] == result["unacknowledged"] == 0 and result["head_ok"]

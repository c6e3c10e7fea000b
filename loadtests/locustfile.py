"""The load-test scenarios for Locust (optional: ``pip install locust``; the project does not
depend on it). One user class per scenario; pick them on the command line:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s PredictUser
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 60s \\
        PrequentialUser ChurnUser

Payloads come from ``loadtests.scenarios`` (the same images, labels and bodies as
``python -m loadtests``). Locust is a closed-loop tool: its latencies are measured from each
send, so under overload they understate what users see; use ``python -m loadtests --rate`` for
open-loop figures. Environment: FWSERVE_LT_SESSIONS (sessions per user, default 4),
FWSERVE_LT_CHURN_SESSIONS (sessions shared by churn users, default 256), FWSERVE_LT_RULE
(default prototype), FWSERVE_LT_BURST_PERIOD (seconds between bursts, default 1),
FWSERVE_LT_SYNTHETIC=1 (synthetic digits), FWSERVE_LT_ALLOW_REMOTE=1 (a non-loopback host).
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid

from locust import HttpUser, between, events, task

from loadtests import generator, scenarios

RULE = os.environ.get("FWSERVE_LT_RULE", "prototype")
SESSIONS_PER_USER = int(os.environ.get("FWSERVE_LT_SESSIONS", "4"))
CHURN_SESSIONS = int(os.environ.get("FWSERVE_LT_CHURN_SESSIONS", "256"))
BURST_PERIOD = float(os.environ.get("FWSERVE_LT_BURST_PERIOD", "1.0"))
RUN_ID = uuid.uuid4().hex[:8]

_pool = scenarios.ImagePool(synthetic=os.environ.get("FWSERVE_LT_SYNTHETIC") == "1")
_counter = itertools.count()
_user_ids = itertools.count()
_churn_ids: list[str] = []


def _payloads(sessions: int, name: str) -> scenarios.Scenario:
    opts = scenarios.Options(sessions=sessions, rule=RULE, run_id=f"{RUN_ID}-{next(_user_ids)}")
    return scenarios.SCENARIOS[name](_pool, opts)


@events.test_start.add_listener
def _on_start(environment, **kw):
    host = environment.host or ""
    if os.environ.get("FWSERVE_LT_ALLOW_REMOTE") != "1":
        generator.check_loopback(host)  # raises: load tests target loopback only


class _FwserveUser(HttpUser):
    abstract = True
    wait_time = between(0, 0)
    scenario = "predict"
    sessions = SESSIONS_PER_USER

    def on_start(self):
        self.p = _payloads(self.sessions, self.scenario)
        for sid in self.p.session_ids:
            with self.client.post("/v1/sessions", json=self.p.session_body(sid), name="/v1/sessions",
                                  catch_response=True) as r:
                if r.status_code in (201, 409):
                    r.success()

    def on_stop(self):
        for sid in self.p.session_ids:
            self.client.delete(f"/v1/sessions/{sid}", name="/v1/sessions/{id}")

    def _predict(self, sid):
        body, picks = self.p.predict_body(next(_counter), sid)
        self.client.post("/v1/predict", json=body, name="/v1/predict")
        return picks

    def _adapt(self, sid, picks=None):
        self.client.post("/v1/adapt", json=self.p.adapt_body(next(_counter), sid, picks), name="/v1/adapt")

    def _sid(self):
        return random.choice(self.p.session_ids) if self.p.session_ids else None


class PredictUser(_FwserveUser):
    scenario = "predict"

    @task
    def predict(self):
        self._predict(self._sid())


class StaticHeadUser(_FwserveUser):
    """Predict without a session: the backbone's base head."""

    scenario = "predict"
    sessions = 0

    @task
    def predict(self):
        self._predict(None)


class AdaptUser(_FwserveUser):
    scenario = "adapt"

    @task
    def adapt(self):
        self._adapt(self._sid())


class PrequentialUser(_FwserveUser):
    scenario = "prequential"

    @task
    def predict_then_adapt(self):
        sid = self._sid()
        picks = self._predict(sid)
        self._adapt(sid, picks)  # the same image, now with its label


class ChurnUser(_FwserveUser):
    """Sessions shared by all churn users, picked at random: run the server with
    --max-device-sessions below FWSERVE_LT_CHURN_SESSIONS so heads are evicted and restored."""

    scenario = "churn"
    sessions = 0

    def on_start(self):
        self.p = _payloads(0, "churn")
        if not _churn_ids:
            ids = [f"lt-{RUN_ID}-churn-{k}" for k in range(CHURN_SESSIONS)]
            _churn_ids.extend(ids)
            for sid in ids:
                with self.client.post("/v1/sessions", json=self.p.session_body(sid), name="/v1/sessions",
                                      catch_response=True) as r:
                    if r.status_code in (201, 409):
                        r.success()

    def on_stop(self):
        pass

    @task
    def churn(self):
        sid = random.choice(_churn_ids)
        if random.random() < 0.5:
            self._adapt(sid)
        else:
            self._predict(sid)


class BurstUser(_FwserveUser):
    """Every user fires at the same wall-clock instants (multiples of FWSERVE_LT_BURST_PERIOD):
    the server sees bursts of as many requests as there are users."""

    scenario = "burst"

    def wait_time(self):
        return BURST_PERIOD - (time.time() % BURST_PERIOD)

    @task
    def predict(self):
        self._predict(self._sid())


class _OipUser(_FwserveUser):
    """Prequential over the Open Inference Protocol: an infer, then an infer with the labels."""

    abstract = True
    binary = False

    @task
    def infer_then_adapt(self):
        sid = self._sid()
        picks = [_pool.pick(next(_counter), novel=True)]
        path = f"/v2/models/{self.p.opts.model}/infer"
        content, headers = scenarios.oip_request([img for img, _ in picks], sid, binary=self.binary)
        self.client.post(path, data=content, headers=headers, name="/v2/models/{name}/infer")
        content, headers = scenarios.oip_request([img for img, _ in picks], sid, [lab for _, lab in picks],
                                                 self.binary)
        self.client.post(path, data=content, headers=headers, name="/v2/models/{name}/infer (adapt)")


class OipUser(_OipUser):
    scenario = "oip"


class OipBinaryUser(_OipUser):
    scenario = "oip-binary"
    binary = True

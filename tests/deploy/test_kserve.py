"""deploy/kserve: the ServingRuntime and InferenceService pass KServe's structural schemas, the
runtime's container passes Kubernetes's (strict, as a Pod), and they agree with each other and
with the server (settings, ports, probes, protocols, the model name)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from tests.deploy.crd_schemas import KSERVE_SCHEMAS
from tests.deploy.helpers import DEPLOY, env_name, settings_fields
from tests.deploy.test_k8s import KUBERNETES_VERSIONS, _check_restricted, _kubernetes_validate

KSERVE = DEPLOY / "kserve"


def _load(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]
    return doc


RUNTIME, ISVC = _load("servingruntime.yaml"), _load("inferenceservice.yaml")


def test_custom_resources_match_kserve_schemas():
    for doc in (RUNTIME, ISVC):
        jsonschema.validate(doc, KSERVE_SCHEMAS[(doc["apiVersion"], doc["kind"])])


def test_schemas_reject_mistakes():
    bad = copy.deepcopy(RUNTIME)
    bad["spec"]["protocolVersions"] = ["v3"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KSERVE_SCHEMAS[(RUNTIME["apiVersion"], "ServingRuntime")])
    bad = copy.deepcopy(ISVC)
    bad["spec"]["predictor"]["model"]["modelFormats"] = bad["spec"]["predictor"]["model"].pop("modelFormat")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KSERVE_SCHEMAS[(ISVC["apiVersion"], "InferenceService")])


def _pod() -> dict:
    """The pod KServe would run: the runtime's containers and volumes, the predictor's pod fields."""
    pred = ISVC["spec"]["predictor"]
    spec = {"containers": RUNTIME["spec"]["containers"], "volumes": RUNTIME["spec"]["volumes"],
            **{k: pred[k] for k in ("securityContext", "automountServiceAccountToken", "enableServiceLinks")}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fwserve-predictor"}, "spec": spec}


def test_runtime_pod_validates_strict(tmp_path):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    assert _kubernetes_validate([_pod()], KUBERNETES_VERSIONS[-1], tmp_path) == set()
    _check_restricted(_pod()["spec"])


def test_runtime_and_service_agree_with_the_server(monkeypatch):
    (c,) = RUNTIME["spec"]["containers"]
    assert c["name"] == "kserve-container"  # the name KServe merges the predictor's model fields into
    env = {e["name"]: e["value"] for e in c["env"]}
    fields = {env_name(f) for f in settings_fields()}
    assert set(env) <= fields, set(env) - fields
    import os

    for k in list(os.environ):
        if k.startswith("FWSERVE_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from server import __version__
    from server.config import Settings

    s = Settings()
    assert s.host == "0.0.0.0" and s.port == 8080 and s.grpc_port == 8081  # KServe's HTTP and gRPC ports
    assert {p["containerPort"] for p in c["ports"]} == {s.port}
    assert c["image"] == f"fwserve:{__version__}-cpu"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": s.port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": s.port}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", str(s.snapshot_dir)} <= mounts
    # the server speaks both protocols the runtime claims
    assert set(RUNTIME["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    model = ISVC["spec"]["predictor"]["model"]
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")}
                                    for f in RUNTIME["spec"]["supportedModelFormats"]]
    # the protocol's URLs name the model the server serves
    assert ISVC["metadata"]["name"] == s.backbone
    # sessions live in the pods: no scale-to-zero, one replica with the directory store
    assert ISVC["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    pred = ISVC["spec"]["predictor"]
    assert pred["minReplicas"] >= 1 and (pred["maxReplicas"] == 1 or s.store and s.store.startswith("redis://"))

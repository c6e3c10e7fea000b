"""Kubernetes manifests: every overlay renders with `kubectl kustomize`, passes
`kubernetes-validate --strict`, its custom resources pass their structural schemas, and the
pieces agree with each other and with the server (settings, probes, ports, metric names)."""

from __future__ import annotations

import os
import re
import sys

import jsonschema
import pytest
import yaml

from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.helpers import (
    COMPONENTS, K8S, MONITORING, OVERLAYS, by_kind, env_name, exported_metric_names, one, render, run,
    settings_fields,
)

# a recent release and the oldest one we support (autoscaling/v2, policy/v1 are GA since 1.23;
# the Pod Security labels since 1.25)
KUBERNETES_VERSIONS = ["1.29.0", "1.35.0"]
CUSTOM_KINDS = {kind for _, kind in SCHEMAS}
HARDWARE = {"cpu": "cpu", "gpu": "cuda", "single": "cpu"}


def test_overlays_present():
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    assert {"cpu", "istio-gateway", "redis", "single-replica"} <= set(COMPONENTS)


def _kubernetes_validate(docs, version: str, tmp_path) -> set[str]:
    """Run the kubernetes-validate CLI in strict mode; returns the kinds it had no schema for."""
    f = tmp_path / f"rendered-{version}.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    p = run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(f)])
    assert p.returncode == 0, f"kubernetes-validate --strict -k {version} failed:\n{p.stdout}\n{p.stderr}"
    return set(re.findall(r"Couldn't find schema for kind (\S+)", p.stdout + p.stderr))


@pytest.fixture(scope="module")
def kubernetes_validate():
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra (pip install -e '.[test]')")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strict(overlay, kubernetes_validate, tmp_path):
    docs = render(overlay)
    for version in KUBERNETES_VERSIONS:
        unknown = _kubernetes_validate(docs, version, tmp_path)
        # only the custom resources may go unvalidated here (they are checked below); a built-in
        # kind with a wrong apiVersion would show up in this set
        assert unknown <= CUSTOM_KINDS, f"no schema for {unknown - CUSTOM_KINDS} (wrong apiVersion?)"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_shared_redis_store(overlay):
    docs = render(overlay)
    sts = one(docs, "StatefulSet", "fwserve-redis")
    assert sts["metadata"]["namespace"] == "fwserve"
    _check_restricted(sts["spec"]["template"]["spec"])
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    opts = dict(zip(args[::2], args[1::2]))
    # the durability the server's wal mode documents: a write is answered after its AOF fsync
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "always"
    assert opts["--maxmemory-policy"] == "noeviction"
    # a full Redis refuses writes before the container's memory limit kills it
    limit = sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert opts["--maxmemory"].endswith("mb") and limit.endswith("Gi")
    assert int(opts["--maxmemory"][:-2]) <= 0.8 * int(limit[:-2]) * 1024
    # the server points at this Redis
    cm = _config(docs)
    url = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", cm["FWSERVE_STORE"])
    assert url and cm["FWSERVE_DURABILITY"] == "wal"
    svc = one(docs, "Service", url.group(1))
    assert int(url.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
    assert _selects({"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    # the server's egress rule and Redis's ingress rule select each other
    server_np, redis_np = one(docs, "NetworkPolicy", "fwserve"), one(docs, "NetworkPolicy", "fwserve-redis")
    redis_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert any(_selects(to.get("podSelector"), redis_labels) for rule in server_np["spec"]["egress"]
               for to in rule["to"])
    server_labels = one(docs, "Deployment", "fwserve")["spec"]["template"]["metadata"]["labels"]
    assert any(_selects(f.get("podSelector"), server_labels) for rule in redis_np["spec"]["ingress"]
               for f in rule["from"])


def _config(docs) -> dict:
    (c,) = one(docs, "Deployment", "fwserve")["spec"]["template"]["spec"]["containers"]
    return one(docs, "ConfigMap", c["envFrom"][0]["configMapRef"]["name"])["data"]


def test_validator_is_strict(kubernetes_validate, tmp_path):
    """Negative control: a misspelt field must fail, or the checks above prove nothing."""
    docs = [dict(d) for d in render("cpu")]
    svc = one(docs, "Service", "fwserve")
    svc["spec"] = {**svc["spec"], "selectr": {}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    p = run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSIONS[-1], str(f)])
    assert p.returncode != 0 and "selectr" in p.stdout + p.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(overlay):
    docs = render(overlay)
    custom = [d for d in docs if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} == CUSTOM_KINDS
    for d in custom:
        schema = SCHEMAS.get((d["apiVersion"], d["kind"]))
        assert schema is not None, f"{d['kind']} uses apiVersion {d['apiVersion']}"
        jsonschema.validate(d, schema)


def test_crd_schemas_reject_mistakes():
    docs = render("cpu")
    dr = yaml.safe_load(yaml.safe_dump(one(docs, "DestinationRule")))
    dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeader"] = "X-Session-ID"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dr, SCHEMAS[("networking.istio.io/v1", "DestinationRule")])
    route = yaml.safe_load(yaml.safe_dump(one(docs, "HTTPRoute")))
    route["spec"]["rules"][0]["timeouts"]["request"] = "45 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, SCHEMAS[("gateway.networking.k8s.io/v1", "HTTPRoute")])


# ---- the pieces agree ----------------------------------------------------------------------

def _selects(selector, labels: dict) -> bool:
    if selector is None:
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _check_restricted(pod: dict) -> None:
    """Pod Security 'restricted' essentials, plus a read-only root filesystem."""
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_pod(overlay, monkeypatch):
    docs = render(overlay)
    dep = one(docs, "Deployment", "fwserve")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    _check_restricted(pod)
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # else FWSERVE_PORT=tcp://... from the Service
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]

    # settings: every key is a real setting, and the values pass the server's validation
    cm = _config(docs)
    fields = settings_fields()
    unknown = set(cm) - {env_name(f) for f in fields}
    assert not unknown, f"ConfigMap keys that are no server setting: {unknown}"
    for k in list(os.environ):
        if k.startswith("FWSERVE_"):
            monkeypatch.delenv(k)
    for k, v in cm.items():
        monkeypatch.setenv(k, v)
    from server.config import Settings

    s = Settings()
    assert s.host == "0.0.0.0" and s.port == port
    assert s.device == {"cpu": "cpu", "cuda": "cuda"}[HARDWARE[overlay]]
    from server import __version__

    assert c["image"].endswith(f":{__version__}-{HARDWARE[overlay]}")

    # probes
    probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for p in probes.values():
        assert p["httpGet"]["port"] in ("http", port)
    startup_budget = probes["startupProbe"]["periodSeconds"] * probes["startupProbe"]["failureThreshold"]
    assert startup_budget >= (600 if overlay == "gpu" else 240)

    # shutdown: preStop sleep + the server's grace (longer than the longest adapt: queue timeout
    # + a batch) fits in the pod's grace period
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert s.shutdown_grace() >= s.request_timeout_s + 10
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + s.shutdown_grace()

    # writable paths on a read-only root: /tmp and the snapshot directory are volumes
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", str(s.snapshot_dir)} <= mounts

    # the Service, PDB, NetworkPolicy and ServiceMonitor select these pods, on the http port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service", "fwserve")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert _selects({"matchLabels": svc["spec"]["selector"]}, labels)
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", port)
    pdb = one(docs, "PodDisruptionBudget", "fwserve")
    assert pdb["spec"]["maxUnavailable"] == 1 and _selects(pdb["spec"]["selector"], labels)
    np_ = one(docs, "NetworkPolicy", "fwserve")
    assert _selects(np_["spec"]["podSelector"], labels)
    assert np_["spec"]["ingress"][0]["ports"][0]["port"] in ("http", port)
    sm = one(docs, "ServiceMonitor", "fwserve")
    assert _selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_gpu_scheduling():
    pod = one(render("gpu"), "Deployment", "fwserve")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"].get("nvidia.com/gpu.present") == "true"
    cpu_pod = one(render("cpu"), "Deployment", "fwserve")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(cpu_pod) and "tolerations" not in cpu_pod


def test_single_replica_uses_a_pvc():
    docs = render("single")
    dep = one(docs, "Deployment", "fwserve")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    claim = vols["snapshots"]["persistentVolumeClaim"]["claimName"]
    assert "emptyDir" not in vols["snapshots"]
    assert one(docs, "PersistentVolumeClaim", claim)
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    assert not by_kind(docs, "StatefulSet")
    cm = _config(docs)
    assert cm["FWSERVE_STORE"] in {m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                                   if m["name"] == "snapshots"}
    assert cm["FWSERVE_DURABILITY"] == "wal"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_autoscaler_on_queue_depth(overlay):
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler", "fwserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fwserve"}
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # prometheus-adapter serves this name, from a series the server exports
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series in exported_metric_names()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_session_affine_routing():
    docs = render("cpu")
    svc = one(docs, "Service", "fwserve")
    dr = one(docs, "DestinationRule", "fwserve")
    assert dr["spec"]["host"] in ("fwserve", "fwserve.fwserve.svc.cluster.local")
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == "X-Session-ID"
    route = one(docs, "HTTPRoute", "fwserve")
    gw = one(docs, "Gateway", "fwserve")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gw["metadata"]["name"]
    assert parent["sectionName"] in {l["name"] for l in gw["spec"]["listeners"]}
    paths = {m["path"]["value"] for r in route["spec"]["rules"] for m in r["matches"]}
    assert paths == {"/v1", "/v2"}  # /metrics is not exposed
    for r in route["spec"]["rules"]:
        for b in r["backendRefs"]:
            assert b["name"] == svc["metadata"]["name"]
            assert b["port"] in {p["port"] for p in svc["spec"]["ports"]}


def test_legacy_ingress_example(kubernetes_validate, tmp_path):
    f = K8S / "examples" / "ingress-nginx-legacy.yaml"
    docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
    assert _kubernetes_validate(docs, KUBERNETES_VERSIONS[-1], tmp_path) == set()
    ing = one(docs, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_session_id"


"""JSON Schemas for the custom resources under deploy/k8s, for a structural check.

kubernetes-validate only knows built-in kinds. These schemas transcribe, from the upstream
CRDs, the fields of each custom resource down to the parts fwserve uses: every object lists
the upstream field names at its level (additionalProperties: false catches a misspelt or
misplaced field), with the upstream required fields, enums and patterns of the fields we set.
Upstream: prometheus-operator monitoring.coreos.com/v1 ServiceMonitor, Gateway API v1
(standard channel) Gateway and HTTPRoute, Istio networking.istio.io/v1 DestinationRule; and
for deploy/kserve (KSERVE_SCHEMAS) KServe serving.kserve.io/v1alpha1 ServingRuntime and v1beta1
InferenceService (their containers are checked as Kubernetes containers in test_kserve.py).
"""

from __future__ import annotations

# durations as the CRDs spell them
_PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_GW_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_OBJ = {"type": "object"}
_STR = {"type": "string"}


def _closed(props: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": props, "additionalProperties": False, "required": list(required)}


def _loose(*names: str) -> dict:
    return {n: {} for n in names}


_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
                   "namespace": _STR, "labels": {"type": "object", "additionalProperties": _STR},
                   "annotations": {"type": "object", "additionalProperties": _STR}},
}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return _closed({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                    "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


_LABEL_SELECTOR = _closed({"matchLabels": {"type": "object", "additionalProperties": _STR},
                           "matchExpressions": {"type": "array"}})

SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _closed({
    "selector": _LABEL_SELECTOR,
    "endpoints": {"type": "array", "items": _closed({
        "port": _STR, "path": _STR,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": {"type": "string", "pattern": _PROM_DURATION},
        "scrapeTimeout": {"type": "string", "pattern": _PROM_DURATION},
        "honorLabels": {"type": "boolean"},
        **_loose("targetPort", "params", "honorTimestamps", "trackTimestampsStaleness", "metricRelabelings",
                 "relabelings", "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "basicAuth",
                 "oauth2", "proxyUrl", "noProxy", "proxyFromEnvironment", "proxyConnectHeader", "followRedirects",
                 "enableHttp2", "filterRunning"),
    })},
    "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}),
    "jobLabel": _STR,
    **_loose("attachMetadata", "bodySizeLimit", "fallbackScrapeProtocol", "keepDroppedTargets", "labelLimit",
             "labelNameLengthLimit", "labelValueLengthLimit", "nativeHistogramBucketLimit",
             "nativeHistogramMinBucketFactor", "podTargetLabels", "sampleLimit", "scrapeClass",
             "scrapeClassicHistograms", "scrapeProtocols", "selectorMechanism", "serviceDiscoveryRole",
             "targetLabels", "targetLimit", "convertClassicHistogramsToNHCB"),
}, ("selector",)))

_PARENT_REF = _closed({
    "group": _STR, "kind": _STR, "namespace": _STR, "name": {"type": "string", "minLength": 1},
    "sectionName": {"type": "string", "pattern": _DNS_LABEL}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
}, ("name",))

_BACKEND_REF = _closed({
    "group": _STR, "kind": _STR, "name": {"type": "string", "minLength": 1}, "namespace": _STR,
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}, "filters": {"type": "array"},
}, ("name",))

_HTTP_MATCH = _closed({
    "path": _closed({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                     "value": {"type": "string", "pattern": "^/", "maxLength": 1024}}),
    "headers": {"type": "array", "items": _closed({"type": {"enum": ["Exact", "RegularExpression"]},
                                                   "name": _STR, "value": _STR}, ("name", "value"))},
    "queryParams": {"type": "array"},
    "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]},
})

HTTP_ROUTE = _resource("gateway.networking.k8s.io/v1", "HTTPRoute", _closed({
    "parentRefs": {"type": "array", "maxItems": 32, "items": _PARENT_REF},
    "hostnames": {"type": "array", "maxItems": 16, "items": _STR},
    "rules": {"type": "array", "maxItems": 16, "items": _closed({
        "name": {"type": "string", "pattern": _DNS_LABEL},
        "matches": {"type": "array", "maxItems": 64, "items": _HTTP_MATCH},
        "filters": {"type": "array", "maxItems": 16},
        "backendRefs": {"type": "array", "maxItems": 16, "items": _BACKEND_REF},
        "timeouts": _closed({"request": {"type": "string", "pattern": _GW_DURATION},
                             "backendRequest": {"type": "string", "pattern": _GW_DURATION}}),
        **_loose("retry", "sessionPersistence"),
    })},
}))

GATEWAY = _resource("gateway.networking.k8s.io/v1", "Gateway", _closed({
    "gatewayClassName": {"type": "string", "minLength": 1},
    "listeners": {"type": "array", "minItems": 1, "maxItems": 64, "items": _closed({
        "name": {"type": "string", "pattern": _DNS_LABEL},
        "hostname": _STR,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "protocol": {"type": "string", "pattern": r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9]+$"},
        "tls": _OBJ,
        "allowedRoutes": _closed({
            "namespaces": _closed({"from": {"enum": ["All", "Selector", "Same", "None"]}, "selector": _LABEL_SELECTOR}),
            "kinds": {"type": "array"},
        }),
    }, ("name", "port", "protocol"))},
    **_loose("addresses", "infrastructure", "backendTLS", "allowedListeners"),
}, ("gatewayClassName", "listeners")))

_CONSISTENT_HASH = {
    **_closed({
        "httpHeaderName": _STR, "httpCookie": _OBJ, "useSourceIp": {"type": "boolean"},
        "httpQueryParameterName": _STR,
        "ringHash": _closed({"minimumRingSize": {"type": "integer", "minimum": 0}}),
        "maglev": _closed({"tableSize": {"type": "integer", "minimum": 0}}),
        "minimumRingSize": {"type": "integer", "minimum": 0},
    }),
    # exactly one hash key, and at most one of ringHash / maglev (the CRD's oneOf)
    "oneOf": [{"required": [k]} for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")],
    "not": {"required": ["ringHash", "maglev"]},
}

DESTINATION_RULE = _resource("networking.istio.io/v1", "DestinationRule", _closed({
    "host": {"type": "string", "minLength": 1},
    "trafficPolicy": _closed({
        "loadBalancer": _closed({
            "simple": {"enum": ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]},
            "consistentHash": _CONSISTENT_HASH,
            **_loose("localityLbSetting", "warmupDurationSecs", "warmup"),
        }),
        **_loose("connectionPool", "outlierDetection", "tls", "portLevelSettings", "tunnel", "proxyProtocol"),
    }),
    **_loose("subsets", "exportTo", "workloadSelector"),
}, ("host",)))

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("gateway.networking.k8s.io/v1", "Gateway"): GATEWAY,
    ("networking.istio.io/v1", "DestinationRule"): DESTINATION_RULE,
}


# ---- KServe (deploy/kserve) ------------------------------------------------------------------

_PROTOCOLS = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}
_MODEL_FORMAT = _closed({"name": {"type": "string", "minLength": 1}, "version": _STR}, ("name",))
_CONTAINER_FIELDS = ("args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe",
                     "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "securityContext",
                     "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy",
                     "tty", "volumeDevices", "volumeMounts", "workingDir")

SERVING_RUNTIME = _resource("serving.kserve.io/v1alpha1", "ServingRuntime", _closed({
    "supportedModelFormats": {"type": "array", "minItems": 1, "items": _closed({
        "name": {"type": "string", "minLength": 1}, "version": _STR, "autoSelect": {"type": "boolean"},
        "priority": {"type": "integer", "minimum": 1}}, ("name",))},
    "protocolVersions": {"type": "array", "items": _PROTOCOLS},
    "multiModel": {"type": "boolean"},
    "disabled": {"type": "boolean"},
    "containers": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"]}},
    "volumes": {"type": "array"},
    "replicas": {"type": "integer", "minimum": 0},
    "grpcEndpoint": _STR, "grpcDataEndpoint": _STR, "httpDataEndpoint": _STR,
    "nodeSelector": {"type": "object", "additionalProperties": _STR},
    "labels": {"type": "object", "additionalProperties": _STR},
    "annotations": {"type": "object", "additionalProperties": _STR},
    **_loose("affinity", "tolerations", "imagePullSecrets", "builtInAdapter", "storageHelper", "workerSpec",
             "hostIPC", "schedulerName"),
}, ("containers",)))

INFERENCE_SERVICE = _resource("serving.kserve.io/v1beta1", "InferenceService", _closed({
    "predictor": _closed({
        "model": _closed({
            "modelFormat": _MODEL_FORMAT, "runtime": _STR, "runtimeVersion": _STR, "protocolVersion": _PROTOCOLS,
            "storageUri": _STR, "storage": _OBJ, "name": _STR, **_loose(*_CONTAINER_FIELDS),
        }, ("modelFormat",)),
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "automountServiceAccountToken": {"type": "boolean"},
        "enableServiceLinks": {"type": "boolean"},
        "securityContext": _OBJ,
        "timeout": {"type": "integer", "minimum": 0},
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "scaleTarget": {"type": "integer", "minimum": 0},
        "serviceAccountName": _STR,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
        **_loose("affinity", "tolerations", "nodeSelector", "volumes", "containers", "initContainers",
                 "imagePullSecrets", "logger", "batcher", "canaryTrafficPercent", "deploymentStrategy",
                 "autoScaling", "scaleMetricType", "priorityClassName", "terminationGracePeriodSeconds",
                 "topologySpreadConstraints", "resources", "sklearn", "xgboost", "tensorflow", "pytorch", "triton",
                 "onnx", "pmml", "lightgbm", "paddle", "huggingface"),
    }),
    **_loose("explainer", "transformer"),
}, ("predictor",)))

KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
}

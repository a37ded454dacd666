"""The Helm chart (helm/qwen-serve), rendered for real with the Helm v4 library (helm-python-sdk).

No cluster: every scenario (defaults, both examples, a matrix of toggles) is rendered offline, linted,
and every object is validated with kubernetes-validate against Kubernetes 1.30 and the newest bundled
version (CRDs — ServiceMonitor, PrometheusRule, ScaledObject — against schemas of the fields their
operators require). The rendered ConfigMap must load with qwen-serve's own config loader and plan with
its planner. The chart's copies of the dashboard and the Prometheus rules must equal deploy/'s originals.
The chart's `lookup` of live PersistentVolumeClaims is exercised by a cluster-aware render against a
minimal fake Kubernetes API on 127.0.0.1 that serves only the claims a test gives it.
"""

from __future__ import annotations

import copy
import functools
import http.server
import inspect
import json
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from qwen_serve.config import parse_config
from qwen_serve.keys import parse_keys
from qwen_serve.plan import build_plan

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "qwen-serve"
EXAMPLES = CHART / "examples"
RELEASE, NAMESPACE = "qs", "llm"
FULLNAME = f"{RELEASE}-qwen-serve"
K8S_VERSIONS = ("1.30", str(kubernetes_validate.latest_version()))
CONFIG_PATH = "/etc/qwen-serve/config.yaml"


def _example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return data


# name -> values overrides. Each scenario is rendered, validated, and its config loaded and planned.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "example-7b-128k-tp4": _example("qwen2.5-7b-128k-tp4.yaml"),
    "example-0.5b-dp4": _example("qwen2.5-0.5b-dp4.yaml"),
    "observability": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kps"}},
                      "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"}},
                      "grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                           "additionalLabels": {"grafana_folder": "llm"}}},
    "minimal-objects": {"podDisruptionBudget": {"enabled": False}, "serviceAccount": {"create": False},
                        "modelCache": {"enabled": False}, "auth": {"enabled": False}},
    "network-policy": {"networkPolicy": {"enabled": True, "from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}},
    "ingress-tls": {"ingress": {"enabled": True, "className": "nginx",
                                "hosts": [{"host": "llm.example.com", "paths": [{"path": "/"}]}],
                                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]}},
    "hpa": {"autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 2, "maxReplicas": 6},
            "modelCache": {"accessMode": "ReadWriteMany"}},
    "keda": {"autoscaling": {"enabled": True, "kind": "keda", "maxReplicas": 3,
                             "keda": {"authenticationRef": "prom-auth"}},
             "serviceMonitor": {"enabled": True}},
    "cache-existing-claim": {"modelCache": {"existingClaim": "qwen-weights"}},
    "cache-disabled-no-limit": {"modelCache": {"enabled": False, "emptyDirSizeLimit": ""}},
    "auth-existing-secret": {"auth": {"existingSecret": "team-keys", "secretKey": "api-keys.yaml"}},
    "auth-inline-keys": {"auth": {"keys": [{"id": "team-a", "sha256": "a" * 64, "rpm": 60}]}},
    "auth-off": {"auth": {"enabled": False}},
    "explicit-parallelism": {"engine": {"gpus": 8, "tensorParallelSize": 2, "dataParallelSize": 4,
                                        "extraArgs": ["--max-num-seqs", "128"], "kvCacheDtype": "fp8"},
                             "extraConfig": {"guided": {"legacy_fields": "reject"}}},
    "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                       {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                           "labelSelector": {"matchLabels": {
                                                               "app.kubernetes.io/name": "qwen-serve"}}}}]}},
                   "runtimeClassName": "nvidia", "priorityClassName": "llm-serving",
                   "imagePullSecrets": [{"name": "regcred"}], "image": {"tag": "sha256:" + "0" * 64},
                   "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}],
                   "commonLabels": {"team": "ml"}, "podLabels": {"tier": "gpu"}},
    "provisioning": {"model": {"revision": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"},
                     "hfToken": {"existingSecret": "hf-token", "key": "hf"}},
    "predownload-off": {"modelCache": {"predownload": False}},
    "surge-rwx": {"replicaCount": 3, "modelCache": {"accessMode": "ReadWriteMany"}},
}


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    manifests = _chart().render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(manifests.items()))


def render_raw(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path → rendered text (NOTES.txt included)."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True)))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values``."""
    objects = []
    for path, text in render_raw(values).items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    c: dict[str, Any] = pod["containers"][0]
    return c


def traffic_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == FULLNAME]
    return service


def metrics_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == f"{FULLNAME}-metrics"]
    return service


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def rendered_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {}))
    data: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return data


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = _chart().merge_values(overrides)
    return values


def init_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pod_spec(objects).get("initContainers", [])
    return found


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """Container env by name: the value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def strategy(values: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = only(render(values), "Deployment")["spec"]["strategy"]
    return found


class FakeKubeAPI:
    """Just enough of the Kubernetes API for Helm's `lookup` of PersistentVolumeClaims: discovery of v1 and
    GET of the claims in ``claims`` (name → spec); 404 for anything else. Records the paths asked for."""

    def __init__(self, claims: dict[str, dict[str, Any]]) -> None:
        self.claims = claims
        self.paths: list[str] = []

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                api.paths.append(path)
                prefix = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/"
                body: dict[str, Any] | None = None
                if path == "/api/v1":
                    body = {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                        {"name": "persistentvolumeclaims", "singularName": "persistentvolumeclaim",
                         "namespaced": True, "kind": "PersistentVolumeClaim", "verbs": ["get", "list"]}]}
                elif path.startswith(prefix) and path[len(prefix):] in api.claims:
                    name = path[len(prefix):]
                    body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": api.claims[name]}
                status = 200 if body is not None else 404
                if body is None:
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                            "code": 404}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@contextmanager
def cluster(claims: dict[str, dict[str, Any]]) -> Iterator[tuple[helm.Config, FakeKubeAPI]]:
    """A helm Config whose kubeconfig points at a FakeKubeAPI holding ``claims``."""
    api = FakeKubeAPI(claims)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), api.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
    })
    try:
        with helm.Config(kubeconfig_content=kubeconfig, namespace=NAMESPACE) as config:
            yield config, api
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def render_live(claims: dict[str, dict[str, Any]], values: dict[str, Any]) -> list[dict[str, Any]]:
    """Render with `lookup` answered by a fake API holding ``claims``; asserts the lookups were made."""
    with cluster(claims) as (config, api):
        manifests = config.render(_chart(), values, name=RELEASE, namespace=NAMESPACE)
    assert any("/persistentvolumeclaims/" in path for path in api.paths), api.paths
    objects: list[dict[str, Any]] = []
    for path, text in manifests.items():
        if not path.endswith("NOTES.txt"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


# Schemas for the CRDs kubernetes-validate does not ship: the fields the operators require, the types
# of the fields this chart sets (taken from the prometheus-operator and KEDA CRDs).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name", "namespace"],
             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                            "namespace": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_SELECTOR = {"type": "object", "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR, "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                                   "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                                   "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                               "rules": {"type": "array", "items": {
                                   "type": "object", "required": ["expr"],
                                   "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                   "properties": {"record": {"type": "string"}, "alert": {"type": "string"},
                                                  "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                                  "keep_firing_for": _DURATION,
                                                  "labels": _LABELS, "annotations": _LABELS}}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object", "properties": {"horizontalPodAutoscalerConfig": {
                    "type": "object", "properties": {"behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   # KEDA rejects non-string metadata values (threshold: 5 must be "5").
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "authenticationRef": {"type": "object", "required": ["name"]}}}}}}}},
}


def validate_object(obj: dict[str, Any]) -> None:
    schema = CRD_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is not None:
        jsonschema.validate(obj, schema)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


# ---------------------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("scenario", ["defaults", "example-7b-128k-tp4", "example-0.5b-dp4", "observability", "keda"])
def test_lint_passes(scenario: str) -> None:
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not findings, report


# ---------------------------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    assert {"Deployment", "Service", "ConfigMap"} <= kinds(objects)
    for obj in objects:
        validate_object(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_config_loads_and_plans(scenario: str) -> None:
    """The ConfigMap is a qwen-serve config the loader accepts and the planner can launch."""
    overrides = SCENARIOS[scenario]
    values = merged(overrides)
    objects = render(overrides)
    data = rendered_config(objects)
    config = parse_config(data)
    plan = build_plan(config, gpu_visible=True)

    assert config.model.source == values["model"]["source"]
    assert config.model.max_model_len == values["model"]["maxModelLen"]
    assert config.engine.gpus == values["engine"]["gpus"]
    assert config.engine.extra_args == values["engine"]["extraArgs"]
    assert config.gateway.port == 8080 and config.gateway.host == "0.0.0.0"
    assert plan.tensor_parallel_size * plan.data_parallel_size <= values["engine"]["gpus"]
    for key in ("tensorParallelSize", "dataParallelSize"):
        if values["engine"][key] != "auto":
            field = "tensor_parallel_size" if key.startswith("tensor") else "data_parallel_size"
            assert getattr(plan, field) == values["engine"][key]

    # The pod runs exactly that file.
    c = container(objects)
    assert c["command"] == ["qwen-serve"] and c["args"] == ["up", "--config", CONFIG_PATH]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    assert mount["subPath"] == "config.yaml" and mount["readOnly"]

    # Draining fits in the grace period, after the preStop sleep.
    spec = pod_spec(objects)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep + config.gateway.drain_timeout_s < spec["terminationGracePeriodSeconds"]


def test_examples_plan_as_their_names_say() -> None:
    plan_7b = build_plan(parse_config(rendered_config(render(SCENARIOS["example-7b-128k-tp4"]))), gpu_visible=True)
    assert (plan_7b.tensor_parallel_size, plan_7b.data_parallel_size, plan_7b.max_model_len) == (4, 1, 131072)
    plan_05b = build_plan(parse_config(rendered_config(render(SCENARIOS["example-0.5b-dp4"]))), gpu_visible=True)
    assert (plan_05b.tensor_parallel_size, plan_05b.data_parallel_size) == (1, 4)
    defaults = build_plan(parse_config(rendered_config(render())), gpu_visible=True)
    assert defaults.model and defaults.max_model_len == 131072


@pytest.mark.parametrize(("scenario", "present", "absent"), [
    ("defaults", {"ServiceAccount", "PersistentVolumeClaim", "Secret", "PodDisruptionBudget"},
     {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Ingress", "HorizontalPodAutoscaler", "ScaledObject"}),
    ("observability", {"ServiceMonitor", "PrometheusRule"}, set()),
    ("minimal-objects", set(), {"ServiceAccount", "PersistentVolumeClaim", "Secret", "PodDisruptionBudget"}),
    ("network-policy", {"NetworkPolicy"}, set()),
    ("ingress-tls", {"Ingress"}, set()),
    ("hpa", {"HorizontalPodAutoscaler"}, {"ScaledObject"}),
    ("keda", {"ScaledObject"}, {"HorizontalPodAutoscaler"}),
    ("cache-existing-claim", set(), {"PersistentVolumeClaim"}),
    ("auth-existing-secret", set(), {"Secret"}),
])
def test_toggles(scenario: str, present: set[str], absent: set[str]) -> None:
    found = kinds(render(SCENARIOS[scenario]))
    assert present <= found
    assert not (absent & found)


# ---------------------------------------------------------------------------------------------- pod
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_gpu_count_follows_values(gpus: int) -> None:
    objects = render({"engine": {"gpus": gpus}})
    resources = container(objects)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == gpus
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    assert rendered_config(objects)["engine"]["gpus"] == gpus


def test_gpu_count_wins_over_resources_and_resource_name_is_configurable() -> None:
    resources = {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi", "nvidia.com/gpu": 7}}
    got = container(render({"engine": {"gpus": 2}, "resources": resources}))["resources"]
    assert got == {"requests": {"cpu": "2", "memory": "16Gi", "ephemeral-storage": "10Gi", "nvidia.com/gpu": 2},
                   "limits": {"memory": "32Gi", "nvidia.com/gpu": 2}}
    got = container(render({"engine": {"gpus": 2, "gpuResourceName": "amd.com/gpu"}}))["resources"]
    assert got["limits"]["amd.com/gpu"] == 2 and "nvidia.com/gpu" not in got["limits"]


def test_defaults_match_the_contract() -> None:
    values = _chart().values
    assert values["engine"]["gpus"] == 4
    assert values["model"]["source"] == "Qwen/Qwen2.5-7B-Instruct"
    assert values["model"]["maxModelLen"] == 131072
    config = rendered_config(render())
    assert config["engine"]["gpus"] == 4 and config["model"]["max_model_len"] == 131072


def test_probes_point_at_health_and_ready() -> None:
    c = container(render())
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * 3600, "72B download window"
    config = rendered_config(render())
    assert config["engine"]["startup_timeout_s"] == 1800, "auto: the default model is 7B"


def test_startup_probe_window_is_configurable() -> None:
    c = container(render({"probes": {"startup": {"failureThreshold": 1440}}}))
    assert c["startupProbe"]["failureThreshold"] == 1440
    assert c["startupProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("size", ["16Gi", "2Gi"])
def test_dev_shm_is_a_memory_emptydir(size: str) -> None:
    objects = render({"shm": {"sizeLimit": size}})
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "dshm")
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(objects)["volumeMounts"]


def test_model_cache_volume_and_hf_home() -> None:
    env = {e["name"]: e.get("value") for e in container(render())["env"]}
    assert env["HF_HOME"].startswith("/models/")
    volumes = {v["name"]: v for v in pod_spec(render())["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-model-cache"
    pvc = only(render(), "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

    volumes = {v["name"]: v for v in pod_spec(render(SCENARIOS["cache-existing-claim"]))["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "qwen-weights"
    volumes = {v["name"]: v for v in pod_spec(render(SCENARIOS["minimal-objects"]))["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "200Gi"}
    volumes = {v["name"]: v for v in pod_spec(render(SCENARIOS["cache-disabled-no-limit"]))["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {}
    assert "ReadWriteMany" in render_raw({"replicaCount": 2})["qwen-serve/templates/NOTES.txt"]


@pytest.mark.parametrize("scenario", ["defaults", "auth-existing-secret", "auth-inline-keys"])
def test_keys_secret_is_mounted_as_a_directory(scenario: str) -> None:
    """No subPath: the kubelet only updates whole-volume Secret mounts, so rotation needs this."""
    objects = render(SCENARIOS[scenario])
    values = merged(SCENARIOS[scenario])
    config = parse_config(rendered_config(objects))
    keys_file = Path(config.auth.keys_file)
    assert keys_file.is_absolute() and keys_file.name == values["auth"]["secretKey"]
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "keys")
    assert "subPath" not in mount and mount["readOnly"]
    assert Path(mount["mountPath"]) == keys_file.parent
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "keys")
    secret_name = values["auth"]["existingSecret"] or f"{FULLNAME}-keys"
    assert volume["secret"]["secretName"] == secret_name
    if not values["auth"]["existingSecret"]:
        secret = only(objects, "Secret")
        keys = parse_keys(yaml.safe_load(secret["stringData"][values["auth"]["secretKey"]]))
        assert [k.id for k in keys.keys] == [k["id"] for k in values["auth"]["keys"]]


def test_auth_off_mounts_no_keys() -> None:
    objects = render(SCENARIOS["auth-off"])
    config = parse_config(rendered_config(objects))
    assert config.auth.enabled is False
    assert all(m["name"] != "keys" for m in container(objects)["volumeMounts"])
    assert "Secret" not in kinds(objects)


def test_non_root_security_context() -> None:
    spec = pod_spec(render())
    assert spec["securityContext"]["runAsNonRoot"] is True
    # No forced UID/GID: the image's numeric USER satisfies runAsNonRoot, and a platform that assigns
    # its own UID (OpenShift's restricted policy) may.
    assert "runAsUser" not in spec["securityContext"] and "runAsGroup" not in spec["securityContext"]
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert spec["automountServiceAccountToken"] is False
    c = container(render())
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_scheduling_and_image() -> None:
    objects = render(SCENARIOS["scheduling"])
    spec = pod_spec(objects)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "llm-serving"
    assert spec["affinity"]["podAntiAffinity"]
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container(objects)["image"] == "qwen-serve@sha256:" + "0" * 64
    assert container(render({"image": {"repository": "r.example/qs", "tag": "1.2.3"}}))["image"] == "r.example/qs:1.2.3"
    assert container(render())["image"] == f"qwen-serve:{_chart().metadata['appVersion']}"


def test_selectors_use_name_and_instance_only() -> None:
    objects = render(SCENARIOS["scheduling"])  # commonLabels and podLabels set
    selector = {"app.kubernetes.io/name": "qwen-serve", "app.kubernetes.io/instance": RELEASE}
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert traffic_service(objects)["spec"]["selector"] == selector
    assert metrics_service(objects)["spec"]["selector"] == selector
    assert only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items() and pod_labels["tier"] == "gpu" and pod_labels["team"] == "ml"
    for obj in objects:
        labels = obj["metadata"]["labels"]
        for key in ("helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/component",
                    "app.kubernetes.io/part-of"):
            assert key in labels, (obj["kind"], key)
        assert labels["team"] == "ml"


def test_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        value: str = only(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value
    assert checksum({}) != checksum({"model": {"maxModelLen": 65536}})
    assert checksum({}) == checksum({"auth": {"keys": [{"id": "x", "sha256": "b" * 64}]}}), "key rotation must not restart"


def test_long_streams_survive_ingress_and_rollouts() -> None:
    objects = render(SCENARIOS["ingress-tls"])
    annotations = only(objects, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    deployment = only(objects, "Deployment")
    # One replica: the old pod drains its streams (preStop + gateway drain) before the new one starts.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert only(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_recreate_strategy_drops_the_default_rolling_update() -> None:
    deployment = only(render({"updateStrategy": {"type": "Recreate"}}), "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    validate_object(deployment)


def test_autoscaling_on_queue_length() -> None:
    objects = render(SCENARIOS["hpa"])
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and "num_requests_waiting" in metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert "replicas" not in only(objects, "Deployment")["spec"]

    objects = render(SCENARIOS["keda"])
    scaled = only(objects, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(vllm:num_requests_waiting{")
    assert f'service="{FULLNAME}-metrics"' in trigger["metadata"]["query"]  # the scraped Service
    assert trigger["metadata"]["threshold"] == "5"
    assert "replicas" not in only(objects, "Deployment")["spec"]


def test_network_policy_admits_only_the_gateway_and_metrics_ports() -> None:
    policy = only(render(SCENARIOS["network-policy"]), "NetworkPolicy")
    rule, metrics_rule = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"][0]["namespaceSelector"]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    policy = only(render({"networkPolicy": {"enabled": True, "metricsFrom": []}}), "NetworkPolicy")
    assert "from" not in policy["spec"]["ingress"][1]  # empty: any source may scrape


# ---------------------------------------------------------------------------------------------- rejects
def test_schema_rejects_negative_gpus() -> None:
    chart = _chart()
    with pytest.raises(helm.HelmValuesError) as excinfo:
        chart.validate_schema(chart.merge_values({"engine": {"gpus": -1}}))
    message = str(excinfo.value)
    assert "/engine/gpus" in message and "minimum" in message and "-1" in message
    with pytest.raises(helm.HelmValuesError, match="/engine/gpus"):  # install/template check it too
        chart.render({"engine": {"gpus": -1}}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(("overrides", "path"), [
    ({"engine": {"gpus": 0}}, "/engine/gpus"),
    ({"engine": {"gpus": "4"}}, "/engine/gpus"),
    ({"engine": {"tensorParallelSize": 0}}, "/engine/tensorParallelSize"),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "/engine/gpuMemoryUtilization"),
    ({"engine": {"gpu": 2}}, "/engine"),  # typo: unknown keys are errors, as in the qwen-serve config
    ({"autoscaling": {"kind": "cpu"}}, "/autoscaling/kind"),
    ({"shm": {"sizeLimit": "lots"}}, "/shm/sizeLimit"),
    ({"auth": {"keys": [{"id": "a", "sha256": "qs-not-a-hash"}]}}, "/auth/keys/0/sha256"),
    ({"gateway": {"metricsPort": 8080}}, "/gateway/metricsPort"),  # the traffic port
    ({"gateway": {"metricsPort": 0}}, "/gateway/metricsPort"),
    ({"gateway": {"engineMetricsCacheSeconds": -1}}, "/gateway/engineMetricsCacheSeconds"),
    ({"updateStrategy": {"rollingUpdate": {"maxSurge": "1"}}}, "/updateStrategy/rollingUpdate/maxSurge"),
    ({"updateStrategy": {"type": "Rolling"}}, "/updateStrategy/type"),
    ({"progressDeadlineSeconds": 0}, "/progressDeadlineSeconds"),
    ({"progressDeadlineSeconds": "2h"}, "/progressDeadlineSeconds"),
    ({"hfToken": {"key": ""}}, "/hfToken/key"),
    ({"hfToken": {"secret": "hf"}}, "/hfToken"),
    ({"model": {"revision": 7}}, "/model/revision"),
    ({"modelCache": {"predownload": "yes"}}, "/modelCache/predownload"),
])
def test_schema_rejects_bad_values(overrides: dict[str, Any], path: str) -> None:
    chart = _chart()
    with pytest.raises(helm.HelmValuesError, match=re.escape(path)):
        chart.validate_schema(chart.merge_values(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"engine": {"gpus": 4, "tensorParallelSize": 4, "dataParallelSize": 2}}, "exceeds engine.gpus=4"),
    ({"engine": {"gpus": 2, "tensorParallelSize": 4}}, "engine.tensorParallelSize=4 exceeds engine.gpus=2"),
    ({"terminationGracePeriodSeconds": 300}, "terminationGracePeriodSeconds=300 must exceed"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas=5"),
    ({"extraConfig": {"engine": {"gpus": 2}}}, "extraConfig.engine.gpus: set engine.gpus instead"),
    ({"extraConfig": {"gateway": {"port": 9000}}}, "extraConfig.gateway.port/host"),
    ({"extraConfig": {"auth": {"keys_file": "/tmp/k.yaml"}}}, "extraConfig.auth.keys_file"),
    ({"extraConfig": {"gateway": {"metrics_port": 9100}}}, "extraConfig.gateway.metrics_port: set gateway.metricsPort"),
])
def test_render_refuses_inconsistent_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        _chart().render(overrides, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------------------- values
CONTRACT_VALUES = """
image.repository image.tag image.pullPolicy model.source model.servedName model.maxModelLen model.revision
hfToken.existingSecret hfToken.key modelCache.predownload updateStrategy progressDeadlineSeconds
engine.gpus engine.tensorParallelSize engine.dataParallelSize engine.gpuMemoryUtilization engine.extraArgs
auth.enabled auth.existingSecret modelCache.enabled modelCache.size modelCache.storageClass
modelCache.accessMode modelCache.existingClaim shm.sizeLimit probes.startup probes.readiness probes.liveness
terminationGracePeriodSeconds serviceMonitor.enabled prometheusRule.enabled grafanaDashboard.enabled
podDisruptionBudget.enabled autoscaling.enabled autoscaling.kind autoscaling.minReplicas
autoscaling.maxReplicas autoscaling.targetWaiting networkPolicy.enabled ingress.enabled resources
nodeSelector tolerations affinity
""".split()


@pytest.mark.parametrize("dotted", CONTRACT_VALUES)
def test_values_have_the_contract_keys(dotted: str) -> None:
    node: Any = _chart().values
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"values.yaml lacks {dotted}, a documented chart value"
        node = node[part]


def test_every_value_is_documented() -> None:
    """Each key has a `# --` comment on itself or on an enclosing key (helm-docs style)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not m or line.lstrip().startswith("-"):
            continue
        indent = len(m.group(1))
        while documented and documented[-1][0] >= indent:
            documented.pop()
        j, has_doc = i - 1, False
        while j >= 0 and lines[j].lstrip().startswith("#"):
            has_doc = has_doc or lines[j].lstrip().startswith("# --")
            j -= 1
        inherited = any(d for _, d in documented)
        is_leaf = not line.rstrip().endswith(":")
        if is_leaf and not (has_doc or inherited):
            undocumented.append(f"values.yaml:{i + 1}: {m.group(2)}")
        documented.append((indent, has_doc or inherited))
    assert not undocumented, undocumented


def test_schema_accepts_defaults_and_examples() -> None:
    chart = _chart()
    chart.validate_schema(chart.values)
    for example in EXAMPLES.glob("*.yaml"):
        chart.validate_schema(chart.merge_values(yaml.safe_load(example.read_text())))


# ---------------------------------------------------------------------------------------------- files
def test_prometheus_rule_embeds_the_rules_file() -> None:
    rules_file = CHART / "files" / "prometheus" / "rules.yaml"
    rule = only(render(SCENARIOS["observability"]), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(rules_file.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kps"


def test_grafana_dashboard_configmaps() -> None:
    dashboards = sorted((CHART / "files" / "dashboards").glob("*.json"))
    objects = render(SCENARIOS["observability"])
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    # One ConfigMap per file, matched by its data key (sorting names and files apart pairs them wrongly:
    # "qwen-serve" < "qwen-serve-bench" but "qwen-serve-bench.json" < "qwen-serve.json").
    by_file = {key: cm for cm in maps for key in cm["data"]}
    assert len(maps) == len(dashboards) == len(by_file)
    assert sorted(by_file) == [path.name for path in dashboards]
    for path in dashboards:
        cm = by_file[path.name]
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["labels"]["grafana_folder"] == "llm"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    assert not [o for o in render() if o["metadata"]["labels"].get("grafana_dashboard")]


def _selects(selector: dict[str, str], obj: dict[str, Any]) -> bool:
    return selector.items() <= obj["metadata"]["labels"].items()


def test_service_monitor_scrapes_the_metrics_port_only() -> None:
    objects = render(SCENARIOS["observability"])
    monitor = only(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services if _selects(selector, s)] == [f"{FULLNAME}-metrics"]
    (port,) = metrics_service(objects)["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 9090, "metrics")


def test_metrics_port_is_never_exposed_to_traffic() -> None:
    """The traffic Service and the Ingress know only the http port; the config serves metrics apart."""
    objects = render(SCENARIOS["ingress-tls"])
    assert [(p["name"], p["targetPort"]) for p in traffic_service(objects)["spec"]["ports"]] == [("http", "http")]
    for rule in only(objects, "Ingress")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    gateway = parse_config(rendered_config(objects)).gateway
    assert (gateway.port, gateway.metrics_port, gateway.engine_metrics_cache_s) == (8080, 9090, 1)


def test_metrics_port_cannot_be_removed() -> None:
    """A null removes the key in Helm; the pod would otherwise start with metrics_port 0 and exit."""
    with pytest.raises(helm.HelmValuesError, match="missing property 'metricsPort'"):
        _chart().render({"gateway": {"metricsPort": None}}, name=RELEASE, namespace=NAMESPACE)


def test_metrics_port_follows_values() -> None:
    objects = render({"gateway": {"metricsPort": 9400, "engineMetricsCacheSeconds": 10}})
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container(objects)["ports"]
    assert metrics_service(objects)["spec"]["ports"][0]["port"] == 9400
    config = rendered_config(objects)["gateway"]
    assert (config["metrics_port"], config["engine_metrics_cache_s"]) == (9400, 10)


def test_crd_schemas_catch_mistakes() -> None:
    """The hand-written CRD schemas are not vacuous."""
    scaled = copy.deepcopy(only(render(SCENARIOS["keda"]), "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)
    monitor = copy.deepcopy(only(render(SCENARIOS["observability"]), "ServiceMonitor"))
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)
    rule = copy.deepcopy(only(render(SCENARIOS["observability"]), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0].pop("expr")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(rule)


# ---------------------------------------------------------------------------------------------- rollouts
NO_SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
SURGE_ONE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


@pytest.mark.parametrize(("values", "expected"), [
    ({}, NO_SURGE),  # one replica, ReadWriteOnce cache: a surge pod needs 4 more GPUs on the volume's node
    ({"modelCache": {"accessMode": "ReadWriteMany"}}, NO_SURGE),  # one replica
    ({"replicaCount": 3}, NO_SURGE),  # ReadWriteOnce
    ({"replicaCount": 3, "modelCache": {"accessMode": "ReadWriteOncePod"}}, NO_SURGE),
    ({"replicaCount": 3, "modelCache": {"accessMode": "ReadWriteMany"}}, SURGE_ONE),
    ({"replicaCount": 2, "modelCache": {"enabled": False}}, SURGE_ONE),  # an emptyDir per pod
    ({"autoscaling": {"enabled": True, "minReplicas": 2}, "modelCache": {"accessMode": "ReadWriteMany"}}, SURGE_ONE),
    ({"autoscaling": {"enabled": True, "minReplicas": 1}, "modelCache": {"accessMode": "ReadWriteMany"}}, NO_SURGE),
    ({"updateStrategy": {}}, NO_SURGE),
])
def test_auto_strategy_surges_only_with_several_replicas_and_a_multi_node_cache(
        values: dict[str, Any], expected: dict[str, Any]) -> None:
    deployment = only(render(values), "Deployment")
    assert deployment["spec"]["strategy"] == expected
    validate_object(deployment)


@pytest.mark.parametrize("values", [
    {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}},
    {"updateStrategy": {"rollingUpdate": {"maxSurge": "50%"}}, "replicaCount": 2},
    {"updateStrategy": {"type": "RollingUpdate"}},  # Kubernetes' default maxSurge is 25%: one pod
    {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
     "modelCache": {"accessMode": "ReadWriteOncePod"}},
])
def test_render_refuses_a_surge_with_a_readwriteonce_cache(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError) as excinfo:
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(excinfo.value)
    assert "updateStrategy.rollingUpdate.maxSurge=" in message and "modelCache.accessMode=ReadWriteOnce" in message
    assert "rollout never finishes" in message


def test_explicit_strategies_are_honoured() -> None:
    assert strategy({"updateStrategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}}) == {"type": "Recreate"}
    assert strategy({"updateStrategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "50%"}},
                     "replicaCount": 4}) == {"type": "RollingUpdate",
                                             "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "50%"}}
    rwx = {"replicaCount": 4, "modelCache": {"accessMode": "ReadWriteMany"}}
    assert strategy({**rwx, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%"}}}) == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%"}}
    # Without a cache volume a surge is the user's call too.
    assert strategy({"modelCache": {"enabled": False}, "updateStrategy": SURGE_ONE}) == SURGE_ONE


def test_render_refuses_a_strategy_that_can_never_replace_a_pod() -> None:
    values = {"updateStrategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}}
    with pytest.raises(helm.HelmRenderError, match=re.escape("maxSurge and maxUnavailable are both 0")):
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def _notes_timeout(values: dict[str, Any]) -> int:
    notes = render_raw(values)["qwen-serve/templates/NOTES.txt"]
    (timeout,) = re.findall(r"rollout status \S+ --timeout=(\d+)s", notes)
    return int(timeout)


@pytest.mark.parametrize("values", [{}, {"engine": {"startupTimeoutSeconds": 14400},
                                         "probes": {"startup": {"failureThreshold": 1440}}},
                                    {"probes": {"startup": {"failureThreshold": 1440}}},
                                    {"terminationGracePeriodSeconds": 1800}, SCENARIOS["example-7b-128k-tp4"]])
def test_progress_deadline_outlasts_startup_and_drain(values: dict[str, Any]) -> None:
    """Kubernetes' 600 s default fails a rollout (and `kubectl rollout status`) while the weights download."""
    merged_values = merged(values)
    deadline = only(render(values), "Deployment")["spec"]["progressDeadlineSeconds"]
    probe = merged_values["probes"]["startup"]
    timeout = rendered_config(render(values))["engine"]["startup_timeout_s"]
    startup = max(timeout, probe["periodSeconds"] * probe["failureThreshold"])
    assert deadline > startup + merged_values["terminationGracePeriodSeconds"] + 300, "room for pull and attach"
    assert _notes_timeout(values) == deadline, "NOTES' rollout status waits as long as the deadline"


def test_progress_deadline_can_be_overridden() -> None:
    values = {"progressDeadlineSeconds": 20000}
    assert only(render(values), "Deployment")["spec"]["progressDeadlineSeconds"] == 20000
    assert _notes_timeout(values) == 20000


def test_chart_only_change_leaves_the_pod_template_byte_identical(tmp_path: Path) -> None:
    """A new chart version (or a dashboard edit) must not restart every GPU pod."""
    bumped = tmp_path / "qwen-serve"
    shutil.copytree(CHART, bumped)
    chart_yaml = bumped / "Chart.yaml"
    text = chart_yaml.read_text()
    assert re.search(r"^version: \S+$", text, re.M)
    chart_yaml.write_text(re.sub(r"^version: \S+$", "version: 9.9.9", text, flags=re.M))
    dashboard = next((bumped / "files" / "dashboards").glob("*.json"))
    board = json.loads(dashboard.read_text())
    board["title"] = board.get("title", "") + " (edited)"
    dashboard.write_text(json.dumps(board))

    values = {**SCENARIOS["observability"], **SCENARIOS["scheduling"]}
    old = _chart().render(values, name=RELEASE, namespace=NAMESPACE)["qwen-serve/templates/deployment.yaml"]
    new = helm.Chart.load(bumped).render(values, name=RELEASE, namespace=NAMESPACE)["qwen-serve/templates/deployment.yaml"]
    assert old != new, "the bump must show somewhere (the Deployment's own labels), or this test proves nothing"
    assert "helm.sh/chart: qwen-serve-9.9.9" in new
    assert old[old.index("\n  template:\n"):] == new[new.index("\n  template:\n"):]

    template_labels = only(render(values), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in template_labels and "app.kubernetes.io/version" not in template_labels


def test_notes_suggest_a_keys_secret_no_chart_object_has() -> None:
    """Release `qwen-serve`: fullname `qwen-serve`, chart Secret `qwen-serve-keys`. Creating a Secret of that
    name fails, and switching to it with auth.existingSecret makes Helm delete it on the upgrade."""
    manifests = _chart().render({}, name="qwen-serve", namespace=NAMESPACE)
    names = {doc["metadata"]["name"] for path, text in manifests.items() if not path.endswith("NOTES.txt")
             for doc in yaml.safe_load_all(text) if doc}
    assert "qwen-serve-keys" in names  # the chart-managed Secret this is about
    notes = manifests["qwen-serve/templates/NOTES.txt"]
    (created,) = re.findall(r"create secret generic (\S+)", notes)
    (switched,) = re.findall(r"--set auth\.existingSecret=(\S+)", notes)
    assert created == switched == "qwen-serve-api-keys"
    assert created not in names


# ---------------------------------------------------------------------------------------------- model cache claim
CLAIM = f"{FULLNAME}-model-cache"
LIVE_CLAIM = {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
              "resources": {"requests": {"storage": "200Gi"}}}


@pytest.mark.parametrize(("live", "values", "message"), [
    (LIVE_CLAIM, {"modelCache": {"accessMode": "ReadWriteMany"}},
     f"modelCache.accessMode=ReadWriteMany: PersistentVolumeClaim {CLAIM} has access modes ReadWriteOnce"),
    (LIVE_CLAIM, {"modelCache": {"storageClass": "fast-ssd"}},
     f'modelCache.storageClass=fast-ssd: PersistentVolumeClaim {CLAIM} has storage class "standard"'),
    (LIVE_CLAIM, {"modelCache": {"size": "100Gi"}}, "set modelCache.size to at least 200Gi"),
    ({**LIVE_CLAIM, "resources": {"requests": {"storage": "1Ti"}}}, {"modelCache": {"size": "1000Gi"}},
     "set modelCache.size to at least 1Ti"),
    ({**LIVE_CLAIM, "resources": {"requests": {"storage": "250G"}}}, {"modelCache": {"size": "200Gi"}},
     "at least 250G"),  # 200Gi is 214.7 GB
])
def test_upgrade_refuses_claim_changes_kubernetes_cannot_make(
        live: dict[str, Any], values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as excinfo:
        render_live({CLAIM: live}, values)
    assert message in str(excinfo.value)
    assert f"delete pvc {CLAIM}" in str(excinfo.value) and "modelCache.existingClaim" in str(excinfo.value)


def test_upgrade_keeps_the_live_claim_and_lets_it_grow() -> None:
    pvc = only(render_live({CLAIM: LIVE_CLAIM}, {"modelCache": {"size": "300Gi"}}), "PersistentVolumeClaim")
    # storageClass empty: keep the class the claim has (dropping it would be a change Kubernetes refuses).
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "300Gi"
    pvc = only(render_live({CLAIM: {**LIVE_CLAIM, "resources": {"requests": {"storage": "214748364800"}}}},
                           {"modelCache": {"size": "200Gi", "storageClass": "standard"}}), "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"  # the same size, spelt differently
    # No live claim yet (a first install): the values as they are.
    pvc = only(render_live({}, {"modelCache": {"accessMode": "ReadWriteMany"}}), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in pvc["spec"]


def test_strategy_follows_the_access_modes_of_an_existing_claim() -> None:
    values = {"replicaCount": 2, "modelCache": {"existingClaim": "weights"}}  # accessMode value: ReadWriteOnce
    rwx = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}}
    assert only(render_live({"weights": rwx}, values), "Deployment")["spec"]["strategy"] == SURGE_ONE
    rwo = {**rwx, "accessModes": ["ReadWriteOnce"]}
    assert only(render_live({"weights": rwo}, values), "Deployment")["spec"]["strategy"] == NO_SURGE
    with pytest.raises(helm.HelmRenderError, match=re.escape("modelCache.existingClaim=weights with access modes ReadWriteOnce")):
        render_live({"weights": rwo}, {**values, "updateStrategy": SURGE_ONE})


def test_claim_migration_is_documented() -> None:
    """`helm template` cannot look the claim up, so values.yaml and NOTES say what cannot change and how
    to migrate."""
    values_text = (CHART / "values.yaml").read_text()
    block = values_text[values_text.index("modelCache:"):values_text.index("\nshm:")]
    for needed in ("cannot change the access mode", "never shrink", "existingClaim", "delete pvc",
                   "--replicas=0", "allowVolumeExpansion"):
        assert needed in block, needed
    notes = render_raw()["qwen-serve/templates/NOTES.txt"]
    assert "cannot change and it cannot shrink" in notes and "modelCache.accessMode" in notes
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "kubectl -n llm delete pvc" in readme


# ---------------------------------------------------------------------------------------------- model provisioning
def test_model_revision_reaches_the_config_and_the_engine() -> None:
    objects = render(SCENARIOS["provisioning"])
    config = parse_config(rendered_config(objects))
    assert config.model.revision == "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    plan = build_plan(config, gpu_visible=True)
    args = plan.vllm_args
    assert args[args.index("--revision") + 1] == args[args.index("--tokenizer-revision") + 1] == config.model.revision
    assert "revision" not in rendered_config(render())["model"]  # empty: not rendered


def test_hf_token_comes_from_the_existing_secret() -> None:
    objects = render(SCENARIOS["provisioning"])
    ref = {"secretKeyRef": {"name": "hf-token", "key": "hf"}}
    assert env_of(container(objects))["HF_TOKEN"] == ref
    (init,) = init_containers(objects)
    assert env_of(init)["HF_TOKEN"] == ref
    default_key = render({"hfToken": {"existingSecret": "hf-token"}})
    assert env_of(container(default_key))["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "HF_TOKEN" not in env_of(container(render())) and "HF_TOKEN" not in env_of(init_containers(render())[0])


def test_predownload_fills_the_cache_and_the_engine_runs_offline() -> None:
    objects = render()
    (init,) = init_containers(objects)
    engine = container(objects)
    assert init["name"] == "model-download" and init["image"] == engine["image"]
    assert init["args"] == [CONFIG_PATH] and "snapshot_download" in init["command"][-1]
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    engine_mounts = {m["name"]: m for m in engine["volumeMounts"]}
    assert mounts["model-cache"]["mountPath"] == engine_mounts["model-cache"]["mountPath"]
    assert mounts["config"] == engine_mounts["config"]
    assert env_of(init)["HF_HOME"] == env_of(engine)["HF_HOME"]
    assert env_of(engine)["HF_HUB_OFFLINE"] == "1"
    assert init["securityContext"] == engine["securityContext"]
    gpu = "nvidia.com/gpu"
    assert gpu not in init["resources"]["limits"] and gpu not in init["resources"]["requests"]
    assert init["resources"]["requests"]["memory"] == engine["resources"]["requests"]["memory"]

    objects = render(SCENARIOS["predownload-off"])
    assert not init_containers(objects) and "HF_HUB_OFFLINE" not in env_of(container(objects))


def test_a_local_model_needs_no_download_and_runs_offline() -> None:
    for predownload in (True, False):
        objects = render({"model": {"source": "/models/Qwen2.5-7B-Instruct"}, "modelCache": {"predownload": predownload}})
        assert not init_containers(objects)
        assert env_of(container(objects))["HF_HUB_OFFLINE"] == "1"
        validate_object(only(objects, "Deployment"))


def _run_download_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: dict[str, Any],
                         fail_online: bool = False) -> list[dict[str, Any]]:
    """Run the init container's script with the rendered config and a stand-in snapshot_download that
    checks its arguments against the real signature and records them."""
    import huggingface_hub

    objects = render(values)
    (init,) = init_containers(objects)
    assert init["command"][:2] == ["python3", "-c"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(only(objects, "ConfigMap")["data"]["config.yaml"])
    real = inspect.signature(huggingface_hub.snapshot_download)
    calls: list[dict[str, Any]] = []

    def fake(*args: Any, **kwargs: Any) -> str:
        bound = real.bind(*args, **kwargs)
        calls.append(dict(bound.arguments))
        if fail_online and not kwargs.get("local_files_only"):
            raise ConnectionError("hub unreachable")
        return "/models/huggingface/hub/snapshot"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(sys, "argv", ["-c", *[a.replace(CONFIG_PATH, str(config_file)) for a in init["args"]]])
    exec(compile(init["command"][2], "model-download", "exec"), {"__name__": "__main__"})  # noqa: S102
    return calls


@pytest.mark.parametrize(("values", "expected"), [
    (SCENARIOS["provisioning"],
     {"repo_id": "Qwen/Qwen2.5-7B-Instruct", "revision": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"}),
    # A preset name downloads its Hugging Face repository, as the planner launches it.
    ({"model": {"source": "qwen2.5-0.5b-instruct", "maxModelLen": 32768}},
     {"repo_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": None}),
])
def test_download_script_fetches_the_configured_revision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: dict[str, Any], expected: dict[str, Any]) -> None:
    assert _run_download_script(tmp_path, monkeypatch, values) == [expected]


def test_download_script_uses_the_cache_when_the_hub_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _run_download_script(tmp_path, monkeypatch, {}, fail_online=True)
    assert [c.get("local_files_only", False) for c in calls] == [False, True]


def test_compile_caches_live_on_the_model_cache_volume() -> None:
    objects = render()
    env = env_of(container(objects))
    model_dir = next(m["mountPath"] for m in container(objects)["volumeMounts"] if m["name"] == "model-cache")
    for name in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith(f"{model_dir}/cache/"), name
    assert len({env[n] for n in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}) == 3
    assert container(objects)["resources"]["requests"]["ephemeral-storage"]


def test_values_comments_explain_yarn_and_openshift() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()

    def comment_above(key: str, indent: str = r"\s*") -> str:
        i = next(n for n, line in enumerate(lines) if re.match(rf"^{indent}{key}:", line))
        j = i
        while lines[j - 1].lstrip().startswith("#"):
            j -= 1
        return " ".join(line.strip().lstrip("#").strip() for line in lines[j:i])

    yarn = comment_above("maxModelLen")
    assert "Choose 32768" in yarn and "short" in yarn
    security = comment_above("podSecurityContext", indent="")  # the pod's, not redis.podSecurityContext
    assert "OpenShift" in security and "fsGroup" in security and "runAsUser" in security


# ---------------------------------------------------------------------------------------------- startup timeout
def _size_class_seconds(params: int) -> int:
    """The start-up time-out `auto` gives a model of ``params`` parameters: 1800 s up to 7B, 3600 s up to 32B,
    else 7200 s."""
    return 1800 if params < 10e9 else 3600 if params < 40e9 else 7200


def _startup_timeout(values: dict[str, Any]) -> int:
    timeout: int = rendered_config(render(values))["engine"]["startup_timeout_s"]
    return timeout


def test_auto_startup_timeout_follows_every_preset_size() -> None:
    from qwen_serve.presets import PRESETS

    assert _chart().values["engine"]["startupTimeoutSeconds"] == "auto"
    for name, geometry in PRESETS.items():
        expected = _size_class_seconds(geometry.param_count)
        assert geometry.hf_id is not None
        for source in (name, geometry.hf_id, geometry.hf_id.upper()):  # the planner accepts any case
            assert _startup_timeout({"model": {"source": source}}) == expected, (source, expected)
    assert _startup_timeout({"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}}) == 1800
    assert _startup_timeout({"model": {"source": "Qwen/Qwen2.5-32B-Instruct"}}) == 3600
    assert _startup_timeout({"model": {"source": "Qwen/Qwen2.5-72B-Instruct"}}) == 7200


@pytest.mark.parametrize("source", ["/models/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                                    "Qwen/Qwen2.5-7B"])
def test_auto_startup_timeout_is_2_h_for_a_source_of_unknown_size(source: str) -> None:
    assert _startup_timeout({"model": {"source": source}}) == 7200


def test_a_numeric_startup_timeout_is_used_as_given() -> None:
    assert _startup_timeout({"engine": {"startupTimeoutSeconds": 900}}) == 900
    assert _startup_timeout({"engine": {"startupTimeoutSeconds": 900.5}}) == 901  # whole seconds, rounded up
    assert _startup_timeout({"model": {"source": "Qwen/Qwen2.5-72B-Instruct"},
                             "engine": {"startupTimeoutSeconds": 600}}) == 600


@pytest.mark.parametrize("values", [{}, *({"model": {"source": f"Qwen/Qwen2.5-{size}-Instruct"}}
                                          for size in ("0.5B", "14B", "72B")),
                                    {"model": {"source": "/models/local"}},
                                    {"engine": {"startupTimeoutSeconds": 10000},
                                     "probes": {"startup": {"periodSeconds": 20, "failureThreshold": 500}}}])
def test_the_startup_probe_window_covers_the_startup_timeout(values: dict[str, Any]) -> None:
    probe = container(render(values))["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"] + probe.get("initialDelaySeconds", 0)
    assert window >= _startup_timeout(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"engine": {"startupTimeoutSeconds": 14400}},
     "probes.startup allows 7200 s (periodSeconds × failureThreshold + initialDelaySeconds), less than "
     "engine.startupTimeoutSeconds = 14400 s"),
    ({"engine": {"startupTimeoutSeconds": 14400}}, "Raise probes.startup.failureThreshold to at least 1440"),
    ({"probes": {"startup": {"failureThreshold": 100}}}, "engine.startupTimeoutSeconds = 1800 s"),
    ({"model": {"source": "Qwen/Qwen2.5-72B-Instruct"},
      "probes": {"startup": {"periodSeconds": 10, "failureThreshold": 700, "initialDelaySeconds": 60}}},
     "probes.startup allows 7060 s"),
    ({"model": {"source": "Qwen/Qwen2.5-72B-Instruct"},
      "probes": {"startup": {"periodSeconds": 10, "failureThreshold": 700, "initialDelaySeconds": 60}}},
     "failureThreshold to at least 714"),
])
def test_render_refuses_a_startup_probe_shorter_than_the_startup_timeout(values: dict[str, Any],
                                                                        message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_takes_auto_or_seconds_for_the_startup_timeout() -> None:
    chart = _chart()
    chart.validate_schema(chart.merge_values({"engine": {"startupTimeoutSeconds": 3600}}))
    for bad in ("2h", 0, -5):
        with pytest.raises(helm.HelmValuesError, match=re.escape("/engine/startupTimeoutSeconds")):
            chart.validate_schema(chart.merge_values({"engine": {"startupTimeoutSeconds": bad}}))

"""The chart's scale-out options, rendered for real with the Helm library (helpers from test_helm.py).

* ``inferencePool``: an InferencePool on the gateway port, the endpoint picker it names (Deployment, Service,
  RBAC, config) scraping ``/metrics/engine`` on the metrics port, an optional HTTPRoute, and the
  NetworkPolicy rule that lets the picker scrape.
* ``multinode``: a LeaderWorkerSet instead of the Deployment: a leader running the Ray head and
  ``qwen-serve up`` (vLLM with pipeline parallel over Ray), workers joining it, a Service on the leaders.
* ``limits`` / ``redis``: the shared rate-limit backend: a Redis URL in the config, from a Secret (added by
  the ``limits-config`` init container, whose script is run here), or the bundled Redis with its Service
  and NetworkPolicy; the refusals, and the NOTES' warning that local limits apply per replica.

InferencePool, HTTPRoute and LeaderWorkerSet are validated against their projects' published CRDs in
tests/data/crds (``openAPIV3Schema`` converted to JSON Schema; see the README there), plus the CEL and LWS
webhook rules that bear on them, checked by hand; every other object with kubernetes-validate, and the
LeaderWorkerSet's pod templates also against Kubernetes' own PodTemplateSpec schema. The rendered config must load and plan as a multi-node launch.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from qwen_serve.config import parse_config
from qwen_serve.plan import build_plan
from tests.unit.test_helm import (CHART, CONFIG_PATH, FULLNAME, K8S_VERSIONS, NAMESPACE, RELEASE, _chart, _METADATA,
                                  env_of, kinds, merged, only, render, render_raw, rendered_config, validate_object)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "data" / "crds"
POOL_LABEL = "qwen-serve.io/inference-pool"
PICKER = f"{FULLNAME}-epp"
SELECTOR = {"app.kubernetes.io/name": "qwen-serve", "app.kubernetes.io/instance": RELEASE}
LEADER = {"leaderworkerset.sigs.k8s.io/worker-index": "0"}

RWX = {"modelCache": {"accessMode": "ReadWriteMany"}}
ROUTE = {"enabled": True, "parentRefs": [{"name": "inference-gateway", "namespace": "gateways"}],
         "hostnames": ["llm.example.com"]}
# 72B at 128K on 24 GiB GPUs: one node of 4 is not enough, three are (the planner's own answer).
MULTINODE_72B = {"model": {"source": "Qwen/Qwen2.5-72B-Instruct", "servedName": "qwen2.5-72b-instruct"},
                 "engine": {"gpus": 4}, "extraConfig": {"engine": {"gpu_memory_gib": 24}},
                 "multinode": {"enabled": True, "nodes": 3}, **RWX}

SCENARIOS: dict[str, dict[str, Any]] = {
    "pool": {"inferencePool": {"enabled": True}, "networkPolicy": {"enabled": True}},
    "pool-route": {"inferencePool": {"enabled": True, "name": "qwen-pool", "failureMode": "FailOpen",
                                     "httpRoute": ROUTE}},
    "pool-external-picker": {"inferencePool": {"enabled": True, "picker": {"enabled": False,
                                                                           "serviceName": "llm-d-epp"}}},
    "pool-ha-picker": {"inferencePool": {"enabled": True, "picker": {
        "replicas": 2, "metricsPath": "/metrics", "metricsPort": 9191, "extraArgs": ["--v=2"],
        "metricFlags": {"total-running-requests-metric": "vllm:num_requests_running"},
        "nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "x", "operator": "Exists"}]}},
        "gateway": {"metricsPort": 9191}},
    "multinode": MULTINODE_72B,
    "multinode-pool-hpa": {**MULTINODE_72B, "inferencePool": {"enabled": True, "httpRoute": ROUTE},
                           "networkPolicy": {"enabled": True},
                           "autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 1, "maxReplicas": 3}},
    "multinode-keda-no-cache": {**MULTINODE_72B, "modelCache": {"enabled": False},
                                "autoscaling": {"enabled": True, "kind": "keda"}, "auth": {"enabled": False}},
    "multinode-everything": {**MULTINODE_72B, "hfToken": {"existingSecret": "hf"},
                             "model": {**MULTINODE_72B["model"], "revision": "v1"},
                             "imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "nvidia",
                             "priorityClassName": "llm", "nodeSelector": {"gpu": "a10"},
                             "extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                             "extraVolumes": [{"name": "x", "emptyDir": {}}],
                             "extraVolumeMounts": [{"name": "x", "mountPath": "/x"}],
                             "podLabels": {"tier": "gpu"}, "commonLabels": {"team": "ml"},
                             "multinode": {"enabled": True, "nodes": 2, "socketInterface": "ens5", "rayPort": 6380}},
}


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def serving_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The qwen-serve Deployment (the picker has one of its own)."""
    return named(objects, "Deployment", FULLNAME)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = serving_deployment(objects)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = c
    return found


# ---------------------------------------------------------------------------------------------- CRDs → JSON Schema
_DROPPED = ("description", "example", "externalDocs", "format", "nullable")  # format: int32/int64/date-time unchecked


def openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """One node of a CRD's structural ``openAPIV3Schema`` as JSON Schema, as an API server with strict field
    validation applies it:

    * objects are closed (``additionalProperties: false``) unless they say otherwise or are marked
      ``x-kubernetes-preserve-unknown-fields``: the server prunes unknown fields, strict validation refuses them;
    * ``x-kubernetes-int-or-string`` → integer or string; ``nullable`` → null allowed;
    * a ``required`` field with a ``default`` is never missing (the server defaults before it validates);
    * ``x-kubernetes-list-type: set`` → ``uniqueItems``; ``map`` keeps its ``x-kubernetes-list-map-keys``,
      checked by ``CRDValidator``;
    * CEL rules (``x-kubernetes-validations``) are dropped: jsonschema cannot run them; ``api_rule_violations``
      checks the ones that bear on what the chart renders. Other ``x-kubernetes-*`` and ``format`` are ignored.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key == "x-kubernetes-list-map-keys":
            out[key] = value
        elif not key.startswith("x-kubernetes-") and key not in _DROPPED:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "required" in node:
        properties = node.get("properties", {})
        out["required"] = [name for name in node["required"] if "default" not in properties.get(name, {})]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (node.get("type") == "object" and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Any:
    """``x-kubernetes-list-type: map``: no two items share their keys (missing keys take their default)."""
    if not validator.is_type(instance, "array"):
        return
    defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
    seen = set()
    for item in instance:
        key = tuple(repr(item.get(k, defaults[k])) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entries for key {dict(zip(keys, key))}")
        seen.add(key)


CRDValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                            {"x-kubernetes-list-map-keys": _list_map_keys})


def _crd_body(path: Path) -> tuple[bytes, bytes]:
    """A file here: (its comment header, the upstream file's bytes after it)."""
    data = path.read_bytes()
    size = 0
    for line in data.splitlines(keepends=True):
        if not line.startswith(b"#"):
            break
        size += len(line)
    return data[:size], data[size:]


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → JSON Schema, for every served version of every CRD in tests/data/crds."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(_crd_body(path)[1], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["kind"] == "CustomResourceDefinition", path
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version["served"]:
                continue
            schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _METADATA
            schema.setdefault("required", []).extend(["apiVersion", "kind", "metadata"])
            CRDValidator.check_schema(schema)
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return schemas


def crd_validate(obj: dict[str, Any]) -> None:
    """Validate against the CRD schema of the object's apiVersion and kind; raise the best error."""
    errors = CRDValidator(crd_schemas()[(obj["apiVersion"], obj["kind"])]).iter_errors(obj)
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------- rules past the schema
_GO_DURATION = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _seconds(duration: str) -> float:
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in _GO_DURATION.findall(duration))


def _int_or_percent(value: Any, where: str) -> list[str]:
    if isinstance(value, int):
        return [] if value >= 0 else [f"{where}: must be greater than or equal to 0"]
    match = re.fullmatch(r"([0-9]+)%", str(value))
    if not match:
        return [f"{where}: must be an integer or percentage"]
    return [] if int(match[1]) <= 100 else [f"{where}: must not be greater than 100%"]


def api_rule_violations(obj: dict[str, Any]) -> list[str]:
    """What the API refuses past the schema, by hand, for the fields the chart renders: the CEL rules
    (``x-kubernetes-validations``) of the InferencePool (GIE v1.0.1) and HTTPRoute (Gateway API v1.4.0)
    CRDs, and the LeaderWorkerSet validating webhook (LWS v0.8.0, pkg/webhooks/leaderworkerset_webhook.go).
    Fields whose rules are not written here (HTTPRoute filters, LWS subGroupPolicy) are refused outright."""
    spec, found = obj["spec"], []
    if obj["kind"] == "InferencePool":
        ref = spec["endpointPickerRef"]
        if ref.get("kind", "Service") == "Service" and "port" not in ref:
            found.append("endpointPickerRef: port is required when kind is 'Service' or unspecified")
    elif obj["kind"] == "HTTPRoute":
        parents: dict[tuple[str, ...], list[str]] = {}
        for ref in spec["parentRefs"]:
            parent: tuple[str, ...] = (ref.get("group", "gateway.networking.k8s.io"), ref.get("kind", "Gateway"), ref["name"],
                      ref.get("namespace", ""))
            parents.setdefault(parent, []).append(ref.get("sectionName", ""))
        for parent, sections in parents.items():
            if len(sections) > 1 and "" in sections:
                found.append(f"parentRefs {parent}: sectionName must be specified when parentRefs includes 2 or "
                             "more references to the same parent")
            if len(set(sections)) != len(sections):
                found.append(f"parentRefs {parent}: sectionName must be unique")
        rules = spec.get("rules", [{}])
        matches = [m for rule in rules for m in rule.get("matches", [{"path": {"type": "PathPrefix", "value": "/"}}])]
        if len(matches) > 128:
            found.append("rules: more than 128 matches")
        for rule in rules:
            if "filters" in rule or any("filters" in b for b in rule.get("backendRefs", [])):
                found.append("rules: filters: their CEL rules are not checked here; write them down first")
            for backend in rule.get("backendRefs", []):
                if backend.get("group", "") == "" and backend.get("kind", "Service") == "Service" and "port" not in backend:
                    found.append(f"backendRefs {backend['name']}: Must have port for Service reference")
            for match in rule.get("matches", []):
                path = {"type": "PathPrefix", "value": "/", **match.get("path", {})}
                value = path["value"]
                if path["type"] in ("Exact", "PathPrefix") and not (
                        value.startswith("/") and _PATH_CHARS.match(value) and not value.endswith(("/..", "/."))
                        and not any(bad in value for bad in ("//", "/./", "/../", "%2f", "%2F", "#"))):
                    found.append(f"matches: path {value!r}: must be an absolute path without // . .. %2f or #")
            timeouts = rule.get("timeouts", {})
            if ("request" in timeouts and "backendRequest" in timeouts and _seconds(timeouts["request"]) != 0
                    and _seconds(timeouts["backendRequest"]) > _seconds(timeouts["request"])):
                found.append("timeouts: backendRequest timeout cannot be longer than request timeout")
    elif obj["kind"] == "LeaderWorkerSet":
        template = spec["leaderWorkerTemplate"]
        replicas, size = spec.get("replicas", 1), template.get("size", 1)
        if not _DNS1035.match(obj["metadata"]["name"]):
            found.append("metadata.name: must be a DNS-1035 label (it names the headless Service)")
        if replicas < 0:
            found.append("replicas: must be equal or greater than 0")
        if size < 1:
            found.append("leaderWorkerTemplate.size: size must be equal or greater than 1")
        if replicas * size > 2**31 - 1:
            found.append("replicas: the product of replicas and worker replicas must not exceed 2147483647")
        rolling = spec.get("rolloutStrategy", {}).get("rollingUpdateConfiguration",
                                                      {"maxUnavailable": 1, "maxSurge": 0})
        unavailable, surge = rolling.get("maxUnavailable", 1), rolling.get("maxSurge", 0)
        found += _int_or_percent(unavailable, "maxUnavailable") + _int_or_percent(surge, "maxSurge")
        if rolling.get("partition", 0) < 0:
            found.append("partition: must be greater than or equal to 0")
        if unavailable in (0, "0%") and surge in (0, "0%") and replicas != 0:
            found.append("maxUnavailable: must not be 0 when `maxSurge` is 0")
        if "subGroupPolicy" in template:
            found.append("subGroupPolicy: the webhook's rules for it are not checked here; write them down first")
    return found


def validate_scaleout(obj: dict[str, Any]) -> None:
    """Validate one rendered object: CRD kinds against tests/data/crds, the rest with test_helm's checks."""
    if (obj["apiVersion"], obj["kind"]) not in crd_schemas():
        validate_object(obj)
        return
    crd_validate(obj)
    assert not api_rule_violations(obj), api_rule_violations(obj)
    if obj["kind"] == "LeaderWorkerSet":
        for which in ("leaderTemplate", "workerTemplate"):
            template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{obj['metadata']['name']}-{which.lower()}", "namespace": NAMESPACE},
                        "template": obj["spec"]["leaderWorkerTemplate"][which]}
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(template, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"LeaderWorkerSet {which} invalid for Kubernetes {version}: "
                                f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_crd_files_are_the_upstream_files() -> None:
    """Each file is its project's published CRD, byte for byte after a comment header: the header's git blob
    id (`git rev-parse <tag>:<path>` in the project's repository) is the hash of the rest of the file."""
    assert set(crd_schemas()) == {("inference.networking.k8s.io/v1", "InferencePool"),
                                  ("gateway.networking.k8s.io/v1", "HTTPRoute"),
                                  ("gateway.networking.k8s.io/v1beta1", "HTTPRoute"),
                                  ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")}
    readme = (CRDS / "README.md").read_text()
    assert "reconstruct" not in readme.lower()
    for needed in ("Apache-2.0", "The Kubernetes Authors", "https://github.com/kubernetes-sigs/gateway-api-inference-extension/",
                   "https://github.com/kubernetes-sigs/gateway-api/", "https://github.com/kubernetes-sigs/lws/"):
        assert needed in readme, needed
    paths = sorted(CRDS.glob("*.yaml"))
    assert len(paths) == 3
    for path in paths:
        header, body = _crd_body(path)
        fields = re.search(rb"tag (v[0-9.]+), commit ([0-9a-f]{40})\n# path (\S+) \(git blob ([0-9a-f]{40})\)", header)
        assert fields and b"Apache-2.0" in header and len(header.splitlines()) <= 6, path
        tag, commit, upstream, blob = (f.decode() for f in fields.groups())
        assert upstream.endswith("/" + path.name)
        assert hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest() == blob, f"{path.name} differs from upstream"
        for value in (tag, commit, blob):
            assert value in readme, (path.name, value)


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    ("InferencePool", lambda o: o["spec"].pop("endpointPickerRef"), "'endpointPickerRef' is a required property"),
    ("InferencePool", lambda o: o["spec"].update(targetPorts=[]), "should be non-empty"),
    ("InferencePool", lambda o: o["spec"].update(targetPorts=[{"number": 8080}, {"number": 8081}]), "is too long"),
    ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Maybe"), "is not one of"),
    ("InferencePool", lambda o: o["spec"].update(targetPortNumber=8080), "Additional properties"),  # pre-v1 field
    ("InferencePool", lambda o: o["spec"]["selector"].update(matchExpressions=[]), "Additional properties"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["timeouts"].update(request="1 hour"), "does not match"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(weight=-1), "less than the minimum"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(namespace="Bad_NS"), "does not match"),
    ("HTTPRoute", lambda o: o["spec"]["parentRefs"][0].pop("name"), "'name' is a required property"),
    ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always"), "is not one of"),
    ("LeaderWorkerSet", lambda o: o["spec"].update(replica=2), "Additional properties"),
    ("LeaderWorkerSet", lambda o: o["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"].update(maxSurge=0.5),
     "is not valid under any of the given schemas"),  # int-or-string
    ("LeaderWorkerSet", lambda o: o["spec"].update(networkConfig={}), "'subdomainPolicy' is a required property"),
    # The embedded PodTemplateSpecs are the full Kubernetes schema in the CRD, closed as well.
    ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"].update(hostNetwrok=True),
     "Additional properties"),
    ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
     .update(ports=[{"containerPort": 8080, "name": "a"}, {"containerPort": 8080, "name": "b"}]), "duplicate entries"),
])  # fmt: skip
def test_crd_schemas_refuse_what_the_api_refuses(kind: str, mutate: Any, message: str) -> None:
    """The converted schemas bite: each breaks one rule of the upstream CRD in an object the chart renders."""
    obj = copy.deepcopy(only(render(SCENARIOS["multinode-pool-hpa"]), kind))
    crd_validate(obj)
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError, match=message):
        crd_validate(obj)


def test_crd_defaults_satisfy_required_fields() -> None:
    """The server defaults before it validates: a required field with a default may be left out."""
    obj = copy.deepcopy(only(render(SCENARIOS["multinode-pool-hpa"]), "LeaderWorkerSet"))
    obj["spec"]["rolloutStrategy"].pop("type")  # required, default RollingUpdate
    crd_validate(obj)


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].pop("port"), "port is required when kind is 'Service'"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(group="", kind="Service"),
     "Must have port for Service reference"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["matches"][0]["path"].update(value="/v1//chat"), "absolute path"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["matches"][0]["path"].update(value="v1"), "absolute path"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["timeouts"].update(request="10s", backendRequest="1m"),
     "backendRequest timeout cannot be longer"),
    ("HTTPRoute", lambda o: o["spec"]["parentRefs"].append(dict(o["spec"]["parentRefs"][0], sectionName="https")),
     "sectionName must be specified"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0].update(filters=[]), "filters"),
    ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].update(size=0), "size must be equal or greater than 1"),
    ("LeaderWorkerSet", lambda o: o["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"].update(maxUnavailable=0),
     "must not be 0 when `maxSurge` is 0"),
    ("LeaderWorkerSet", lambda o: o["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"].update(maxSurge="150%"),
     "must not be greater than 100%"),
    ("LeaderWorkerSet", lambda o: o["metadata"].update(name="7b-serve"), "DNS-1035"),
])  # fmt: skip
def test_rules_past_the_schema_bite(kind: str, mutate: Any, message: str) -> None:
    """The CEL rules and the LWS webhook, checked by hand: each breaks one in an object the chart renders."""
    obj = copy.deepcopy(only(render(SCENARIOS["multinode-pool-hpa"]), kind))
    assert not api_rule_violations(obj)
    mutate(obj)
    crd_validate(obj)  # the schema alone lets it through
    assert any(message in v for v in api_rule_violations(obj)), api_rule_violations(obj)


# ---------------------------------------------------------------------------------------------- every scenario
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    for obj in objects:
        validate_scaleout(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


@pytest.mark.parametrize("scenario", ["pool-route", "multinode-pool-hpa", "multinode-everything"])
def test_lint_passes(scenario: str) -> None:
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not findings, report


@pytest.mark.parametrize(("scenario", "present", "absent"), [
    ("pool", {"InferencePool", "Deployment", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"},
     {"HTTPRoute", "LeaderWorkerSet"}),
    ("pool-route", {"InferencePool", "HTTPRoute"}, {"LeaderWorkerSet"}),
    ("pool-external-picker", {"InferencePool"}, {"Role", "ClusterRole"}),
    ("multinode", {"LeaderWorkerSet"}, {"Deployment", "InferencePool"}),  # no picker either
    ("multinode-pool-hpa", {"LeaderWorkerSet", "InferencePool", "HTTPRoute", "HorizontalPodAutoscaler"}, set()),
])  # fmt: skip
def test_toggles(scenario: str, present: set[str], absent: set[str]) -> None:
    found = kinds(render(SCENARIOS[scenario]))
    assert present <= found and not (absent & found)
    assert not {"InferencePool", "HTTPRoute", "LeaderWorkerSet", "Role"} & kinds(render()), "all off by default"


def test_values_defaults_and_comments() -> None:
    values = _chart().values
    assert values["inferencePool"]["enabled"] is False and values["multinode"]["enabled"] is False
    assert values["multinode"]["nodes"] == 2
    assert values["inferencePool"]["picker"]["metricsPath"] == "/metrics/engine"
    assert values["inferencePool"]["picker"]["metricsPort"] is None  # gateway.metricsPort
    assert values["inferencePool"]["picker"]["refreshInterval"] == "50ms"
    # Every leaf value of the two sections carries a `# --` comment (maps whose keys are data do not).
    lines = (CHART / "values.yaml").read_text().splitlines()
    data_maps = ("config:", "metricFlags:", "resources:", "timeouts:")
    inside: int | None = None  # indentation of a data map being skipped
    section = False
    for i, line in enumerate(lines):
        if re.match(r"^\S", line):
            section = line in ("inferencePool:", "multinode:")
            continue
        key = re.match(r"^( +)([A-Za-z][\w-]*):(.*)$", line)
        if not section or not key:
            continue
        indent = len(key[1])
        if inside is not None and indent > inside:
            continue
        inside = None
        if key[3].strip() or key[2] + ":" in data_maps:
            assert lines[i - 1].strip().startswith("#"), f"values.yaml:{i + 1}: no comment above {line.strip()!r}"
            assert any(lines[j].strip().startswith("# --") for j in range(i - 1, max(i - 12, 0), -1)
                       if lines[j].strip().startswith("#")), f"values.yaml:{i + 1}: not `# --` style"
        if key[2] + ":" in data_maps:
            inside = indent


# ---------------------------------------------------------------------------------------------- InferencePool
def pool_pods_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Labels of the pods that serve: the Deployment's, or the LeaderWorkerSet's leaders."""
    if "LeaderWorkerSet" in kinds(objects):
        labels: dict[str, str] = only(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
        return {**labels, **LEADER}  # the LWS controller labels the leader worker-index 0
    labels = serving_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    return labels


def picker_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "Deployment", PICKER)


def picker_args(objects: list[dict[str, Any]]) -> dict[str, str]:
    args = picker_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    return dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "") for a in args)


@pytest.mark.parametrize("scenario", ["pool", "pool-route", "multinode-pool-hpa"])
def test_pool_selects_the_serving_pods_on_the_gateway_port(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    pool = only(objects, "InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]  # the gateway: auth and limits stay in the pod
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == {**SELECTOR, POOL_LABEL: pool["metadata"]["name"]}
    assert selector.items() <= pool_pods_labels(objects).items()
    pod = only(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"] if "multinode" in scenario else None
    if pod is not None:  # the workers run Ray only: never pool members
        assert POOL_LABEL not in pod["workerTemplate"]["metadata"]["labels"]
    picker_pod = picker_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= picker_pod.items()


def test_pool_label_only_when_the_pool_is_on() -> None:
    off = serving_deployment(render())["spec"]["template"]
    on = serving_deployment(render(SCENARIOS["pool"]))["spec"]["template"]
    assert POOL_LABEL not in off["metadata"]["labels"]
    assert on["metadata"]["labels"].pop(POOL_LABEL) == FULLNAME
    # The config changes too (the engine-scrape cache is capped at the picker's interval): new checksum.
    assert on["metadata"]["annotations"].pop("checksum/config") != off["metadata"]["annotations"].pop("checksum/config")
    assert on == off, "the pool changes nothing else in the pod template"


@pytest.mark.parametrize("scenario", ["pool", "pool-route", "pool-ha-picker", "multinode-pool-hpa"])
def test_pool_names_the_rendered_picker(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    values = merged(SCENARIOS[scenario])
    ref = only(objects, "InferencePool")["spec"]["endpointPickerRef"]
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == PICKER]
    assert ref["kind"] == "Service" and ref["name"] == PICKER
    assert ref["port"] == {"number": service["spec"]["ports"][0]["port"]} == {"number": 9002}
    assert "group" not in ref  # the core group, the CRD's default
    assert ref["failureMode"] == values["inferencePool"]["failureMode"]
    # The Service reaches the picker's gRPC port: selector = the picker pods' labels.
    deployment = picker_deployment(objects)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] == "grpc" and ports["grpc"] == 9002
    # The Services, PDB and NetworkPolicy of qwen-serve never select the picker.
    picker_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for obj in objects:
        if obj["metadata"]["name"].startswith(PICKER):
            continue
        spec = obj.get("spec", {})
        selector = spec.get("selector", {}) if obj["kind"] == "Service" else spec.get("selector", spec.get("podSelector", {})).get("matchLabels")
        if obj["kind"] in ("Service", "PodDisruptionBudget", "NetworkPolicy") and selector:
            assert not selector.items() <= picker_labels.items(), obj["metadata"]["name"]


def test_external_picker() -> None:
    objects = render(SCENARIOS["pool-external-picker"])
    assert only(objects, "InferencePool")["spec"]["endpointPickerRef"]["name"] == "llm-d-epp"
    assert not [o for o in objects if o["metadata"]["name"].startswith(PICKER)]
    with pytest.raises(helm.HelmRenderError, match="inferencePool.picker.serviceName: with inferencePool.picker.enabled false"):
        render({"inferencePool": {"enabled": True, "picker": {"enabled": False}}})


def test_picker_scrapes_the_engine_text_on_the_metrics_port() -> None:
    objects = render(SCENARIOS["pool"])
    args = picker_args(objects)
    assert args["pool-name"] == FULLNAME and args["pool-namespace"] == NAMESPACE
    assert args["pool-group"] == "inference.networking.k8s.io"
    assert args["model-server-metrics-path"] == "/metrics/engine"
    assert args["model-server-metrics-scheme"] == "http"
    # The port is the serving pod's metrics port (gateway.metricsPort), where /metrics/engine is served.
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert int(args["model-server-metrics-port"]) == ports["metrics"] == 9090
    assert rendered_config(objects)["gateway"]["metrics_port"] == 9090
    assert args["refresh-metrics-interval"] == "50ms"
    assert args["total-queued-requests-metric"] == "vllm:num_requests_waiting"
    assert args["kv-cache-usage-percentage-metric"] == "vllm:kv_cache_usage_perc"
    assert args["cache-info-metric"] == "vllm:cache_config_info"
    assert args["lora-info-metric"] == ""  # no adapters: off
    assert "ha-enable-leader-election" not in args
    (c,) = picker_deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.1"
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "inference-extension"}


@pytest.mark.parametrize(("values", "cache_s"), [
    ({}, 1), ({"inferencePool": {"enabled": True}}, 0.05),
    ({"inferencePool": {"enabled": True, "picker": {"refreshInterval": "2s"}}}, 1),
    ({"inferencePool": {"enabled": True, "picker": {"refreshInterval": "250ms"}}}, 0.25),
    ({"inferencePool": {"enabled": True}, "gateway": {"engineMetricsCacheSeconds": 0}}, 0),
])  # fmt: skip
def test_engine_scrape_cache_never_outlives_the_pickers_interval(values: dict[str, Any], cache_s: float) -> None:
    """The picker reads /metrics/engine every 50 ms; the gateway's shared engine scrape must be no older."""
    config = parse_config(rendered_config(render(values)))
    assert config.gateway.engine_metrics_cache_s == pytest.approx(cache_s)


def test_picker_scrape_path_and_port_are_values() -> None:
    objects = render(SCENARIOS["pool-ha-picker"])
    args = picker_args(objects)
    assert args["model-server-metrics-path"] == "/metrics"
    assert int(args["model-server-metrics-port"]) == 9191 == {p["name"]: p["containerPort"] for p in container(objects)["ports"]}["metrics"]
    assert args["total-running-requests-metric"] == "vllm:num_requests_running"
    assert "ha-enable-leader-election" in args and args["v"] == "2"
    spec = picker_deployment(objects)["spec"]
    assert spec["replicas"] == 2
    assert spec["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] == "readiness"
    assert spec["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    # metricsPort null follows gateway.metricsPort.
    args = picker_args(render({"inferencePool": {"enabled": True}, "gateway": {"metricsPort": 9400}}))
    assert args["model-server-metrics-port"] == "9400"


def test_picker_metric_names_are_what_the_engine_exports() -> None:
    """The names the picker reads (and vllm:num_requests_running, which newer pickers read) are in the pinned
    engine's recorded scrape (deploy/grafana/engine-metrics.txt, which the observability integration test
    checks against the live engine)."""
    recorded = {line.strip() for line in (ROOT / "deploy" / "grafana" / "engine-metrics.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    names = [m for m in _chart().values["inferencePool"]["picker"]["metricFlags"].values() if m]
    for name in [*names, "vllm:num_requests_running"]:
        assert name in recorded, name


def test_picker_rbac_and_config() -> None:
    objects = render(SCENARIOS["pool"])
    role = next(o for o in objects if o["kind"] == "Role")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for needed in (("inference.networking.k8s.io", "inferencepools"), ("", "pods"),
                   ("inference.networking.x-k8s.io", "inferenceobjectives")):
        assert granted[needed] >= {"get", "list", "watch"}, needed
    assert all(verbs <= {"get", "list", "watch"} for verbs in granted.values()), "read-only"
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    pod = picker_deployment(objects)["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}]
    cluster_role = only(objects, "ClusterRole")
    assert {(r["apiGroups"][0], r["resources"][0], tuple(r["verbs"])) for r in cluster_role["rules"]} == {
        ("authentication.k8s.io", "tokenreviews", ("create",)),
        ("authorization.k8s.io", "subjectaccessreviews", ("create",))}
    assert NAMESPACE in cluster_role["metadata"]["name"], "cluster-scoped: unique per namespace"
    # The scheduling config: every profile plugin is declared, and it is the file --config-file reads.
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == PICKER)
    config = yaml.safe_load(config_map["data"]["picker.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    assert declared == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"}
    assert {r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]} <= declared
    mount = pod["containers"][0]["volumeMounts"][0]
    assert Path(picker_args(objects)["config-file"]).parent == Path(mount["mountPath"])
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"] == PICKER
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_network_policy_lets_the_picker_scrape() -> None:
    objects = render(SCENARIOS["pool"])
    policy = only(objects, "NetworkPolicy")
    picker_labels = picker_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    rules = [r for r in policy["spec"]["ingress"] if any(
        p.get("podSelector", {}).get("matchLabels", {}).items() <= picker_labels.items() and p.get("podSelector")
        for p in r.get("from", []))]
    (rule,) = rules
    assert rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pool_pods_labels(objects).items()
    # Without the pool the rule is gone.
    plain = only(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert len(plain["spec"]["ingress"]) == 2


def test_http_route_sends_traffic_to_the_pool() -> None:
    objects = render(SCENARIOS["pool-route"])
    route = only(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"] == ROUTE["parentRefs"]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "qwen-pool"}]
    assert only(objects, "InferencePool")["metadata"]["name"] == "qwen-pool"
    assert rule["timeouts"] == {"request": "3600s"}
    # The CRD's CEL rules, by hand: no port needed for a non-Service backend; a prefix path is absolute.
    backend = rule["backendRefs"][0]
    assert not (backend.get("group", "") == "" and backend.get("kind", "Service") == "Service")
    assert rule["matches"][0]["path"]["value"].startswith("/")


@pytest.mark.parametrize(("values", "message"), [
    ({"inferencePool": {"httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]}}},
     "inferencePool.httpRoute.enabled: the HTTPRoute's backend is the InferencePool"),
    ({"inferencePool": {"enabled": True, "httpRoute": {"enabled": True}}},
     "inferencePool.httpRoute.parentRefs: name the Gateway"),
    ({"inferencePool": {"enabled": True, "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}],
                                                       "timeouts": {"request": "1h30m", "backendRequest": "5401s"}}}},
     "inferencePool.httpRoute.timeouts.backendRequest: 5401s is longer than timeouts.request 1h30m"),
])  # fmt: skip
def test_route_needs_a_pool_and_a_gateway(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(("request_timeout", "backend"), [("1h30m", "5400s"), ("1h30m", "89m59s999ms"), ("0s", "2h")])
def test_route_timeouts_the_api_accepts_render(request_timeout: str, backend: str) -> None:
    """A backend timeout up to the request timeout (or any, when the request timeout is 0s: none) renders,
    and the route passes the CRD schema and its rules."""
    route = {"enabled": True, "parentRefs": [{"name": "gw"}], "timeouts": {"request": request_timeout,
                                                                         "backendRequest": backend}}
    objects = render({"inferencePool": {"enabled": True, "httpRoute": route}})
    (rendered,) = [o for o in objects if o["kind"] == "HTTPRoute"]
    assert rendered["spec"]["rules"][0]["timeouts"] == route["timeouts"]
    validate_scaleout(rendered)


def test_notes_tell_how_to_attach_the_pool() -> None:
    notes = render_raw(SCENARIOS["pool"])["qwen-serve/templates/NOTES.txt"]
    assert f"InferencePool {FULLNAME}" in notes and "/metrics/engine on port 9090" in notes
    assert "kind: InferencePool" in notes  # how to write the HTTPRoute
    notes = render_raw(SCENARIOS["pool-route"])["qwen-serve/templates/NOTES.txt"]
    assert f"HTTPRoute {FULLNAME} sends / on inference-gateway to it" in notes


# ---------------------------------------------------------------------------------------------- LeaderWorkerSet
def lws(values: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = only(render(values), "LeaderWorkerSet")
    return found


def leader(values: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = lws(values)["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    return template


def worker(values: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = lws(values)["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return template


def test_leader_worker_set_shape() -> None:
    objects = render(SCENARIOS["multinode"])
    assert "Deployment" not in kinds(objects)
    spec = only(objects, "LeaderWorkerSet")["spec"]
    assert spec["replicas"] == 1
    assert spec["leaderWorkerTemplate"]["size"] == 3
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["startupPolicy"] == "LeaderCreated"
    assert spec["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 1, "maxSurge": 0}
    assert "replicas" not in lws(SCENARIOS["multinode-pool-hpa"])["spec"], "the HPA owns replicas"


def test_leader_runs_the_ray_head_then_qwen_serve_up() -> None:
    (c,) = leader(SCENARIOS["multinode"])["spec"]["containers"]
    assert c["command"] == ["/bin/sh", "-c"]
    script = c["args"][0]
    assert "ray start --head --port=6379 --node-ip-address=\"$VLLM_HOST_IP\"" in script
    assert script.rstrip().endswith(f"exec qwen-serve up --config {CONFIG_PATH}")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090, "ray": 6379}


def test_workers_join_the_leaders_ray_cluster() -> None:
    (c,) = worker(SCENARIOS["multinode"])["spec"]["containers"]
    assert c["command"][:3] == ["ray", "start", "--address=$(LWS_LEADER_ADDRESS):6379"]
    assert c["command"][-1] == "--block"
    assert "--node-ip-address=$(VLLM_HOST_IP)" in c["command"]
    assert "startupProbe" not in c and "ports" not in c
    (c,) = worker(SCENARIOS["multinode-everything"])["spec"]["containers"]
    assert "--address=$(LWS_LEADER_ADDRESS):6380" in c["command"]


@pytest.mark.parametrize("scenario", ["multinode", "multinode-everything"])
def test_every_group_pod_has_gpus_shm_and_the_network_settings(scenario: str) -> None:
    values = merged(SCENARIOS[scenario])
    for template in (leader(SCENARIOS[scenario]), worker(SCENARIOS[scenario])):
        (c,) = template["spec"]["containers"]
        env = env_of(c)
        assert env["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == values["multinode"]["socketInterface"]
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/models/huggingface"  # each stage loads offline
        assert c["resources"]["limits"]["nvidia.com/gpu"] == values["engine"]["gpus"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        dshm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": values["shm"]["sizeLimit"]}
        (init,) = template["spec"]["initContainers"]
        assert init["name"] == "model-download"


def test_leader_matches_the_single_node_pod() -> None:
    """The leader is the Deployment's pod plus Ray: same image, env (plus Ray/NCCL), probes, mounts, init
    container, resources and pod-level settings, so a value never reaches one and not the other."""
    multi = SCENARIOS["multinode-everything"]
    single = {k: v for k, v in multi.items() if k != "multinode"}
    deployment_pod = serving_deployment(render(single))["spec"]["template"]
    leader_pod = leader(multi)
    dep_c, (lead_c,) = container(render(single)), leader_pod["spec"]["containers"]
    extra = {"VLLM_HOST_IP", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}
    assert {k: v for k, v in env_of(lead_c).items() if k not in extra} == env_of(dep_c)
    for key in ("image", "imagePullPolicy", "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe",
                "lifecycle", "resources", "securityContext"):
        assert lead_c[key] == dep_c[key], key
    assert [p for p in lead_c["ports"] if p["name"] != "ray"] == dep_c["ports"]
    assert leader_pod["spec"]["initContainers"] == deployment_pod["spec"]["initContainers"]
    assert leader_pod["spec"]["volumes"] == deployment_pod["spec"]["volumes"]
    pod_keys = set(deployment_pod["spec"]) - {"containers", "initContainers", "volumes"}
    assert {k: leader_pod["spec"][k] for k in pod_keys} == {k: deployment_pod["spec"][k] for k in pod_keys}
    assert leader_pod["metadata"]["annotations"] == deployment_pod["metadata"]["annotations"] | {
        "checksum/config": leader_pod["metadata"]["annotations"]["checksum/config"]}
    assert leader_pod["metadata"]["labels"] == deployment_pod["metadata"]["labels"]
    worker_pod = worker(multi)
    assert {k: worker_pod["spec"][k] for k in pod_keys} == {k: deployment_pod["spec"][k] for k in pod_keys}
    assert worker_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "inference-worker"


def test_config_plans_the_multinode_launch() -> None:
    objects = render(SCENARIOS["multinode"])
    data = rendered_config(objects)
    assert data["engine"]["nodes"] == 3 and data["engine"]["gpus"] == 4
    plan = build_plan(parse_config(data), gpu_visible=True)
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.data_parallel_size) == (4, 3, 1)
    args = plan.vllm_args
    assert args[args.index("--pipeline-parallel-size") + 1] == "3"
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert not [w for w in plan.warnings if w.startswith("engine.nodes")], "3 is what 72B at 128K on 24 GiB needs"
    # The leader's script waits for exactly that many Ray nodes before starting vLLM.
    script = leader(SCENARIOS["multinode"])["spec"]["containers"][0]["args"][0]
    assert re.search(r"^python3 - 3 <<'WAIT'$", script, re.M)
    assert "nodes" not in rendered_config(render())["engine"], "single node: the config does not change"


def test_services_select_the_leaders() -> None:
    objects = render(SCENARIOS["multinode-pool-hpa"])
    leader_labels = pool_pods_labels(objects)
    for service in (o for o in objects if o["kind"] == "Service" and not o["metadata"]["name"].startswith(PICKER)):
        assert service["spec"]["selector"] == {**SELECTOR, **LEADER}, service["metadata"]["name"]
        assert service["spec"]["selector"].items() <= leader_labels.items()
    worker_labels = {**worker(SCENARIOS["multinode-pool-hpa"])["metadata"]["labels"],
                     "leaderworkerset.sigs.k8s.io/worker-index": "1"}
    for service in (o for o in objects if o["kind"] == "Service" and not o["metadata"]["name"].startswith(PICKER)):
        assert not service["spec"]["selector"].items() <= worker_labels.items()


def test_autoscalers_scale_the_leader_worker_set() -> None:
    for scenario, kind in (("multinode-pool-hpa", "HorizontalPodAutoscaler"), ("multinode-keda-no-cache", "ScaledObject")):
        target = only(render(SCENARIOS[scenario]), kind)["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": FULLNAME}
    crd = yaml.safe_load((CRDS / "leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text())
    assert crd["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_network_policy_opens_the_group_to_itself() -> None:
    policy = only(render(SCENARIOS["multinode-pool-hpa"]), "NetworkPolicy")
    (rule,) = [r for r in policy["spec"]["ingress"] if "ports" not in r]
    assert rule["from"] == [{"podSelector": {"matchLabels": SELECTOR}}], "Ray and NCCL use ports of their own"


@pytest.mark.parametrize(("values", "message"), [
    ({"multinode": {"enabled": True}},
     "multinode.enabled with a model cache of access modes ReadWriteOnce: the 2 pods of a group run on 2 nodes"),
    ({**RWX, "multinode": {"enabled": True}, "engine": {"dataParallelSize": 2}},
     "engine.dataParallelSize=2 with multinode.enabled"),
    ({**RWX, "extraConfig": {"engine": {"nodes": 2}}}, "extraConfig.engine.nodes: set multinode.enabled"),
])  # fmt: skip
def test_multinode_refusals(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(("values", "where"), [
    ({"multinode": {"enabled": True, "nodes": 1}, **RWX}, "/multinode/nodes"),
    ({"multinode": {"enabled": True, "size": 2}, **RWX}, "/multinode"),
    ({"inferencePool": {"failureMode": "Sometimes"}}, "/inferencePool/failureMode"),
    ({"inferencePool": {"httpRoute": {"timeouts": {"request": "forever"}}}}, "/inferencePool/httpRoute/timeouts/request"),
    ({"inferencePool": {"picker": {"metricsPath": "metrics"}}}, "/inferencePool/picker/metricsPath"),
    # Paths the HTTPRoute CRD's rules refuse at install time are refused by the values schema first.
    *[({"inferencePool": {"httpRoute": {"path": path}}}, "/inferencePool/httpRoute/path")
      for path in ("v1", "/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a%2Fb", "/a/.", "/a/..", "/a#b", "/a b")],
])  # fmt: skip
def test_schema_refuses_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"at '{where}'"):
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def test_notes_for_multinode() -> None:
    notes = render_raw(SCENARIOS["multinode"])["qwen-serve/templates/NOTES.txt"]
    assert f"wait --for=condition=Available lws/{FULLNAME}" in notes
    assert "rollout status deploy/" not in notes
    assert "groups of 3 pods × 4 GPUs" in notes


def test_leader_script_waits_for_every_worker(tmp_path: Path) -> None:
    """Run the leader's script with stand-ins for `ray` (CLI and module) and `qwen-serve`: it starts the Ray
    head on the pod IP, waits until all nodes have joined, then execs `qwen-serve up`."""
    script = leader(SCENARIOS["multinode"])["spec"]["containers"][0]["args"][0]
    bin_dir, lib_dir, log = tmp_path / "bin", tmp_path / "lib", tmp_path / "log"
    bin_dir.mkdir()
    (lib_dir / "ray").mkdir(parents=True)
    for name in ("ray", "qwen-serve"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    # Nodes join one per ray.nodes() call: 1, 2, 3 alive. sleep is recorded, not slept.
    (lib_dir / "ray" / "__init__.py").write_text(
        "import time\n"
        f"_log = {str(log)!r}\n"
        "_calls = []\n"
        "time.sleep = lambda s: open(_log, 'a').write(f'sleep {s}\\n')\n"
        "def init(address=None, logging_level=None):\n"
        "    open(_log, 'a').write(f'init {address}\\n')\n"
        "def nodes():\n"
        "    _calls.append(1)\n"
        "    return [{'Alive': True}] * len(_calls) + [{'Alive': False}]\n")
    python_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "PYTHONPATH": str(lib_dir), "VLLM_HOST_IP": "10.1.2.3",
           "HOME": str(tmp_path)}
    (bin_dir / "python3").symlink_to(sys.executable)
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "ray start --head --port=6379 --node-ip-address=10.1.2.3 --include-dashboard=false --disable-usage-stats"
    assert lines[1:] == ["init auto", "sleep 5", "sleep 5", f"qwen-serve up --config {CONFIG_PATH}"]
    assert "waiting for the Ray workers: 1 of 3 nodes" in proc.stdout and "all 3 Ray nodes joined" in proc.stdout


# ---------------------------------------------------------------------------------------------- shared rate limits
REDIS = f"{FULLNAME}-redis"
REDIS_SELECTOR = {"app.kubernetes.io/name": "qwen-serve-redis", "app.kubernetes.io/instance": RELEASE}
BUNDLED_URL = f"redis://{REDIS}:6379/0"
SECRET_URL = "rediss://qwen-serve:s3cr3t-pa55@redis.infra.example:6380/2"
REDIS_BACKEND = {"backend": "redis"}
LIMITS_SCENARIOS: dict[str, dict[str, Any]] = {
    "bundled": {"limits": REDIS_BACKEND, "redis": {"enabled": True}, "networkPolicy": {"enabled": True},
                "replicaCount": 2, **RWX},
    "url": {"limits": {**REDIS_BACKEND, "redisUrl": "rediss://redis.infra.example:6380/1", "onBackendError": "fail_open"},
            "autoscaling": {"enabled": True, "maxReplicas": 3}, **RWX},
    "secret": {"limits": {**REDIS_BACKEND, "existingSecret": "qwen-serve-redis"}, "replicaCount": 2, **RWX},
    "secret-key": {"limits": {**REDIS_BACKEND, "existingSecret": "redis-creds", "existingSecretKey": "url"},
                   "modelCache": {"predownload": False}},
    "secret-multinode": {**MULTINODE_72B, "limits": {**REDIS_BACKEND, "existingSecret": "qwen-serve-redis"},
                         "networkPolicy": {"enabled": True}, "hfToken": {"existingSecret": "hf"}},
    "bundled-multinode-pool": {**MULTINODE_72B, "limits": REDIS_BACKEND, "inferencePool": {"enabled": True},
                               "redis": {"enabled": True, "nodeSelector": {"pool": "cpu"}},
                               "networkPolicy": {"enabled": True}, "commonLabels": {"team": "ml"}},
    "local-with-redis": {"redis": {"enabled": True}, "replicaCount": 2, **RWX},
}


def notes(values: dict[str, Any]) -> str:
    return render_raw(values)["qwen-serve/templates/NOTES.txt"]


def gateway_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod template that runs the gateway: the Deployment's, or the LeaderWorkerSet's leader."""
    if "LeaderWorkerSet" in kinds(objects):
        found: dict[str, Any] = only(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        return found
    found = serving_deployment(objects)["spec"]["template"]
    return found


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = gateway_pod(objects)["spec"]["containers"][0]
    return found


def redis_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "Deployment", REDIS)


def run_limits_config(tmp_path: Path, objects: list[dict[str, Any]], url: str | None
                      ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the limits-config init container's script for real (this venv's python, the ConfigMap's files,
    ``url`` as the Secret's value) and return the process and the file the gateway would read."""
    (init,) = [c for c in gateway_pod(objects)["spec"]["initContainers"] if c["name"] == "limits-config"]
    assert init["command"][:2] == ["python3", "-c"]
    data = only(objects, "ConfigMap")["data"]
    source, rendered = tmp_path / "source", tmp_path / "rendered"
    source.mkdir()
    rendered.mkdir()
    for key, text in data.items():
        (source / key).write_text(text)
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    args = [a.replace(mounts["config"], str(source)).replace(mounts["config-rendered"], str(rendered))
            for a in init["args"]]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    if url is not None:
        env["QWEN_SERVE_REDIS_URL"] = url
    proc = subprocess.run([sys.executable, "-c", init["command"][2], *args], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, rendered / "config.yaml"


@pytest.mark.parametrize("scenario", sorted(LIMITS_SCENARIOS))
def test_limits_objects_validate(scenario: str) -> None:
    objects = render(LIMITS_SCENARIOS[scenario])
    for obj in objects:
        validate_scaleout(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


@pytest.mark.parametrize("scenario", ["bundled", "secret-multinode"])
def test_limits_lint_passes(scenario: str) -> None:
    report = helm.lint(CHART, LIMITS_SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not findings, report


def test_limits_defaults_leave_the_release_as_it_was() -> None:
    """backend local by default; the config has no limits section (the key's own default is local), so an
    upgrade to this chart does not change the pod template, and nothing Redis is rendered."""
    values = _chart().values
    assert values["limits"] == {"backend": "local", "redisUrl": "", "existingSecret": "",
                                "existingSecretKey": "redis-url", "onBackendError": "fail_closed"}
    assert values["redis"]["enabled"] is False
    objects = render()
    assert "limits" not in rendered_config(objects)
    assert parse_config(rendered_config(objects)).limits.backend == "local"
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    assert [c["name"] for c in gateway_pod(objects)["spec"]["initContainers"]] == ["model-download"]
    for dotted in ("limits.backend", "limits.redisUrl"):  # the documented top-level keys
        node: Any = values
        for part in dotted.split("."):
            node = node[part]


@pytest.mark.parametrize(("scenario", "expected"), [
    ("bundled", {"backend": "redis", "redis_url": BUNDLED_URL, "on_backend_error": "fail_closed"}),
    ("bundled-multinode-pool", {"backend": "redis", "redis_url": BUNDLED_URL, "on_backend_error": "fail_closed"}),
    ("url", {"backend": "redis", "redis_url": "rediss://redis.infra.example:6380/1", "on_backend_error": "fail_open"}),
])  # fmt: skip
def test_a_url_without_a_password_goes_into_the_config(scenario: str, expected: dict[str, Any]) -> None:
    objects = render(LIMITS_SCENARIOS[scenario])
    data = rendered_config(objects)
    assert data["limits"] == expected
    config = parse_config(data)
    assert (config.limits.backend, config.limits.redis_url, config.limits.on_backend_error) == (
        expected["backend"], expected["redis_url"], expected["on_backend_error"])
    c = gateway_container(objects)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    assert mount["name"] == "config" and mount["subPath"] == "config.yaml"
    assert "limits-config" not in [i["name"] for i in gateway_pod(objects)["spec"].get("initContainers", [])]


@pytest.mark.parametrize("scenario", ["secret", "secret-key", "secret-multinode"])
def test_a_url_from_a_secret_reaches_only_the_gateways_config(scenario: str, tmp_path: Path) -> None:
    """The ConfigMap never holds the URL; the init container adds it at pod start, into a memory emptyDir
    the gateway's container mounts at the usual path; the result loads with qwen-serve's own loader."""
    values = merged(LIMITS_SCENARIOS[scenario])
    objects = render(LIMITS_SCENARIOS[scenario])
    cm = only(objects, "ConfigMap")
    assert "limits" not in rendered_config(objects), "config.yaml stays complete without the URL"
    assert yaml.safe_load(cm["data"]["limits.yaml"]) == {"backend": "redis", "on_backend_error": "fail_closed"}
    assert not any("redis://" in text or "rediss://" in text for text in cm["data"].values())

    pod = gateway_pod(objects)["spec"]
    inits = [c["name"] for c in pod["initContainers"]]
    assert inits[0] == "limits-config", "a bad Secret fails before a long download"
    assert ("model-download" in inits) == values["modelCache"]["predownload"]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "limits-config"]
    assert env_of(init)["QWEN_SERVE_REDIS_URL"] == {"secretKeyRef": {
        "name": values["limits"]["existingSecret"], "key": values["limits"]["existingSecretKey"]}}
    assert init["securityContext"] == values["securityContext"]
    rendered = next(v for v in pod["volumes"] if v["name"] == "config-rendered")
    assert rendered["emptyDir"]["medium"] == "Memory"
    c = gateway_container(objects)
    assert "QWEN_SERVE_REDIS_URL" not in env_of(c), "the engine's processes never see the URL"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    assert mount == {"name": "config-rendered", "mountPath": CONFIG_PATH, "subPath": "config.yaml", "readOnly": True}
    for other in pod["initContainers"]:
        if other["name"] == "model-download":  # reads the model from the ConfigMap's (complete) config
            assert next(m for m in other["volumeMounts"] if m["mountPath"] == CONFIG_PATH)["name"] == "config"

    proc, written = run_limits_config(tmp_path, objects, SECRET_URL + "\n")  # `echo` adds a newline
    assert proc.returncode == 0, proc.stderr
    assert SECRET_URL not in proc.stdout + proc.stderr
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    data = yaml.safe_load(written.read_text())
    config = parse_config(data)
    assert (config.limits.backend, config.limits.redis_url, config.limits.on_backend_error) == (
        "redis", SECRET_URL, "fail_closed")
    assert {k: v for k, v in data.items() if k != "limits"} == rendered_config(objects)
    if "LeaderWorkerSet" in kinds(objects):
        assert config.engine.nodes == values["multinode"]["nodes"]
        build_plan(config, gpu_visible=True)


def test_workers_of_a_group_never_get_the_url() -> None:
    objects = render(LIMITS_SCENARIOS["secret-multinode"])
    spec = only(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["model-download"]
    assert "config-rendered" not in [v["name"] for v in spec["volumes"]]
    assert "QWEN_SERVE_REDIS_URL" not in yaml.safe_dump(spec)


@pytest.mark.parametrize(("url", "needle"), [
    ("http://qwen:hunter2@redis:6379", "limits.existingSecret: limits.redis_url: must be a redis://, rediss:// or unix://"),
    ("", "limits.redis_url: the Secret's key is empty"),
    ("  \n", "limits.redis_url: the Secret's key is empty"),
    (None, "limits.redis_url: the Secret's key is empty"),
])  # fmt: skip
def test_a_bad_secret_stops_the_pod_in_the_init_container(tmp_path: Path, url: str | None, needle: str) -> None:
    proc, written = run_limits_config(tmp_path, render(LIMITS_SCENARIOS["secret"]), url)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr, "the URL may hold a password: never logged"
    assert not written.exists() or url, "nothing written without a URL"


def test_secret_limits_changes_roll_the_pods() -> None:
    """checksum/config covers the limits section the init container adds and the Secret it reads."""
    def checksum(values: dict[str, Any]) -> str:
        found: str = gateway_pod(render(values))["metadata"]["annotations"]["checksum/config"]
        return found

    base = LIMITS_SCENARIOS["secret"]
    sums = {checksum(base),
            checksum({**base, "limits": {**base["limits"], "onBackendError": "fail_open"}}),
            checksum({**base, "limits": {**base["limits"], "existingSecretKey": "other"}}),
            checksum({**base, "limits": {**base["limits"], "existingSecret": "other"}})}
    assert len(sums) == 4
    assert checksum({**RWX, "replicaCount": 2}) != checksum(LIMITS_SCENARIOS["url"])


def test_bundled_redis() -> None:
    objects = render(LIMITS_SCENARIOS["bundled"])
    deployment = redis_deployment(objects)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"] == REDIS_SELECTOR
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    repository, tag = c["image"].rsplit(":", 1)
    assert repository == "docker.io/library/redis" and re.match(r"^7\.4", tag), "a pinned official image"
    assert c["command"] == ["redis-server"]
    args = c["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no", "no persistence"
    assert args[args.index("--maxmemory") + 1] == "192mb"
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in yaml.safe_dump(pod) and "tolerations" not in pod, "no GPU node needed"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data"}

    service = named(objects, "Service", REDIS)
    assert service["spec"]["selector"] == REDIS_SELECTOR
    assert service["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    assert c["ports"] == [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}]
    # The config's URL names that Service.
    assert rendered_config(objects)["limits"]["redis_url"] == f"redis://{service['metadata']['name']}:6379/0"
    # The chart's own selectors (traffic Service, PDB, gateway NetworkPolicy) never pick the Redis pod.
    redis_labels = spec["template"]["metadata"]["labels"]
    checked = set()
    for obj in objects:
        spec_of = obj.get("spec") or {}
        selector = spec_of.get("selector") or spec_of.get("podSelector") or {}
        selector = selector.get("matchLabels", selector)
        if obj["metadata"]["name"] == REDIS or not selector:
            continue
        checked.add(obj["kind"])
        assert not all(redis_labels.get(k) == v for k, v in selector.items()), obj["kind"]
    assert {"Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"} <= checked
    # Any value of redis.* reaches the pod.
    digest = "7.4.2-alpine@sha256:" + "0" * 64
    custom = render({**LIMITS_SCENARIOS["bundled"], "redis": {"enabled": True, "maxMemory": "64mb",
                     "image": {"tag": digest}, "tolerations": [{"key": "x", "operator": "Exists"}]}})
    for obj in custom:
        validate_scaleout(obj)
    pod = redis_deployment(custom)["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == f"docker.io/library/redis:{digest}"
    assert redis_deployment(custom)["metadata"]["labels"]["app.kubernetes.io/version"] == "7.4.2-alpine"
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"}]
    assert "64mb" in pod["containers"][0]["args"]


@pytest.mark.parametrize(("scenario", "gateway_selector"), [
    ("bundled", SELECTOR),
    ("bundled-multinode-pool", {**SELECTOR, **LEADER}),  # only the leaders run a gateway
])  # fmt: skip
def test_network_policy_admits_only_the_gateways_to_redis(scenario: str, gateway_selector: dict[str, str]) -> None:
    objects = render(LIMITS_SCENARIOS[scenario])
    policy = named(objects, "NetworkPolicy", REDIS)["spec"]
    assert policy["podSelector"] == {"matchLabels": REDIS_SELECTOR}
    assert policy["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy, "Redis needs no egress"
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert rule["from"] == [{"podSelector": {"matchLabels": gateway_selector}}]
    gateway_labels = {**gateway_pod(objects)["metadata"]["labels"]}
    if "LeaderWorkerSet" in kinds(objects):
        gateway_labels |= LEADER  # set by the LWS controller
    assert all(gateway_labels.get(k) == v for k, v in gateway_selector.items())
    # The gateways' own policy leaves egress open, so they can connect.
    gateway_policy = named(objects, "NetworkPolicy", FULLNAME)["spec"]
    assert "Egress" not in gateway_policy["policyTypes"]
    # Without networkPolicy.enabled there is no policy at all.
    off = render({**LIMITS_SCENARIOS[scenario], "networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(off)


def test_local_backend_ignores_the_redis_values() -> None:
    """A quick fallback (`--set limits.backend=local` on a release that has Redis values) renders: the config
    has no limits section, the NOTES say the Redis values are unused."""
    objects = render({**LIMITS_SCENARIOS["url"], "limits": {"backend": "local", "redisUrl": "redis://r:6379/0"}})
    assert "limits" not in rendered_config(objects)
    objects = render(LIMITS_SCENARIOS["local-with-redis"])
    assert "limits" not in rendered_config(objects)
    assert redis_deployment(objects)
    text = notes(LIMITS_SCENARIOS["local-with-redis"])
    assert "limits.backend is local, so the gateways use no Redis (the Redis of redis.enabled runs unused)" in text


@pytest.mark.parametrize(("values", "replicas"), [
    ({"replicaCount": 2, **RWX}, "runs 2 replicas"),
    ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}, **RWX}, "runs up to 4 replicas (autoscaling)"),
    ({**MULTINODE_72B, "replicaCount": 3}, "runs 3 replicas"),
])  # fmt: skip
def test_notes_warn_that_local_limits_apply_per_replica(values: dict[str, Any], replicas: str) -> None:
    text = notes(values)
    assert f"WARNING: limits.backend is local and this release {replicas}" in text
    assert "limits apply per replica" in text and "limits.backend=redis" in text
    assert "limits apply per replica" not in notes({}), "one replica: nothing to warn about"
    for scenario in ("bundled", "url", "secret"):
        assert "limits apply per replica" not in notes(LIMITS_SCENARIOS[scenario])


@pytest.mark.parametrize(("scenario", "says"), [
    ("bundled", [f"the chart's own\nDeployment and Service {REDIS}", "only this release's gateway pods may connect",
                 "answer 503 (limits.onBackendError=fail_closed)"]),
    ("url", ["through Redis at\nrediss://redis.infra.example:6380/1", "admit requests unmetered"]),
    ("secret", ["Secret qwen-serve-redis (key \"redis-url\")", f"rollout restart deploy/{FULLNAME}"]),
    ("secret-multinode", [f"rollout restart lws/{FULLNAME}"]),
])  # fmt: skip
def test_notes_say_where_the_limits_are_shared(scenario: str, says: list[str]) -> None:
    text = notes(LIMITS_SCENARIOS[scenario])
    assert "shared by every replica through Redis" in text
    for phrase in says:
        assert phrase in text, phrase
    open_redis = notes({**LIMITS_SCENARIOS["bundled"], "networkPolicy": {"enabled": False}})
    assert "set networkPolicy.enabled=true" in open_redis


@pytest.mark.parametrize(("values", "message"), [
    ({"limits": REDIS_BACKEND}, "limits.backend=redis needs a Redis: set limits.existingSecret"),
    ({"limits": {**REDIS_BACKEND, "existingSecret": "s", "redisUrl": "redis://r:6379"}},
     "limits.existingSecret and limits.redisUrl each name the Redis to use; set only one"),
    ({"limits": {**REDIS_BACKEND, "redisUrl": "redis://r:6379"}, "redis": {"enabled": True}},
     "limits.redisUrl and redis.enabled each name the Redis"),
    ({"limits": {**REDIS_BACKEND, "redisUrl": "redis://:hunter2@r:6379/0"}}, "limits.redisUrl holds a password"),
    ({"limits": {**REDIS_BACKEND, "redisUrl": "rediss://qwen:hunter2@r:6379/0"}}, "limits.redisUrl holds a password"),
    ({"limits": {**REDIS_BACKEND, "redisUrl": "redis://r:6379/0?password=hunter2"}}, "limits.redisUrl holds a password"),
    ({"limits": {"redisUrl": "unix://u:hunter2@/run/redis.sock"}}, "limits.redisUrl holds a password"),
    ({"extraConfig": {"limits": {"backend": "redis", "redis_url": "redis://r:6379"}}},
     "extraConfig.limits: set limits.backend, limits.redisUrl (or limits.existingSecret)"),
])  # fmt: skip
def test_render_refuses_a_redis_backend_it_cannot_wire(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)) as exc:
        render(values)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(("values", "where"), [
    ({"limits": {"backend": "memcached"}}, "/limits/backend"),
    ({"limits": {"redisUrl": "http://redis:6379"}}, "/limits/redisUrl"),
    ({"limits": {"onBackendError": "retry"}}, "/limits/onBackendError"),
    ({"limits": {"existingSecretKey": ""}}, "/limits/existingSecretKey"),
    ({"limits": {"redis_url": "redis://r"}}, "/limits"),
    ({"redis": {"enabled": "yes"}}, "/redis/enabled"),
    ({"redis": {"maxMemory": "lots"}}, "/redis/maxMemory"),
])  # fmt: skip
def test_schema_refuses_bad_limits_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"at '{where}'"):
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)

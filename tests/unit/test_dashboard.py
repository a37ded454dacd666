"""Lint for the observability files: the Grafana dashboards (every ``helm/qwen-serve/files/dashboards/*.json``),
the Prometheus rules, the local compose profile and its provisioning.

Every metric name used by a PromQL expression must be a gateway metric (read from
:class:`qwen_serve.gateway.metrics.GatewayMetrics`, never copied here), a ``vllm:*`` name listed in
``deploy/grafana/engine-metrics.txt`` (taken from a real engine scrape; the integration test
``tests/integration/test_observability.py`` proves that list against the live engine), or a recording
rule of ``helm/qwen-serve/files/prometheus/rules.yaml``. Dashboards may also use the load generator's ``qwen_bench_*``
metrics (read from :class:`qwen_serve.bench.exporter.BenchExporter`); rules may not. These tests need no
engine; ``promtool`` (Debian package ``prometheus``) is required, and its absence fails the run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from qwen_serve.bench.exporter import BenchExporter
from qwen_serve.constants import DEFAULT_GATEWAY_PORT
from qwen_serve.gateway.metrics import GatewayMetrics, Labelled

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART_FILES = REPO / "helm" / "qwen-serve" / "files"
DASHBOARD = CHART_FILES / "dashboards" / "qwen-serve.json"
DASHBOARDS = sorted((CHART_FILES / "dashboards").glob("*.json"))
BENCH_DASHBOARD = CHART_FILES / "dashboards" / "qwen-serve-bench.json"
BENCH_PREFIX = "qwen_bench_"
DASHBOARD_README = DEPLOY / "grafana" / "README.md"
ENGINE_METRICS = DEPLOY / "grafana" / "engine-metrics.txt"
RULES = CHART_FILES / "prometheus" / "rules.yaml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROMTOOL_MISSING = "promtool not found: install the Debian package (apt-get install -y --no-install-recommends prometheus)"

# --------------------------------------------------------------------------------------------- helpers

_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*(?P<label>[a-zA-Z_]\w*)\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (a small lexer, enough for our expressions)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\boffset\s+-?\S+", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if m.group() in _KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue  # keyword, or a function call
        names.add(m.group())
    return names


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``(metric, {label: "op value"})`` for every metric selector in ``expr``."""
    for name in metric_names(expr):
        pattern = re.compile(rf"(?<![\w:.$]){re.escape(name)}\s*(\{{[^}}]*\}})?(?!\s*\()")
        for m in pattern.finditer(expr):
            matchers = {}
            for lm in re.finditer(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(1) or ""):
                matchers[lm.group(1)] = lm.group(2) + lm.group(3)
            yield name, matchers


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# Every dashboard JSON in deploy/grafana gets the same lint.
each_dashboard = pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` for every PromQL expression: panel targets and template-variable queries."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query)
            assert m, f"variable {var['name']}: expected label_values(<selector>, <label>), got {query!r}"
            yield f"variable {var['name']}", m.group("expr")


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recording_rules() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def gateway_collectors() -> dict[str, MetricWrapperBase]:
    found = (c.collector if isinstance(c, Labelled) else c for c in vars(GatewayMetrics()).values())
    return {c._name: c for c in found if isinstance(c, MetricWrapperBase)}


def _sample_names(registry: Any) -> dict[str, str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    names = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = family.name
    return names


def gateway_sample_names() -> dict[str, str]:
    """Every sample name the gateway registry can export → its family name."""
    return _sample_names(GatewayMetrics().registry)


def bench_exporter() -> BenchExporter:
    return BenchExporter("lint", serve=False)  # collectors only, no HTTP server


def bench_collectors() -> dict[str, MetricWrapperBase]:
    """The load generator's collectors (the exporter keeps ``run`` children; they carry the family's labels)."""
    found = (c for c in vars(bench_exporter()).values() if isinstance(c, MetricWrapperBase))
    return {c._name: c for c in found}


def bench_sample_names() -> dict[str, str]:
    """Every sample name the load generator's exporter can export → its family name."""
    return _sample_names(bench_exporter().registry)


def engine_metric_names() -> set[str]:
    lines = [ln.strip() for ln in ENGINE_METRICS.read_text().splitlines()]
    return {ln for ln in lines if ln and not ln.startswith("#")}


def base_family(sample: str, families: dict[str, str]) -> str:
    return families.get(sample, sample)


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, PROMTOOL_MISSING
    return path


# ------------------------------------------------------------------------------------------- dashboard


@each_dashboard
def test_dashboard_is_importable_json(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert isinstance(dashboard, dict)
    assert "dashboard" not in dashboard, "no import wrapper: the file is the dashboard model itself"
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["templating"]["list"], list)
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None, "a fixed id collides on import"
    assert dashboard["uid"] and dashboard["title"]
    assert "__inputs" not in dashboard, "the datasource comes from the template variable, not an import input"


def test_dashboards_are_found_and_distinct() -> None:
    assert DASHBOARD in DASHBOARDS and BENCH_DASHBOARD in DASHBOARDS
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    titles = [load_dashboard(p)["title"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)) and len(titles) == len(set(titles)), "uid and title collide on import"


@each_dashboard
def test_panel_ids_are_unique(path: Path) -> None:
    ids = [panel["id"] for panel in all_panels(load_dashboard(path))]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    titles = [panel["title"] for panel in all_panels(load_dashboard(path))]
    assert len(titles) == len(set(titles)), "panel titles name panels in README.md and in test ids: keep them unique"


@each_dashboard
def test_panels_fit_the_grid(path: Path) -> None:
    for panel in all_panels(load_dashboard(path)):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, panel["title"]


@each_dashboard
def test_every_panel_and_target_uses_the_datasource_variable(path: Path) -> None:
    for panel in all_panels(load_dashboard(path)):
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']!r} has queries"
            continue
        assert panel.get("datasource") == DATASOURCE, f"panel {panel['title']!r}: {panel.get('datasource')}"
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r}: duplicate refIds"
        for target in targets:
            assert target.get("datasource") == DATASOURCE, f"panel {panel['title']!r} target {target['refId']}"
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target['refId']} is empty"


@each_dashboard
def test_template_variables(path: Path) -> None:
    dashboard = load_dashboard(path)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    names = {name for _, expr in dashboard_exprs(dashboard) for name in metric_names(expr)}
    required = {"datasource"}
    if any(not n.startswith(BENCH_PREFIX) for n in names):
        required |= {"namespace", "pod", "model"}  # server series
    if any(n.startswith(BENCH_PREFIX) for n in names):
        required |= {"run"}  # load-generator series
    assert set(variables) >= required
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in sorted(required - {"datasource"}):
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == DATASOURCE, name
        assert var["includeAll"] is True and var["allValue"] == ".*", f"{name}: 'All' must be the regex .*"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert _LABEL_VALUES.match(query), f"{name}: {query!r}"

    def label_of(name: str) -> str:
        return _LABEL_VALUES.match(variables[name]["query"]["query"]).group("label")

    if "model" in required:
        # The model variable holds engine model names (vLLM's model_name), used for both label spellings.
        assert label_of("model") == "model_name"
        assert label_of("pod") == "pod"
        assert label_of("namespace") == "namespace"
    if "run" in required:
        assert label_of("run") == "run"
        run_expr = _LABEL_VALUES.match(variables["run"]["query"]["query"]).group("expr")
        assert metric_names(run_expr) <= set(bench_sample_names()), run_expr


@each_dashboard
def test_every_referenced_variable_is_defined(path: Path) -> None:
    dashboard = load_dashboard(path)
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    for where, expr in dashboard_exprs(dashboard):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name.startswith("__") or name in defined, f"{where}: ${name} is not a variable"


@each_dashboard
def test_dashboard_selectors_filter_on_namespace_pod_and_model(path: Path) -> None:
    """vllm:* filter on model_name, gateway series with a ``model`` label on model, all on namespace/pod.

    The load generator's series (``qwen_bench_*``) come from a process outside the served pods: they
    filter on ``run`` instead, and only on labels the exporter sets.
    """
    labels = {name: set(c._labelnames) for name, c in gateway_collectors().items()}
    bench_labels = {name: set(c._labelnames) for name, c in bench_collectors().items()}
    families = gateway_sample_names()
    bench_families = bench_sample_names()
    rules = recording_rules()
    for where, expr in dashboard_exprs(load_dashboard(path)):
        if where.startswith("variable"):
            continue
        for name, matchers in selectors(expr):
            assert name not in rules, f"{where}: uses recording rule {name}; the dashboard must work without rules"
            if name.startswith(BENCH_PREFIX):
                assert matchers.get("run") == "=~$run", f"{where}: {name} lacks run=~\"$run\""
                family_labels = bench_labels[base_family(name, bench_families)]
                for label in set(matchers) - {"le"}:
                    assert label in family_labels, f"{where}: {name} has no label {label!r}"
                continue
            assert matchers.get("namespace") == '=~$namespace', f"{where}: {name} lacks namespace=~\"$namespace\""
            assert matchers.get("pod") == '=~$pod', f"{where}: {name} lacks pod=~\"$pod\""
            if name.startswith("vllm:"):
                assert matchers.get("model_name") == "=~$model", f"{where}: {name} lacks model_name=~\"$model\""
                assert "model" not in matchers, f"{where}: vLLM series have no `model` label"
            else:
                family_labels = labels[base_family(name, families)]
                if "model" in family_labels:
                    assert matchers.get("model") == "=~$model", f"{where}: {name} lacks model=~\"$model\""
                for label in set(matchers) - {"namespace", "pod", "le"}:
                    assert label in family_labels, f"{where}: {name} has no label {label!r}"


@each_dashboard
def test_rate_windows_use_rate_interval(path: Path) -> None:
    for where, expr in dashboard_exprs(load_dashboard(path)):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{where}: fixed window [{window}]"


# ------------------------------------------------------------------------------------------ metric names


def test_engine_metric_list_is_clean() -> None:
    lines = [ln.strip() for ln in ENGINE_METRICS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == sorted(set(lines)), "keep engine-metrics.txt sorted and unique"
    assert all(re.fullmatch(r"vllm:[a-zA-Z0-9_:]+", ln) for ln in lines)


def test_every_referenced_metric_is_known() -> None:
    gateway = set(gateway_sample_names())
    bench = set(bench_sample_names())
    engine = engine_metric_names()
    rules = recording_rules()
    assert not rules & engine, f"recording rules shadow engine metrics: {rules & engine}"
    assert not rules & gateway
    assert bench and all(n.startswith(BENCH_PREFIX) for n in bench)
    assert not bench & (gateway | engine | rules)
    server = gateway | engine | rules
    exprs = [(f"{p.name} {where}", expr, server | bench) for p in DASHBOARDS
             for where, expr in dashboard_exprs(load_dashboard(p))]
    # Rules and alerts are about the server; the load generator is scraped only while a run lasts.
    exprs += [(f"rule {r.get('record') or r.get('alert')}", r["expr"], server) for r in load_rules()]
    unknown = []
    for where, expr, known in exprs:
        for name in metric_names(expr):
            if name not in known:
                unknown.append(f"{where}: {name}")
    assert not unknown, "unknown metric names:\n" + "\n".join(unknown)


def test_bench_dashboard_uses_every_bench_metric() -> None:
    """Each family the load generator exports has a panel (an unused name is a name out of date)."""
    families = bench_sample_names()
    used = {families[n] for _, expr in dashboard_exprs(load_dashboard(BENCH_DASHBOARD))
            for n in metric_names(expr) if n in families}
    assert used == set(families.values()), f"not on {BENCH_DASHBOARD.name}: {set(families.values()) - used}"


def test_metric_name_lexer() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(qwen_serve_request_duration_seconds_bucket'
            '{namespace=~"$namespace", code=~"5.."}[$__rate_interval] offset 5m))) / on (pod) group_left '
            'vllm:num_requests_waiting > 1e3 and absent(qwen_serve_engine_up) or 14.4 * x:y:rate5m')
    assert metric_names(expr) == {"qwen_serve_request_duration_seconds_bucket", "vllm:num_requests_waiting",
                                  "qwen_serve_engine_up", "x:y:rate5m"}
    assert dict(selectors('rate(a_total{pod=~"$pod", model="m"}[1m])')) == {"a_total": {"pod": "=~$pod",
                                                                                      "model": "=m"}}


# ----------------------------------------------------------------------------------------------- rules


def test_rule_file_is_a_plain_groups_file() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}, "the Helm chart embeds `groups` as a PrometheusRule spec"
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names))
    for rule in load_rules():
        assert ("record" in rule) != ("alert" in rule), rule
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_required_alerts_exist() -> None:
    alerts = {r["alert"]: r for r in load_rules() if "alert" in r}
    uses = {name: metric_names(r["expr"]) for name, r in alerts.items()}
    rules = {r["record"]: metric_names(r["expr"]) for r in load_rules() if "record" in r}

    def depends_on(alert: str, metric: str) -> bool:
        todo, seen = list(uses[alert]), set()
        while todo:
            name = todo.pop()
            if name == metric:
                return True
            if name in rules and name not in seen:
                seen.add(name)
                todo.extend(rules[name])
        return False

    def alert_on(metric: str) -> list[str]:
        return [a for a in alerts if depends_on(a, metric)]

    assert alert_on("vllm:num_requests_waiting"), "queue alert"
    assert alert_on("vllm:kv_cache_usage_perc"), "KV-cache alert"
    assert alert_on("qwen_serve_requests_total"), "error-ratio alert"
    assert alert_on("qwen_serve_engine_up"), "engine-down alert"
    assert alert_on("qwen_serve_time_to_first_token_seconds_bucket"), "TTFT SLO burn alert"
    assert any("absent(qwen_serve_engine_up" in alerts[a]["expr"].replace(" ", "") for a in alerts)
    kv = [a for a in alert_on("vllm:kv_cache_usage_perc")]
    assert any("0.9" in alerts[a]["expr"] and alerts[a].get("for") == "5m" for a in kv)


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------- README


@each_dashboard
def test_readme_describes_every_panel(path: Path) -> None:
    readme = DASHBOARD_README.read_text()
    assert f"`{path.name}`" in readme, f"{DASHBOARD_README.name} does not mention {path.name}"
    panels = all_panels(load_dashboard(path))
    missing = [p["title"] for p in panels if p["type"] != "row" and f"**{p['title']}**" not in readme]
    assert not missing, f"panels without a description in {DASHBOARD_README.name}: {missing}"


# ------------------------------------------------------------------------------- compose + provisioning


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a compose service: container path → host path (resolved against deploy/).

    Sources the user supplies through an environment variable (``${VAR...}``) are left out.
    """
    out = {}
    for volume in service.get("volumes", []):
        if volume.startswith("${"):
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def test_compose_services_and_build() -> None:
    services = _compose()["services"]
    assert {"qwen-serve", "prometheus", "grafana"} <= set(services)
    build = services["qwen-serve"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file(), f"{build['dockerfile']} missing"
    assert f"{DEFAULT_GATEWAY_PORT}:{DEFAULT_GATEWAY_PORT}" in services["qwen-serve"]["ports"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]


def test_compose_bind_mounts_exist() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "${")):
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} is not declared"


def test_prometheus_config_matches_compose(tmp_path: Path) -> None:
    services = _compose()["services"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts[config_flag.split("=", 1)[1]] == PROM_CONFIG.resolve()
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert [mounts[path] for path in config["rule_files"]] == [RULES.resolve()]
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"qwen-serve:{DEFAULT_GATEWAY_PORT}"]
    assert {"namespace", "pod"} <= set(static["labels"]), "the dashboard filters on namespace and pod"
    # promtool validates the config with the rule path pointed at the checked-in file.
    config["rule_files"] = [str(RULES)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool(), "check", "config", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()

    (ds_file,) = sorted((provisioning / "datasources").glob("*.yaml"))
    (datasource,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    m = re.fullmatch(r"http://([\w-]+):(\d+)/?", datasource["url"])
    assert m and m.group(1) == "prometheus" and m.group(1) in services
    assert any(p.endswith(f":{m.group(2)}") for p in services["prometheus"]["ports"])

    (db_file,) = sorted((provisioning / "dashboards").glob("*.yaml"))
    (provider,) = yaml.safe_load(db_file.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards = [t for t, s in mounts.items() if s == DASHBOARD.parent.resolve()]
    assert dashboards == [provider["options"]["path"].rstrip("/")], "the chart's dashboards are not mounted into grafana"
    assert _mounts(services["prometheus"])["/etc/prometheus/rules.yaml"] == RULES.resolve()


@pytest.mark.parametrize("path", [COMPOSE, PROM_CONFIG, RULES, *sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yaml"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    assert yaml.safe_load(path.read_text())

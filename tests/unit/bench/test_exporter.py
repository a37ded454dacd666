"""``qwen_serve.bench.exporter``: the load generator's ``--prometheus-port`` endpoint, scraped for real."""

from __future__ import annotations

import math
import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen_serve.bench import exporter as exporter_module
from qwen_serve.bench.exporter import METRIC_NAMES, BenchExporter, Exporter, NullExporter
from qwen_serve.bench.records import RequestRecord
from qwen_serve.gateway import metrics as gateway_metrics

RUN = "rate-4-smoke"


def record(index: int, *, status: int = 200, error: str | None = None, scheduled: float = 1.0,
           sent: float = 1.01, chunks: tuple[float, ...] = (1.5, 1.6, 1.7), end: float = 1.8,
           output_tokens: int | None = 5, input_tokens: int | None = 100) -> RequestRecord:
    return RequestRecord(index=index, spec_index=index, scheduled=scheduled, sent=sent, end=end, status=status,
                         error=error, chunk_times=list(chunks), output_tokens=output_tokens,
                         input_tokens=input_tokens)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(exp: BenchExporter) -> tuple[dict[str, Any], Samples]:
    response = httpx.get(exp.url, timeout=5.0)
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"run": RUN, **labels}.items())))]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR: a listening socket still refuses the bind, a scrape's TIME_WAIT does not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def exp() -> Any:
    e = BenchExporter(RUN, port=0)
    yield e
    e.close()


def test_serves_on_loopback_and_counts_a_run(exp: BenchExporter) -> None:
    assert exp.host == "127.0.0.1" and exp.port > 0
    assert exp.url == f"http://127.0.0.1:{exp.port}/metrics"

    exp.set_target(4.0, 8)
    ok = [record(i) for i in range(3)]
    failed = [record(3, status=429, error="rate_limit_exceeded", chunks=(), output_tokens=None, input_tokens=None),
              record(4, status=0, error="timeout", chunks=(), output_tokens=None, input_tokens=None),
              record(5, status=0, error="connection_error", chunks=(), output_tokens=None, input_tokens=None)]
    for rec in ok + failed:
        exp.request_scheduled()
    for rec in ok + failed:
        exp.request_sent(rec.sent - rec.scheduled)

    _, samples = scrape(exp)
    assert value(samples, "qwen_bench_in_flight_requests") == 6
    assert value(samples, "qwen_bench_requests_scheduled_total") == 6
    assert value(samples, "qwen_bench_schedule_lag_seconds_count") == 6
    assert value(samples, "qwen_bench_schedule_lag_seconds_sum") == pytest.approx(0.06)

    for rec in ok + failed:
        exp.request_done(rec)
    families, samples = scrape(exp)

    assert value(samples, "qwen_bench_in_flight_requests") == 0
    assert value(samples, "qwen_bench_requests_total", outcome="ok", code="200") == 3
    assert value(samples, "qwen_bench_requests_total", outcome="error", code="429") == 1
    assert value(samples, "qwen_bench_requests_total", outcome="error", code="0") == 2
    codes = {dict(labels)["code"] for name, labels in samples if name == "qwen_bench_requests_total"}
    assert codes == {"200", "429", "0"}, "only codes seen"
    assert value(samples, "qwen_bench_output_tokens_total") == 15
    assert value(samples, "qwen_bench_input_tokens_total") == 300

    # Latencies of the successful requests only, in seconds, measured from the scheduled time.
    assert value(samples, "qwen_bench_time_to_first_token_seconds_count") == 3
    assert value(samples, "qwen_bench_time_to_first_token_seconds_sum") == pytest.approx(3 * 0.5)
    assert value(samples, "qwen_bench_time_to_first_token_seconds_bucket", le="0.5") == 3
    assert value(samples, "qwen_bench_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(samples, "qwen_bench_time_per_output_token_seconds_count") == 3
    assert value(samples, "qwen_bench_time_per_output_token_seconds_sum") == pytest.approx(3 * 0.05)
    assert value(samples, "qwen_bench_e2e_request_latency_seconds_count") == 3
    assert value(samples, "qwen_bench_e2e_request_latency_seconds_sum") == pytest.approx(3 * 0.8)
    assert value(samples, "qwen_bench_e2e_request_latency_seconds_bucket", le="+Inf") == 3
    assert value(samples, "qwen_bench_target_rate") == 4.0
    assert value(samples, "qwen_bench_target_concurrency") == 8

    # Every series carries the run label, and nothing else is exported.
    assert all(dict(labels).get("run") == RUN for _, labels in samples)
    assert set(families) == {n.removesuffix("_total") for n in METRIC_NAMES}
    assert not [n for n, _ in samples if n.endswith("_created")]


def test_tpot_only_when_defined(exp: BenchExporter) -> None:
    one_token = record(0, chunks=(1.5,), output_tokens=1)
    no_usage = record(1, output_tokens=None)
    for rec in (one_token, no_usage):
        exp.request_sent(0.0)
        exp.request_done(rec)
    _, samples = scrape(exp)
    assert value(samples, "qwen_bench_time_per_output_token_seconds_count") == 0
    assert value(samples, "qwen_bench_time_to_first_token_seconds_count") == 2
    assert value(samples, "qwen_bench_e2e_request_latency_seconds_count") == 2
    assert value(samples, "qwen_bench_output_tokens_total") == 1


def test_targets_unset_and_unbounded(exp: BenchExporter) -> None:
    _, samples = scrape(exp)
    assert math.isnan(value(samples, "qwen_bench_target_rate"))
    assert math.isnan(value(samples, "qwen_bench_target_concurrency"))
    exp.set_target(math.inf, None)
    _, samples = scrape(exp)
    assert value(samples, "qwen_bench_target_rate") == math.inf
    assert math.isnan(value(samples, "qwen_bench_target_concurrency"))


def test_run_variable_has_a_value_before_the_first_request_ends(exp: BenchExporter) -> None:
    """The dashboard's run variable reads label_values(qwen_bench_requests_total, run)."""
    _, samples = scrape(exp)
    assert value(samples, "qwen_bench_requests_total", outcome="ok", code="200") == 0


def test_negative_lag_counts_as_zero(exp: BenchExporter) -> None:
    exp.request_sent(-0.002)
    _, samples = scrape(exp)
    assert value(samples, "qwen_bench_schedule_lag_seconds_sum") == 0
    assert value(samples, "qwen_bench_schedule_lag_seconds_bucket", le="0.0001") == 1


def test_close_frees_the_port() -> None:
    exp = BenchExporter(RUN)
    port = exp.port
    assert not port_is_free(port)
    exp.close()
    exp.close()  # idempotent
    assert port_is_free(port)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
    # The same port can be served again at once.
    with BenchExporter(RUN, port=port) as again:
        assert again.port == port
        _, samples = scrape(again)
        assert value(samples, "qwen_bench_in_flight_requests") == 0
    assert port_is_free(port)


def test_two_exporters_keep_their_own_registries() -> None:
    with BenchExporter("a") as a, BenchExporter("b") as b:
        a.request_scheduled()
        assert a.port != b.port
        text_b = httpx.get(b.url, timeout=5.0).text
        assert 'run="b"' in text_b and 'run="a"' not in text_b


def test_serve_false_builds_collectors_without_a_server() -> None:
    exp = BenchExporter(RUN, serve=False)
    exp.request_scheduled()
    exp.close()
    families = {f.name for f in exp.registry.collect()}
    assert families == {n.removesuffix("_total") for n in METRIC_NAMES}


def test_metric_names_are_unique_and_prefixed() -> None:
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES)) == 11
    assert all(n.startswith("qwen_bench_") for n in METRIC_NAMES)


def test_latency_buckets_match_the_gateway() -> None:
    """Same bucket bounds as the gateway, so the side-by-side quantiles interpolate alike."""
    assert exporter_module.TTFT_BUCKETS == gateway_metrics.TTFT_BUCKETS
    assert exporter_module.E2EL_BUCKETS == gateway_metrics.DURATION_BUCKETS


def test_null_exporter_accepts_the_same_calls() -> None:
    null = NullExporter()
    exporters: list[Exporter] = [null, BenchExporter(RUN, serve=False)]
    for e in exporters:
        e.set_target(None, None)
        e.set_target(2.5, 4)
        e.request_scheduled()
        e.request_sent(0.001)
        e.request_done(record(0))
        e.close()
    with NullExporter() as n:
        n.request_done(record(1, status=500, error="internal_error"))
    for name in ("request_scheduled", "request_sent", "request_done", "set_target", "close"):
        assert callable(getattr(NullExporter, name)) and callable(getattr(BenchExporter, name))

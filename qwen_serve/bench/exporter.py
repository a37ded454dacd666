"""``--prometheus-port``: the load generator's own counters, scraped while a run is in progress.

:class:`BenchExporter` serves a private registry over HTTP (prometheus-client's
``start_http_server``), so Prometheus can put the client's view of a run next to the gateway's
``qwen_serve_*`` and the engine's ``vllm:*`` series (``helm/qwen-serve/files/dashboards/qwen-serve-bench.json``).
:class:`NullExporter` does nothing and is the default when no port is given. Both satisfy
:class:`Exporter`, the interface the load generator calls.

The hooks sit on the load generator's hot path, so they do no ``labels()`` lookups per call: the
children of the constant ``run`` label are resolved in the constructor, and the ``(outcome, code)``
children of the requests counter are kept in a dict (bounded: only status codes actually seen).

Every series carries ``run`` (the run's label, given to the constructor) so Grafana can tell runs
apart. Latencies are observed for successful requests only, the way the report computes them, and are
measured from the scheduled send time (see :mod:`qwen_serve.bench.records`): client TTFT includes the
schedule lag and the network, which the gateway's TTFT does not. Metric names exist only in this
module; :data:`METRIC_NAMES` lists the families (tests read it).
"""

from __future__ import annotations

import math
import threading
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from qwen_serve.bench.records import RequestRecord

__all__ = ["Exporter", "BenchExporter", "NullExporter", "METRIC_NAMES", "DEFAULT_HOST"]

DEFAULT_HOST = "127.0.0.1"

REQUESTS = "qwen_bench_requests"
SCHEDULED = "qwen_bench_requests_scheduled"
IN_FLIGHT = "qwen_bench_in_flight_requests"
OUTPUT_TOKENS = "qwen_bench_output_tokens"
INPUT_TOKENS = "qwen_bench_input_tokens"
TTFT = "qwen_bench_time_to_first_token_seconds"
TPOT = "qwen_bench_time_per_output_token_seconds"
E2EL = "qwen_bench_e2e_request_latency_seconds"
SCHEDULE_LAG = "qwen_bench_schedule_lag_seconds"
TARGET_RATE = "qwen_bench_target_rate"
TARGET_CONCURRENCY = "qwen_bench_target_concurrency"

# Family names as exposed (counters with their ``_total``); histograms also export _bucket/_sum/_count.
METRIC_NAMES: tuple[str, ...] = (
    REQUESTS + "_total",
    SCHEDULED + "_total",
    IN_FLIGHT,
    OUTPUT_TOKENS + "_total",
    INPUT_TOKENS + "_total",
    TTFT,
    TPOT,
    E2EL,
    SCHEDULE_LAG,
    TARGET_RATE,
    TARGET_CONCURRENCY,
)

# TTFT and E2EL use the gateway's bucket bounds (qwen_serve/gateway/metrics.py), so client and gateway
# quantiles interpolate within the same buckets on the side-by-side panels.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
E2EL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# TPOT: 1 ms (fast GPU decode) .. 2.5 s (CPU engine under load).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# Schedule lag: a healthy client sends within a millisecond; seconds mean it (or its cap) is the bottleneck.
LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0, 30.0, 60.0)


class Exporter(Protocol):
    """What the load generator calls; :class:`BenchExporter` and :class:`NullExporter` implement it."""

    def request_scheduled(self) -> None:
        """The arrival process made a request due."""

    def request_sent(self, lag_s: float) -> None:
        """A request was written, ``lag_s`` seconds after it was due."""

    def request_done(self, rec: RequestRecord) -> None:
        """A request that :meth:`request_sent` announced has ended (answered, failed or timed out)."""

    def set_target(self, rate: float | None, concurrency: int | None) -> None:
        """The offered load: requests/s (``inf`` = all at once) and the concurrency cap; ``None`` = none."""

    def close(self) -> None:
        """Stop serving (idempotent)."""


class NullExporter:
    """The exporter when no ``--prometheus-port`` is given: every hook does nothing."""

    def request_scheduled(self) -> None:
        pass

    def request_sent(self, lag_s: float) -> None:
        pass

    def request_done(self, rec: RequestRecord) -> None:
        pass

    def set_target(self, rate: float | None, concurrency: int | None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BenchExporter:
    """The load generator's collectors on a private registry, served on ``host:port`` until :meth:`close`.

    ``port=0`` binds a free port; :attr:`port` is the one bound. ``serve=False`` builds the collectors
    without a server (for a throwaway registry, e.g. in tests).
    """

    def __init__(self, run: str, port: int = 0, host: str = DEFAULT_HOST, *, serve: bool = True) -> None:
        # ``*_created`` series double the series count and nothing reads them (as in GatewayMetrics; this is
        # a process-wide switch of prometheus-client).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.run = run
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self._requests = Counter(
            REQUESTS, "Requests the load generator finished, by outcome (ok|error) and HTTP status (0 = none).",
            ["run", "outcome", "code"], registry=r,
        )
        # Children by (ok, status). ok/200 exists from the start, so the run shows up in Grafana's
        # label_values(qwen_bench_requests_total, run) before the first request ends, and rate() sees 0 → n.
        self._request_children: dict[tuple[bool, int], Counter] = {(True, 200): self._requests.labels(run, "ok", "200")}
        self._scheduled = Counter(
            SCHEDULED, "Requests the arrival process made due.", ["run"], registry=r,
        ).labels(run)
        self._in_flight = Gauge(
            IN_FLIGHT, "Requests sent and not yet finished by the load generator.", ["run"], registry=r,
        ).labels(run)
        self._output_tokens = Counter(
            OUTPUT_TOKENS, "Output tokens of finished requests, from the server's usage.", ["run"], registry=r,
        ).labels(run)
        self._input_tokens = Counter(
            INPUT_TOKENS, "Prompt tokens of finished requests, from the server's usage.", ["run"], registry=r,
        ).labels(run)
        self._ttft = Histogram(
            TTFT, "Successful requests: scheduled send time to the first generated token, at the client.",
            ["run"], buckets=TTFT_BUCKETS, registry=r,
        ).labels(run)
        self._tpot = Histogram(
            TPOT, "Successful requests: mean time per output token after the first, at the client.",
            ["run"], buckets=TPOT_BUCKETS, registry=r,
        ).labels(run)
        self._e2el = Histogram(
            E2EL, "Successful requests: scheduled send time to the last byte, at the client.",
            ["run"], buckets=E2EL_BUCKETS, registry=r,
        ).labels(run)
        self._lag = Histogram(
            SCHEDULE_LAG, "Time from when a request was due to when the client sent it.",
            ["run"], buckets=LAG_BUCKETS, registry=r,
        ).labels(run)
        self._target_rate = Gauge(
            TARGET_RATE, "Offered request rate (requests/s; +Inf = all at once; NaN = none set).",
            ["run"], registry=r,
        ).labels(run)
        self._target_concurrency = Gauge(
            TARGET_CONCURRENCY, "Concurrency cap of the load generator (NaN = no cap).", ["run"], registry=r,
        ).labels(run)
        self._target_rate.set(math.nan)
        self._target_concurrency.set(math.nan)

        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port
        if serve:
            self._server, self._thread = start_http_server(port, addr=host, registry=r)
            self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    # ------------------------------------------------------------------------------------------- hooks

    def request_scheduled(self) -> None:
        self._scheduled.inc()

    def request_sent(self, lag_s: float) -> None:
        self._in_flight.inc()
        self._lag.observe(lag_s if lag_s > 0.0 else 0.0)

    def request_done(self, rec: RequestRecord) -> None:
        self._in_flight.dec()
        ok = rec.ok
        key = (ok, rec.status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(
                self.run, "ok" if ok else "error", str(rec.status))
        child.inc()
        if rec.output_tokens:
            self._output_tokens.inc(rec.output_tokens)
        if rec.input_tokens:
            self._input_tokens.inc(rec.input_tokens)
        if not ok:
            return
        ttft = rec.ttft_ms
        if ttft is not None:
            self._ttft.observe(ttft / 1000.0)
        tpot = rec.tpot_ms
        if tpot is not None:
            self._tpot.observe(tpot / 1000.0)
        self._e2el.observe(rec.e2el_ms / 1000.0)

    def set_target(self, rate: float | None, concurrency: int | None) -> None:
        self._target_rate.set(math.nan if rate is None else rate)
        self._target_concurrency.set(math.nan if concurrency is None else concurrency)

    # ------------------------------------------------------------------------------------------ server

    def close(self) -> None:
        """Stop the HTTP server and free the port (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> BenchExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

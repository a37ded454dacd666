"""Every Prometheus collector the gateway exports (contract: CONTRACTS.md §5), and the merged scrape.

Owned by the app (``build_app`` creates one :class:`GatewayMetrics` with its own registry, so several
apps can live in one process, e.g. in tests). Stages receive this object and call its collectors;
metric names exist only in this module.

Labels are bounded: ``model`` is one of the served names or ``"other"`` (see :meth:`model_label`),
``key_id`` is a configured key id or ``"anonymous"``, never a presented secret.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from qwen_serve.logs import dropped_records

__all__ = ["EngineScrapeCache", "GatewayMetrics", "Labelled", "merge_engine_metrics", "OTHER_MODEL"]

OTHER_MODEL = "other"

# TTFT: 10 ms .. 60 s; request duration: up to 10 min (LLM requests are long).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


C = TypeVar("C", Counter, Gauge, Histogram)


class _LogDrops(Collector):
    """``qwen_serve_log_records_dropped_total``: log records dropped because the log queue was full
    (read from :func:`qwen_serve.logs.dropped_records` at scrape time)."""

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("qwen_serve_log_records_dropped",
                                  "Log records dropped because the log queue was full", value=dropped_records())


class Labelled(Generic[C]):
    """A labelled collector whose children are found with one dict lookup.

    prometheus-client's ``labels()`` checks its arguments, converts every value with ``str`` and takes a
    lock on each call, about 1 µs in a tight loop; the gateway makes six such calls per request. A child
    lives as long as its collector, and the gateway never removes label values, so the map from the tuple
    of values to the child can be kept here; the first use of a tuple goes through ``labels()``. Pass
    ``str`` values, as prometheus-client would make them.
    """

    __slots__ = ("collector", "_children")

    def __init__(self, collector: C) -> None:
        self.collector: C = collector
        self._children: dict[tuple[str, ...], C] = {}

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.collector.labels(*values)
        return child


class GatewayMetrics:
    """The gateway's collectors on a private registry (plus process/platform/gc collectors)."""

    def __init__(self, served_models: Iterable[str] = ()) -> None:
        # ``*_created`` gauges double the series count and no dashboard or rule reads them. This is a
        # process-wide switch of prometheus-client; the gateway process exports only our registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_LogDrops())
        self._models: set[str] = set(served_models)
        self._restarts_seen = 0

        self.requests = Labelled(Counter(
            "qwen_serve_requests", "Requests answered by the gateway.",
            ["route", "model", "key_id", "code"], registry=r,
        ))
        self.request_duration = Labelled(Histogram(
            "qwen_serve_request_duration_seconds", "Request duration, first byte in to last byte out.",
            ["route", "model"], buckets=DURATION_BUCKETS, registry=r,
        ))
        self.ttft = Labelled(Histogram(
            "qwen_serve_time_to_first_token_seconds", "Time to the first streamed token, seen at the gateway.",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        ))
        self.tokens = Labelled(Counter(
            "qwen_serve_tokens", "Tokens processed, from the engine's usage (kind: prompt|completion).",
            ["model", "key_id", "kind"], registry=r,
        ))
        self.in_flight = Labelled(Gauge(
            "qwen_serve_in_flight_requests", "Requests in flight through the gateway.", ["model"], registry=r,
        ))
        self.rate_limited = Labelled(Counter(
            "qwen_serve_rate_limited", "Requests refused by a rate limit (limit: rpm|tpm|concurrency).",
            ["key_id", "limit"], registry=r,
        ))
        self.auth_failures = Labelled(Counter(
            "qwen_serve_auth_failures", "Requests refused by authentication.", ["reason"], registry=r,
        ))
        self.guided_requests = Labelled(Counter(
            "qwen_serve_guided_requests", "Guided-decoding requests by outcome (valid|invalid|truncated|...).",
            ["model", "kind", "outcome"], registry=r,
        ))
        self.client_disconnects = Labelled(Counter(
            "qwen_serve_client_disconnects", "Clients that went away before the response ended.",
            ["model"], registry=r,
        ))
        self.upstream_errors = Labelled(Counter(
            "qwen_serve_upstream_errors", "Failures talking to the engine (kind: connect|timeout|protocol|status).",
            ["kind"], registry=r,
        ))
        self.engine_up = Gauge("qwen_serve_engine_up", "1 when the engine answers /health.", registry=r)
        self.engine_restarts = Counter(
            "qwen_serve_engine_restarts", "Engine restarts by the supervisor.", registry=r,
        )
        self.draining = Gauge("qwen_serve_draining", "1 while the gateway drains for shutdown.", registry=r)

    def sync_engine(self, *, up: bool, draining: bool, restarts: int) -> None:
        """Copy the engine state into the gauges (called per scrape; state is the source of truth)."""
        self.engine_up.set(1 if up else 0)
        self.draining.set(1 if draining else 0)
        behind = restarts - self._restarts_seen
        if behind > 0:
            self.engine_restarts.inc(behind)
            self._restarts_seen = restarts

    def set_served_models(self, names: Iterable[str]) -> None:
        self._models = set(names)

    def model_label(self, name: object) -> str:
        """Bound the ``model`` label: a served model name, else ``"other"``."""
        return name if isinstance(name, str) and name in self._models else OTHER_MODEL

    def render(self) -> bytes:
        """The gateway's own exposition text."""
        return generate_latest(self.registry)


class EngineScrapeCache:
    """The engine's ``/metrics`` text, fetched at most once per ``ttl_s`` seconds.

    ``fetch`` returns the text, or ``None`` when the engine cannot be scraped; either answer is kept for
    ``ttl_s`` seconds from the moment it arrived (a down engine is not asked again on every scrape
    either). Callers that arrive while a fetch is running share it: N concurrent scrapes cause one
    request to the engine. A caller that is cancelled (its client went away) does not cancel the shared
    fetch. When ``fetch`` raises, every waiter gets the exception and nothing is kept. ``ttl_s == 0``
    turns the cache off: every call fetches.
    """

    def __init__(self, fetch: Callable[[], Awaitable[bytes | None]], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._value: bytes | None = None
        self._expires = float("-inf")
        self._inflight: asyncio.Task[bytes | None] | None = None
        self.fetches = 0  # requests sent to the engine (for tests and debugging)

    async def get(self) -> bytes | None:
        """The cached text if still fresh, else the result of the running or of a new fetch."""
        if self._ttl_s == 0:
            self.fetches += 1
            return await self._fetch()
        if self._clock() < self._expires:
            return self._value
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.ensure_future(self._refresh())
            task.add_done_callback(_retrieve)  # a failure nobody waits for any more is not logged as lost
        return await asyncio.shield(task)

    async def _refresh(self) -> bytes | None:
        try:
            self.fetches += 1
            value = await self._fetch()
            self._value, self._expires = value, self._clock() + self._ttl_s
            return value
        finally:
            self._inflight = None


def _retrieve(task: asyncio.Task[bytes | None]) -> None:
    if not task.cancelled():
        task.exception()


_SKIP_PREFIXES = ("process_", "python_")


def merge_engine_metrics(gateway_text: bytes, engine_text: bytes) -> bytes:
    """Gateway text followed by the engine's, each family once.

    The engine's ``process_*``/``python_*`` families (and any family the gateway already exports)
    are dropped, so strict parsers (Go ``expfmt``) accept the scrape.
    """
    seen = _families(gateway_text)
    out = [gateway_text if gateway_text.endswith(b"\n") else gateway_text + b"\n"]
    keep = True
    for line in engine_text.splitlines(keepends=True):
        if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
            name = line.split(b" ", 3)[2].decode()
            keep = not (name.startswith(_SKIP_PREFIXES) or name in seen)
        elif not line.startswith(b"#") and line.strip():
            name = line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
            if _base(name).startswith(_SKIP_PREFIXES) or _base(name) in seen:
                continue
        if keep:
            out.append(line)
    return b"".join(out)


def _families(text: bytes) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith(b"# TYPE "):
            names.add(line.split(b" ", 3)[2].decode())
    return names


def _base(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created", "_info"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample

"""Every Prometheus collector the gateway exports (the families ``docs/metrics.md`` lists), and the merged
scrape.

Owned by the app (``build_app`` creates one :class:`GatewayMetrics` with its own registry, so several
apps can live in one process, e.g. in tests). Stages receive this object and call its collectors;
metric names exist only in this module.

Labels are bounded: ``model`` is one of the served names (the pipeline refuses any other with 404) or
``"other"`` for requests refused before a model was known,
``key_id`` is a configured key id or ``"anonymous"``, never a presented secret.

Several gateway worker processes (``gateway.workers`` > 1) use prometheus-client's multiprocess mode: the
worker supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (:data:`MULTIPROC_ENV`) for every worker before it
starts, so each worker's samples live in files there, and :meth:`GatewayMetrics.render` on any worker
shows the sum over all of them (counters and histograms of dead workers included; the in-flight gauge
over live workers; ``qwen_serve_engine_up`` and ``qwen_serve_draining`` as most recently set by a live
worker, which every worker does once a second and at each scrape; ``qwen_serve_engine_restarts_total``
from the supervisor's count). Every family appears once, with its HELP text, in the order of one process,
samples or not. The per-process ``process_*``/``python_*`` families are left out then: N processes' start
times, file descriptors and collector counts do not add up to one gateway. The supervisor removes a dead
worker's live-gauge files (``mark_process_dead``).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
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
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from qwen_serve.logs import dropped_records

__all__ = ["MULTIPROC_ENV", "EngineScrapeCache", "GatewayMetrics", "ImageCounters", "Labelled", "merge_engine_metrics",
           "multiprocess_dir", "OTHER_MODEL", "workers_in_flight"]

log = logging.getLogger("qwen_serve.gateway")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes its samples to, or None (one gateway process).

    prometheus-client decides when it is first imported: :data:`MULTIPROC_ENV` must be set by then (the
    worker supervisor sets it in each worker's environment). Set later, it is ignored, with a warning."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if getattr(prometheus_values.ValueClass, "__name__", "") != "MmapedValue":
        log.warning("%s is set but prometheus-client was imported before: metrics of this process only", MULTIPROC_ENV)
        return None
    return path


class _Restarts(Collector):
    """``qwen_serve_engine_restarts_total`` from the engine state (the supervisor's count, one per host), for
    the multiprocess mode: a counter per worker would add it up once per worker."""

    def __init__(self) -> None:
        self.value = 0

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("qwen_serve_engine_restarts", "Engine restarts by the supervisor.", value=self.value)


IN_FLIGHT = "qwen_serve_in_flight_requests"


def _live_sums(path: str, name: str) -> list[Metric]:
    files = glob.glob(os.path.join(path, "gauge_livesum_*.db"))
    merged = MultiProcessCollector.merge(files, accumulate=False)  # type: ignore[no-untyped-call]
    return [m for m in merged if m.name == name]


def workers_in_flight(path: str) -> int:
    """Requests in flight through all live gateway workers writing to the multiprocess directory ``path``
    (the supervisor's engine monitor asks it: busy is judged by the whole gateway)."""
    return max(0, round(sum(s.value for m in _live_sums(path, IN_FLIGHT) for s in m.samples)))


class _AllWorkersGauge(Gauge):
    """A ``livesum`` gauge whose :meth:`collect` (what :func:`~qwen_serve.engine.inflight.gauge_reader` asks,
    e.g. the engine monitor's "requests in flight") sums every live worker's samples, not this process's."""

    def collect(self) -> Iterable[Metric]:
        path = multiprocess_dir()
        if path is None:
            return super().collect()
        return _live_sums(path, self._name) or self.describe()  # the family, without samples yet


class Labelled(Generic[C]):
    """A labelled collector whose children are found with one dict lookup.

    prometheus-client's ``labels()`` checks its arguments, converts every value with ``str`` and takes a
    lock on each call, about 1 µs in a tight loop; the gateway makes six such calls per request. A child
    lives as long as its collector, and the gateway never removes label values, so the map from the tuple
    of values to the child can be kept here; the first use of a tuple goes through ``labels()``. Pass
    ``str`` values, as prometheus-client would make them.
    """

    # Measured: −5.7% instructions per request (benchmarks/RESULTS.md, 2026-11-29, "children looked up once").
    __slots__ = ("collector", "_children")

    def __init__(self, collector: C) -> None:
        self.collector: C = collector
        self._children: dict[tuple[str, ...], C] = {}

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.collector.labels(*values)
        return child


@dataclass(frozen=True)
class ImageCounters:
    """The image collectors (what :class:`~qwen_serve.gateway.multimodal.ImageGuard` counts through)."""

    images: Labelled[Counter]  # {model, source}
    image_bytes: Labelled[Counter]  # {model, source}, decoded bytes
    images_refused: Labelled[Counter]  # {model, reason}


class GatewayMetrics:
    """The gateway's collectors on a private registry (plus process/platform/gc collectors).

    ``shared_limiter``: the limiter keeps its counts in an external store (``limits.backend: redis``); adds
    ``qwen_serve_limiter_backend_errors_total{op}``, which no other setup can move. ``images``: the served model
    accepts image inputs; adds ``qwen_serve_images_total{model,source}``, ``qwen_serve_image_bytes_total{model,
    source}`` (decoded bytes; ``source`` ``data``|``remote``) and ``qwen_serve_images_refused_total{model,reason}``.
    """

    def __init__(self, *, shared_limiter: bool = False, images: bool = False) -> None:
        # ``*_created`` gauges double the series count and no dashboard or rule reads them. This is a
        # process-wide switch of prometheus-client; the gateway process exports only our registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._restarts_seen = 0
        self._dropped_seen = 0
        self._restarts: _Restarts | None = None
        self._log_drops: Counter | None = None
        shared = self.multiprocess_dir is not None
        if shared:
            self._log_drops = Counter("qwen_serve_log_records_dropped",
                                      "Log records dropped because the log queue was full", registry=r)
        else:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
            r.register(_LogDrops())

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
        self.in_flight = Labelled((_AllWorkersGauge if shared else Gauge)(
            IN_FLIGHT, "Requests in flight through the gateway.", ["model"], registry=r,
            multiprocess_mode="livesum",
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
        # Only with a limiter that has a store to lose (limits.backend: redis).
        self.limiter_backend_errors = Labelled(Counter(
            "qwen_serve_limiter_backend_errors",
            "Limiter store (Redis) failures: requests decided by limits.on_backend_error (op=acquire), "
            "failed lease releases and heartbeats.", ["op"], registry=r,
        )) if shared_limiter else None
        # Only for a model that accepts images (multimodal.ImageGuard counts through these).
        self.image_counters = ImageCounters(
            Labelled(Counter("qwen_serve_images", "Images accepted (source: data|remote).", ["model", "source"],
                             registry=r)),
            Labelled(Counter("qwen_serve_image_bytes", "Decoded bytes of accepted images (source: data|remote).",
                             ["model", "source"], registry=r)),
            Labelled(Counter("qwen_serve_images_refused", "Image parts refused with a 400 (reason).",
                             ["model", "reason"], registry=r)),
        ) if images else None
        self.engine_up = Gauge("qwen_serve_engine_up", "1 when the engine answers /health.", registry=r,
                               multiprocess_mode="livemostrecent")
        self.engine_restarts: Counter | None = None
        if shared:
            self._restarts = _Restarts()
            r.register(self._restarts)
        else:
            self.engine_restarts = Counter(
                "qwen_serve_engine_restarts", "Engine restarts by the supervisor.", registry=r,
            )
        self.draining = Gauge("qwen_serve_draining", "1 while the gateway drains for shutdown.", registry=r,
                              multiprocess_mode="livemostrecent")

    def sync_engine(self, *, up: bool, draining: bool, restarts: int) -> None:
        """Copy the engine state into the gauges (called per scrape, and by each worker once a second; state
        is the source of truth)."""
        self.engine_up.set(1 if up else 0)
        self.draining.set(1 if draining else 0)
        if self._restarts is not None:
            self._restarts.value = max(self._restarts.value, restarts)
        elif self.engine_restarts is not None:
            behind = restarts - self._restarts_seen
            if behind > 0:
                self.engine_restarts.inc(behind)
                self._restarts_seen = restarts
        if self._log_drops is not None:
            dropped = dropped_records()
            if dropped > self._dropped_seen:
                self._log_drops.inc(dropped - self._dropped_seen)
                self._dropped_seen = dropped

    def render(self) -> bytes:
        """The gateway's own exposition text (with several workers: all of them, see the module docstring)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        return generate_latest(_AllWorkers(self.registry, self.multiprocess_dir, {"qwen_serve_engine_restarts"}))


class _AllWorkers:
    """The families of ``registry`` (names, types, HELP, order) with the samples of every worker, read from
    the multiprocess directory ``path``; the families named in ``local`` (collectors that write no files)
    with this process's samples. A family nobody has a sample of yet is still listed, as one process lists
    it."""

    def __init__(self, registry: CollectorRegistry, path: str, local: set[str]) -> None:
        self._registry = registry
        self._path = path
        self._local = local

    def collect(self) -> Iterator[Metric]:
        merged = {m.name: m for m in MultiProcessCollector(None, self._path).collect()}  # type: ignore[no-untyped-call]
        for family in self._registry.collect():
            if family.name in self._local:
                yield family
                continue
            found = merged.get(family.name)
            if found is None:
                yield Metric(family.name, family.documentation, family.type)
                continue
            found.documentation = family.documentation
            yield found


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

"""The engine's own view of a run, from its Prometheus text: snapshots before/after and peaks during.

:func:`parse` reads the few ``vllm:*`` samples the report needs from exposition text (a line scan, not a
full parser: it runs once a second beside the load and must stay cheap), summing label sets (several
data-parallel engines report one series each). :class:`EngineWatch` polls ``metrics_url`` every
``interval_s`` while a run is in flight, keeps the first and the last snapshot and the peaks of the
gauges, and :meth:`EngineWatch.summary` gives the ``engine`` object of ``result.json`` (``None`` when
no scrape ever succeeded). Works against the gateway's merged ``/metrics`` and vLLM's own.

vLLM counts a request after its answer went out, so a snapshot taken right after the last answer can
miss it. Each snapshot therefore waits (at most 10 s) until ``vllm:request_success_total`` shows the
requests the client saw succeed since the previous one, then until two reads 0.5 s apart agree.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

__all__ = ["WATCHED", "parse", "EngineWatch"]

WATCHED = (
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)
_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
_PREFIXES = tuple(n.encode() for n in WATCHED)


def parse(text: bytes) -> dict[str, float]:
    """``{name: sum over label sets}`` for the :data:`WATCHED` names present in ``text``."""
    out: dict[str, float] = {}
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        for name, prefix in zip(WATCHED, _PREFIXES):
            if line.startswith(prefix) and line[len(prefix):len(prefix) + 1] in (b"{", b" "):
                try:
                    value = float(line.rsplit(b"}", 1)[-1].split()[0])
                except (ValueError, IndexError):
                    break
                if name == "vllm:kv_cache_usage_perc":  # a fraction per engine: report the busiest
                    out[name] = max(out.get(name, 0.0), value)
                else:
                    out[name] = out.get(name, 0.0) + value
                break
    return out


class EngineWatch:
    """Polls ``metrics_url`` in the background between :meth:`start` and :meth:`stop`."""

    def __init__(self, metrics_url: str, interval_s: float = 1.0) -> None:
        self.url = metrics_url
        self.interval_s = interval_s
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.peaks: dict[str, float] = {}
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._baseline: dict[str, float] | None = None

    async def _scrape(self) -> dict[str, float] | None:
        assert self._session is not None
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    self.error = f"GET {self.url}: HTTP {resp.status}"
                    return None
                snap = parse(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.error = f"GET {self.url}: {type(exc).__name__}"
            return None
        if not snap:
            self.error = f"GET {self.url}: no vllm:* metrics in the answer"
            return None
        for name in _GAUGES:
            if name in snap:
                self.peaks[name] = max(self.peaks.get(name, 0.0), snap[name])
        return snap

    async def open(self) -> None:
        """Take the baseline the warm-up is counted from (call before the warm-up)."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._baseline = await self._scrape()

    async def start(self, warmup_succeeded: int = 0) -> None:
        """The ``before`` snapshot, once the ``warmup_succeeded`` warm-up answers are counted in it."""
        if self._session is None:
            await self.open()
        self.before = await self._settled_scrape(self._baseline, warmup_succeeded)
        if self.before is not None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._scrape()

    async def stop(self, succeeded: int = 0) -> None:
        """The ``after`` snapshot, once the ``succeeded`` answers of the run are counted in it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            if self.before is not None:
                self.after = await self._settled_scrape(self.before, succeeded)
            await self._session.close()

    async def _settled_scrape(self, since: dict[str, float] | None,
                              succeeded: int) -> dict[str, float] | None:
        """A snapshot that counts ``succeeded`` more finished requests than ``since`` (waited for at most
        10 s; not at all without ``since``) and whose counters then held still for 0.5 s (at most 5 s
        more); ``None`` when a read fails."""
        snap = await self._scrape()
        name = "vllm:request_success_total"
        if since is not None and name in since:
            for _ in range(40):
                if snap is None or snap.get(name, 0.0) >= since[name] + succeeded:
                    break
                await asyncio.sleep(0.25)
                snap = await self._scrape()
        for _ in range(10):
            if snap is None:
                return None
            await asyncio.sleep(0.5)
            again = await self._scrape()
            if again == snap:
                break
            snap = again
        return snap

    def summary(self) -> dict[str, Any] | None:
        """The ``engine`` object of ``result.json``; ``None`` when the engine's metrics were never read."""
        if self.before is None:
            return None
        after = self.after or self.before

        def delta(name: str) -> float | None:
            if name in after and self.before is not None and name in self.before:
                return after[name] - self.before[name]
            return None

        queries, hits = delta("vllm:prefix_cache_queries_total"), delta("vllm:prefix_cache_hits_total")
        return {
            "metrics_url": self.url,
            "kv_cache_usage_peak": self.peaks.get("vllm:kv_cache_usage_perc"),
            "running_peak": self.peaks.get("vllm:num_requests_running"),
            "queue_peak": self.peaks.get("vllm:num_requests_waiting"),
            "preemptions": delta("vllm:num_preemptions_total"),
            "prefix_cache_queries": queries,
            "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": (hits / queries) if queries and hits is not None else None,
            "prompt_tokens": delta("vllm:prompt_tokens_total"),
            "generation_tokens": delta("vllm:generation_tokens_total"),
            "requests_succeeded": delta("vllm:request_success_total"),
            "before": self.before,
            "after": after,
        }

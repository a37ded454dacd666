"""Engine liveness as the gateway sees it.

:class:`EngineState` is the single record ``/ready`` and the metrics read: is the engine answering
``/health``, is the gateway draining, why not ready. :class:`EngineMonitor` keeps ``up`` current by
polling the engine's ``/health`` (every ``interval`` s, short timeout); the supervisor, when there is
one, also writes to the same state (start-up, crash, restart). The monitor task is owned by the app
lifespan: ``start()`` then ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

from qwen_serve.errors import UpstreamError
from qwen_serve.gateway.upstream import Upstream

__all__ = ["EngineMonitor", "EngineState"]

log = logging.getLogger("qwen_serve.engine")


@dataclass
class EngineState:
    up: bool = False
    draining: bool = False
    status: str = "starting"  # starting | ready | engine_down | draining | failed
    restarts: int = 0

    @property
    def ready(self) -> bool:
        return self.up and not self.draining

    def describe(self) -> str:
        if self.draining:
            return "draining"
        if self.up:
            return "ready"
        return self.status if self.status != "ready" else "engine_down"


class EngineMonitor:
    """Polls ``GET /health`` on the engine and updates an :class:`EngineState`.

    One success marks the engine up; it is marked down only after ``failure_threshold`` failures in a
    row (like a Kubernetes probe): a vLLM frontend busy streaming can take seconds to answer
    ``/health``, and one slow answer must not turn traffic away.
    """

    def __init__(self, upstream: Upstream, state: EngineState, *, interval: float = 1.0, timeout: float = 2.0,
                 failure_threshold: int = 3, on_change: Callable[[bool], None] | None = None) -> None:
        self._upstream = upstream
        self.state = state
        self._interval = interval
        self._timeout = timeout
        self._failure_threshold = failure_threshold
        self._failures = 0
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        try:
            status, _ = await self._upstream.get_bytes("/health", self._timeout)
            healthy = status == 200
        except UpstreamError:
            healthy = False
        self._failures = 0 if healthy else self._failures + 1
        ok = healthy or (self.state.up and self._failures < self._failure_threshold)
        if ok != self.state.up:
            log.info("engine %s", "is up" if ok else "stopped answering /health")
            if ok:
                self.state.status = "ready"
            elif self.state.status == "ready":
                self.state.status = "engine_down"
        self.state.up = ok
        if self._on_change is not None:
            self._on_change(ok)
        return ok

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval if self.state.up else min(self._interval, 0.5))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="engine-monitor")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

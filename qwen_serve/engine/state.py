"""Engine liveness as the gateway sees it.

:class:`EngineState` is the single record ``/ready`` and the metrics read: is the engine answering
``/health``, is the gateway draining, why not ready, since when its probes fail, whether it is down for
good. :class:`EngineMonitor` keeps ``up`` and ``failing_since`` current by polling the engine's
``/health`` (every ``interval`` s, short timeout); the supervisor, when there is one, also writes to the
same state (start-up, crash, restart, failure for good) and restarts an engine that stays unhealthy.
The monitor task is owned by the app lifespan: ``start()`` then ``aclose()``.

Busy is not down: vLLM's API server answers ``/health`` on the event loop that also prepares requests, and
one expensive request (a guided ``choice`` among hundreds of thousands of strings) can stall it for a
minute. A ``/health`` probe that times out while requests are in flight through the gateway therefore
means "busy"; an engine whose process is gone, or that refuses connections, is down (see
:class:`EngineMonitor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable

from qwen_serve.errors import UpstreamError, UpstreamTimeout
from qwen_serve.upstream import Upstream

__all__ = ["BUSY_LOG_INTERVAL_S", "EngineMonitor", "EngineState", "Probe"]

log = logging.getLogger("qwen_serve.engine")

BUSY_LOG_INTERVAL_S = 30.0  # at most one "engine busy" line per this many seconds


@dataclass
class EngineState:
    """What the gateway knows about the engine; written by the monitor and the supervisor.

    ``failing_since``: monotonic time (the monitor's clock) of the first failed ``/health`` probe of the
    current run of failures, None while probes pass or the engine is busy (a busy probe ends the run).
    The supervisor restarts an engine whose run has lasted ``engine.unhealthy_restart_s``.
    ``failed``: the engine is down for good (it could not start, or exited or turned unhealthy with no
    restart left); the gateway's ``/health`` then fails so the orchestrator replaces the process.
    """

    up: bool = False
    draining: bool = False
    status: str = "starting"  # starting | ready | engine_down | draining | failed
    restarts: int = 0
    busy: bool = False  # up, but /health is slow while requests are in flight (still ready)
    failing_since: float | None = None
    failed: bool = False

    @property
    def ready(self) -> bool:
        return self.up and not self.draining

    def describe(self) -> str:
        if self.draining:
            return "draining"
        if self.up:
            return "ready"
        return self.status if self.status != "ready" else "engine_down"


class Probe(enum.Enum):
    """What one ``/health`` probe found."""

    OK = "ok"  # 200
    SLOW = "slow"  # no answer within the probe's timeout: busy or wedged
    FAILED = "failed"  # refused connection, another status, a broken answer: nothing serving there
    DEAD = "dead"  # not probed: the engine's process is not alive


class EngineMonitor:
    """Polls ``GET /health`` on the engine and updates an :class:`EngineState`.

    Each probe (``timeout`` s) decides as follows; one 200 marks the engine up:

    * **Process gone** (``process_alive()`` is False: the supervisor saw the engine exit, or it waits out
      a restart's back-off): down at once; no probe is sent.
    * **Busy**: the probe timed out while ``in_flight()`` requests (> 0) are in flight through the
      gateway. Nothing changes (an up engine stays up: ``/ready`` 200, requests are passed on), the probe
      is not counted as a failure and the run of failures starts over; ``state.busy`` is set and
      ``engine busy: /health slow while N requests in flight`` is logged, at most once every
      :data:`BUSY_LOG_INTERVAL_S`.
    * **Failed** (connection refused, a status other than 200, a broken answer): down after
      ``failure_threshold`` failures in a row (like a Kubernetes probe).
    * **Slow with nothing in flight**: counts as a failure, but marks the engine down only once probes
      have failed for ``stall_down_after_s`` in a row (and at least ``failure_threshold`` times): the
      engine may still be working on a request whose client has left.

    A wedged engine does not stay "busy" for ever: requests in flight end at the gateway's own time-outs
    (``gateway.request_timeout_s``, ``gateway.request_deadline_s``), then the stall window runs.

    After each probe ``state.failing_since`` is the start of the current run of failures (every probe but
    a 200 or a busy one counts, whether or not the engine is down yet), None when there is none; the
    supervisor's ``engine.unhealthy_restart_s`` rule reads it.

    Without a supervisor (``qwen-serve gateway --upstream URL``) ``process_alive`` is None: there is no
    process to check. A dead engine then shows as refused connections (down after ``failure_threshold``
    probes); a slow one is judged as above, which also covers an engine busy with other clients of its
    own (nothing in flight here) and, at the cost of ``stall_down_after_s``, an engine the network no
    longer reaches (connections that time out). Without ``in_flight`` nothing counts as in flight.
    """

    def __init__(self, upstream: Upstream, state: EngineState, *, interval: float = 1.0, timeout: float = 2.0,
                 failure_threshold: int = 3, stall_down_after_s: float = 30.0,
                 in_flight: Callable[[], int] | None = None, process_alive: Callable[[], bool] | None = None,
                 on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._upstream = upstream
        self.state = state
        self._interval = interval
        self._timeout = timeout
        self._failure_threshold = failure_threshold
        self._stall_down_after = stall_down_after_s
        self._in_flight = in_flight
        self._process_alive = process_alive
        self._on_change = on_change
        self._clock = clock
        self._failures = 0
        self._failing_since: float | None = None  # when the current run of failures began
        self._busy_since: float | None = None
        self._busy_logged_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def probe(self) -> Probe:
        """One ``/health`` probe (or :attr:`Probe.DEAD` without one when the process is known to be gone)."""
        if self._process_alive is not None and not self._process_alive():
            return Probe.DEAD
        try:
            status, _ = await self._upstream.get_bytes("/health", self._timeout)
        except UpstreamTimeout:
            return Probe.SLOW
        except UpstreamError:
            return Probe.FAILED
        return Probe.OK if status == 200 else Probe.FAILED

    async def check(self) -> bool:
        """Probe once and update the state; returns whether the engine is (still) considered up."""
        probe = await self.probe()
        ok = self.decide(probe, self._clock())
        self.state.failing_since = self._failing_since
        if ok != self.state.up:
            log.info("engine %s", "is up" if ok else
                     "process is gone" if probe is Probe.DEAD else "stopped answering /health")
            if ok:
                self.state.status = "ready"
            elif self.state.status == "ready":
                self.state.status = "engine_down"
        self.state.up = ok
        if self._on_change is not None:
            self._on_change(ok)
        return ok

    def decide(self, probe: Probe, now: float) -> bool:
        """Whether the engine is up after ``probe`` (at monotonic time ``now``); see the class docstring."""
        if probe is Probe.OK:
            self._end_busy(probe, now)
            self._failures, self._failing_since = 0, None
            return True
        if probe is Probe.SLOW:
            in_flight = self._in_flight() if self._in_flight is not None else 0
            if in_flight > 0:
                self._mark_busy(in_flight, now)
                self._failures, self._failing_since = 0, None
                return self.state.up
        self._end_busy(probe, now)
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
        if probe is Probe.DEAD:
            return False
        if self._failures < self._failure_threshold:
            return self.state.up
        if probe is Probe.FAILED:
            return False
        return self.state.up and now - self._failing_since < self._stall_down_after

    def _mark_busy(self, in_flight: int, now: float) -> None:
        if self._busy_since is None:
            self._busy_since = now
        self.state.busy = self.state.up
        if self._busy_logged_at is None or now - self._busy_logged_at >= BUSY_LOG_INTERVAL_S:
            self._busy_logged_at = now
            log.warning("engine busy: /health slow while %d requests in flight", in_flight)

    def _end_busy(self, probe: Probe, now: float) -> None:
        if self._busy_since is not None:
            log.info("engine busy for %.1f s; /health now %s", now - self._busy_since, probe.value)
        self._busy_since = None
        self.state.busy = False

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

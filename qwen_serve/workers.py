"""The gateway as N worker processes on one port: the supervisor side (``gateway.workers`` > 1).

:func:`run_workers` is what ``qwen-serve up`` and ``qwen-serve gateway`` run instead of one gateway process
when the gateway gets more than one worker. This process then serves no HTTP itself. It:

1. checks that every gateway port can be bound (exit 1 otherwise, before the engine is started);
2. makes the run directory the workers share (:class:`~qwen_serve.gateway.workers.RunDir`: the shared-memory
   rate limits, prometheus-client's multiprocess directory, the engine status) and removes it at the end;
3. under ``qwen-serve up``: starts the engine once (:class:`~qwen_serve.engine.supervisor.EngineSupervisor`),
   runs the one engine monitor the supervisor's ``engine.unhealthy_restart_s`` rule reads (busy is judged by
   the requests in flight through all workers), and publishes the engine's state for the workers every
   :data:`STATUS_INTERVAL_S` (:class:`~qwen_serve.gateway.workers.EngineStatus`);
4. starts the workers (:class:`WorkerPool`; ``python -m qwen_serve.gateway.workers``, each with its own
   upstream connections and engine monitor) while the engine loads. A worker that cannot start the first
   time ends the run (exit 1) as a failed engine start does;
5. restarts a worker that exits while the gateway is not draining, after the supervisor reclaimed the rate-limit
   leases of its requests and removed its live-gauge files (back-off :func:`restart_delay` after workers
   that died within :data:`STABLE_S` of their start, no limit on the number of restarts). The others keep
   serving meanwhile; connections the dead worker had accepted are lost with it;
6. on SIGTERM/SIGINT (or a fatal engine failure): sends SIGTERM to every worker, each of which drains as one
   gateway process does (``/ready`` 503, new requests 503, in-flight streams finish within
   ``gateway.drain_timeout_s``), waits for all of them (SIGKILL :data:`KILL_GRACE_S` after the drain time),
   then stops the engine. Exit code 0 after a drain, 1 after a fatal failure, as with one process.

Workers die with this process (``PR_SET_PDEATHSIG``), and the engine's guard takes the engine down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwen_serve.config import Config
from qwen_serve.constants import ENGINE_HOST
from qwen_serve.engine.state import EngineMonitor, EngineState
from qwen_serve.engine.supervisor import EngineSupervisor
from qwen_serve.gateway.limits import SHARED_LIMITS_ENV
from qwen_serve.gateway.limits_shared import SharedLimiter
from qwen_serve.gateway.metrics import MULTIPROC_ENV, workers_in_flight
from qwen_serve.upstream import Upstream, create_upstream
from qwen_serve.gateway.workers import EngineStatus, RunDir, WorkerSpec

if TYPE_CHECKING:
    from qwen_serve.plan import Plan

__all__ = ["KILL_GRACE_S", "READY_TIMEOUT_S", "STABLE_S", "STATUS_INTERVAL_S", "WorkerPool", "restart_delay",
           "run_workers"]

log = logging.getLogger("qwen_serve.workers")

WORKER_MODULE = "qwen_serve.gateway.workers"
READY_TIMEOUT_S = 60.0  # a worker not listening this long after its start is killed (and replaced)
POLL_S = 0.1  # how often the pool looks at its workers
STABLE_S = 30.0  # a worker that ran this long before dying is restarted without back-off
KILL_GRACE_S = 10.0  # after gateway.drain_timeout_s: SIGKILL for a worker still running
STATUS_INTERVAL_S = 0.1  # how often the engine's state is published for the workers
MAX_RESTART_DELAY_S = 30.0


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after ``failures`` quick deaths in a row: 0 for the first, then
    0.5 s doubling, at most :data:`MAX_RESTART_DELAY_S`."""
    return 0.0 if failures <= 1 else min(0.5 * 2.0 ** (failures - 2), MAX_RESTART_DELAY_S)


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    ready_fd: int  # read end of the pipe the worker writes one byte to once it listens (-1: closed)
    started_at: float
    ready: bool = False
    failures: int = 0  # quick deaths in a row of this worker slot

    def poll_ready(self) -> bool | None:
        """True once the worker reported ready, False while it has not, None when it never will (pipe closed)."""
        if self.ready:
            return True
        if self.ready_fd < 0:
            return None
        try:
            data = os.read(self.ready_fd, 1)
        except BlockingIOError:
            return False
        self._close_fd()
        self.ready = data == b"R"
        return True if self.ready else None

    def _close_fd(self) -> None:
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = -1


@dataclass
class WorkerPool:
    """``count`` gateway worker processes for ``config`` (see the module docstring): :meth:`start`, then
    :meth:`watch` until :meth:`drain`. ``limiter``: this host's shared limits (None with another backend),
    for reclaiming a dead worker's leases."""

    config: Config
    count: int
    run: RunDir
    upstream_url: str | None
    engine_status: bool
    limiter: SharedLimiter | None = None
    workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False

    async def _spawn(self, index: int, failures: int = 0) -> _Worker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        spec = WorkerSpec(index=index, config=self.config.model_dump(mode="json"),
                          base_dir=str(self.config.base_dir) if self.config.base_dir else None,
                          upstream_url=self.upstream_url, run_dir=str(self.run.path), ready_fd=write_fd,
                          parent=os.getpid(), engine_status=self.engine_status)
        env = {**os.environ, MULTIPROC_ENV: str(self.run.metrics), "QWEN_SERVE_WORKER": str(index)}
        if self.limiter is not None:
            env[SHARED_LIMITS_ENV] = str(self.limiter.path)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", WORKER_MODULE, stdin=asyncio.subprocess.PIPE, env=env, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(spec.to_json())
        proc.stdin.close()  # the transport flushes the spec, then closes (the worker reads to EOF)
        log.info("gateway worker %d started (pid %d)", index, proc.pid)
        return _Worker(index, proc, read_fd, time.monotonic(), failures=failures)

    async def start(self) -> bool:
        """Start every worker and wait until each listens; False (the others are left running: :meth:`drain`
        stops them) when one exits or does not listen within :data:`READY_TIMEOUT_S`."""
        for index in range(self.count):
            self.workers.append(await self._spawn(index))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._stopping:
            states = [w.poll_ready() for w in self.workers]
            if all(states):
                log.info("%d gateway workers listening on %s:%d", self.count, self.config.gateway.host,
                         self.config.gateway.port)
                return True
            failed = [w for w, s in zip(self.workers, states) if s is None or w.proc.returncode is not None]
            if failed or time.monotonic() > deadline:
                for w in failed or self.workers:
                    log.error("gateway worker %d (pid %d) did not start (%s)", w.index, w.proc.pid,
                              _exit_text(w.proc.returncode) if w.proc.returncode is not None else "not listening")
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def watch(self) -> None:
        """Replace workers that exit (or never listen) until :meth:`drain` is called."""
        while not self._stopping:
            for slot, worker in enumerate(list(self.workers)):
                if self._stopping:
                    return
                if worker.proc.returncode is None:
                    was_ready = worker.ready
                    if worker.poll_ready():
                        if not was_ready:
                            log.info("gateway worker %d listening (pid %d)", worker.index, worker.proc.pid)
                        continue
                    if time.monotonic() - worker.started_at > READY_TIMEOUT_S:
                        log.error("gateway worker %d (pid %d) not listening after %.0f s; killing it", worker.index,
                                  worker.proc.pid, READY_TIMEOUT_S)
                        with contextlib.suppress(ProcessLookupError):
                            worker.proc.kill()
                    continue
                await self._replace(slot, worker)
            await asyncio.sleep(POLL_S)

    async def _replace(self, slot: int, worker: _Worker) -> None:
        code = worker.proc.returncode
        quick = time.monotonic() - worker.started_at < STABLE_S
        failures = worker.failures + 1 if quick else 1
        delay = restart_delay(failures)
        log.error("gateway worker %d (pid %d) %s; restarting it%s", worker.index, worker.proc.pid, _exit_text(code),
                  f" in {delay:.1f} s" if delay else "")
        self._cleanup(worker)
        if delay:
            await asyncio.sleep(delay)
        if self._stopping:
            return
        self.workers[slot] = await self._spawn(worker.index, failures)

    def _cleanup(self, worker: _Worker) -> None:
        """After a worker exited: its rate-limit leases back, its live gauges gone, its pipe closed."""
        worker._close_fd()
        pid = worker.proc.pid
        if self.limiter is not None:
            released = self.limiter.reclaim(pid)
            if released:
                log.info("gateway worker %d: %d rate-limit lease(s) of its requests released", worker.index, released)
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(self.run.metrics))  # type: ignore[no-untyped-call]

    async def drain(self, timeout: float) -> None:
        """SIGTERM every worker (each drains for up to ``timeout`` s), wait for all, SIGKILL those still running
        :data:`KILL_GRACE_S` later; then clean up after each."""
        self._stopping = True
        for worker in self.workers:
            if worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout + KILL_GRACE_S
        while any(w.proc.returncode is None for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        for worker in self.workers:
            if worker.proc.returncode is None:
                log.warning("gateway worker %d (pid %d) still running %.0f s after SIGTERM; killing it",
                            worker.index, worker.proc.pid, timeout + KILL_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
            self._cleanup(worker)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_workers(config: Config, count: int, *, upstream_url: str | None = None, plan: Plan | None = None) -> int:
    """Serve the gateway from ``count`` worker processes (see the module docstring); with ``plan`` (``qwen-serve
    up``) also start and supervise the engine. Returns the exit code."""
    from qwen_serve.serve import check_ports

    try:
        check_ports(config)
    except OSError as exc:
        log.error("%s", exc.strerror)
        return 1
    gw = config.gateway
    if gw.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics (gateway.metrics_port); not served on the main port",
                 gw.host, gw.metrics_port)
    run = RunDir.create()
    try:
        return asyncio.run(_serve(config, count, run, upstream_url, plan))
    finally:
        shutil.rmtree(run.path, ignore_errors=True)


async def _serve(config: Config, count: int, run: RunDir, upstream_url: str | None, plan: Plan | None) -> int:
    gw = config.gateway
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0
    state = EngineState()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("signal %s: draining %d gateway workers (in-flight requests may finish)", sig.name, count)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    def fatal(reason: str) -> None:
        nonlocal exit_code
        log.error("%s", reason)
        exit_code = 1
        stop.set()

    limiter = SharedLimiter.attach(SharedLimiter.create(run.limits)) if config.limits.backend == "local" else None
    engine_url = f"http://{ENGINE_HOST}:{config.engine.port}"
    supervisor: EngineSupervisor | None = None
    monitor: EngineMonitor | None = None
    status: EngineStatus | None = None
    engine_task: asyncio.Task[None] | None = None
    publish_task: asyncio.Task[None] | None = None
    upstream: Upstream | None = None
    if plan is not None:
        upstream = create_upstream(gw.upstream_client, engine_url, connect_timeout=gw.connect_timeout_s,
                                   read_timeout=gw.request_timeout_s)
        supervisor = EngineSupervisor(
            plan.vllm_args, plan.env, upstream, state,
            startup_timeout_s=config.engine.startup_timeout_s, restart=config.engine.restart,
            max_restarts=config.engine.max_restarts, unhealthy_restart_s=config.engine.unhealthy_restart_s,
            on_fatal=fatal,
        )
        monitor = EngineMonitor(upstream, state, in_flight=lambda: workers_in_flight(str(run.metrics)),
                                process_alive=supervisor.process_alive)
        status = EngineStatus.create(run.engine)
        publish_task = asyncio.create_task(_publish(status, state, supervisor), name="engine-status")
        engine_task = asyncio.create_task(supervisor.run(), name="engine")
        monitor.start()
    pool = WorkerPool(config, count, run, upstream_url if plan is None else engine_url, plan is not None, limiter)
    watch_task: asyncio.Task[None] | None = None
    try:
        started = asyncio.create_task(pool.start(), name="workers-start")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([started, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():  # a signal (or the engine's failure) during the workers' start
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
        elif not started.result():
            fatal("a gateway worker could not start")
        if not stop.is_set():
            watch_task = asyncio.create_task(pool.watch(), name="workers")
            await stop.wait()
        stopped.cancel()
    finally:
        state.draining = True
        if status is not None and supervisor is not None:
            _write_status(status, state, supervisor)
        if watch_task is not None:
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        await pool.drain(gw.drain_timeout_s)
        if monitor is not None:
            await monitor.aclose()
        if supervisor is not None:
            await supervisor.stop()
        for task in (engine_task, publish_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if upstream is not None:
            await upstream.aclose()
        if limiter is not None:
            limiter.close()
        if status is not None:
            status.close()
    return exit_code


def _write_status(status: EngineStatus, state: EngineState, supervisor: EngineSupervisor) -> None:
    engine_status = "failed" if state.failed else state.status
    status.write(alive=supervisor.process_alive(), up=state.up, status=engine_status, restarts=state.restarts,
                 draining=state.draining)


async def _publish(status: EngineStatus, state: EngineState, supervisor: EngineSupervisor) -> None:
    while True:
        _write_status(status, state, supervisor)
        await asyncio.sleep(STATUS_INTERVAL_S)

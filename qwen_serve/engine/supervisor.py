"""Run vLLM's OpenAI server as a child process and keep it alive.

Owned by ``qwen_serve.serve`` (``qwen-serve up``); the gateway only sees the shared
:class:`~qwen_serve.engine.state.EngineState`.

* :meth:`EngineSupervisor.run` is what ``qwen-serve up`` runs in the background: :meth:`start`, then
  :meth:`watch`. It returns when :meth:`stop` is called, or after calling ``on_fatal`` once.
* :meth:`EngineSupervisor.start` spawns ``python -m vllm.entrypoints.openai.api_server <plan args>``
  under the guard (:mod:`qwen_serve.engine.guard`: the engine's process-group leader, which takes the
  whole group down when the gateway dies) in its own session (the plan binds the engine to 127.0.0.1),
  logs its output line by line (``qwen_serve.logs.ENGINE_LOGGER``, written as ``[engine] ...``) while
  keeping the last lines, and waits until ``/health`` answers 200. It raises :class:`EngineStartError`
  (carrying those last lines) when the process exits, when ``startup_timeout_s`` passes first (the
  engine is then terminated), or when :meth:`stop` is called meanwhile.
* :meth:`EngineSupervisor.watch` waits for the process; on an unexpected exit it first takes down what
  is left of the old engine's process group (vLLM's EngineCore and workers outlive a crashed API server,
  holding their memory): SIGTERM, a short grace, SIGKILL, and a bounded wait until no process of the group
  is alive (:func:`~qwen_serve.engine.group.reap_group`, off the event loop). Only then does it restart the
  engine (``restart: on-failure``) or call ``on_fatal`` (``restart: never``). Every restart attempt counts
  toward ``max_restarts``, a failed one (exit or time-out during start-up) included; attempt ``n``
  waits :func:`restart_delay` first. Once they are used up, ``on_fatal`` is called.
* An engine that is alive but unhealthy is treated as one that exited: once it was ready, when the health
  monitor's probes have failed for ``unhealthy_restart_s`` in a row (``EngineState.failing_since``,
  counted from no earlier than the moment it became ready; a busy probe, no answer while requests are in
  flight, ends the run), the supervisor logs why and stops its whole group: SIGTERM and SIGCONT (a frozen
  engine acts on the SIGTERM only once continued), SIGKILL after :data:`UNHEALTHY_STOP_TIMEOUT_S`, then
  the same bounded reap. The restart (or ``on_fatal``) follows as after a crash, and counts the same.
  ``unhealthy_restart_s=None`` turns this off; so does a drain (the engine is stopped anyway).
* ``on_fatal`` comes with ``state.failed`` set: the engine is down for good (the gateway's ``/health``
  fails from then on).
* :meth:`EngineSupervisor.stop` sends SIGTERM (and SIGCONT) to the group, then SIGKILL after ``timeout``
  (after :data:`STARTING_STOP_TIMEOUT_S` while the engine is still starting); no restart follows. After the
  engine's leader exits, whatever is left of its group is reaped the same way as after a crash.
* :meth:`EngineSupervisor.process_alive` says whether the engine's process runs; the health monitor
  (:class:`~qwen_serve.engine.state.EngineMonitor`) uses it to tell a busy engine from a dead one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from qwen_serve.engine.group import GROUP_GONE_WITHIN_S, GROUP_TERM_GRACE_S, reap_group, terminate_group
from qwen_serve.engine.guard import guarded_command
from qwen_serve.engine.state import EngineState
from qwen_serve.errors import QwenServeError, UpstreamError
from qwen_serve.upstream import Upstream
from qwen_serve.logs import ENGINE_LOGGER

__all__ = ["ENGINE_MODULE", "STARTING_STOP_TIMEOUT_S", "UNHEALTHY_STOP_TIMEOUT_S", "EngineStartError",
           "EngineSupervisor", "exited", "restart_delay"]

log = logging.getLogger("qwen_serve.engine")

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
MAX_RESTART_DELAY_S = 30.0
# SIGTERM → SIGKILL for an engine still starting (stopped, or past startup_timeout_s). It serves nothing
# yet, and vLLM 0.32's API server does not act on SIGTERM before it has started (its EngineCore does).
STARTING_STOP_TIMEOUT_S = 5.0
EXIT_POLL_S = 0.1  # how often the supervisor looks whether the engine's process has exited
# SIGTERM → SIGKILL for an engine stopped because it stayed unhealthy: it is hung, so a long grace would only
# delay the restart.
UNHEALTHY_STOP_TIMEOUT_S = 5.0
UNHEALTHY_CHECK_S = 0.5  # how often watch() compares the engine's run of failed probes to unhealthy_restart_s


async def exited(proc: asyncio.subprocess.Process, timeout: float | None = None) -> int | None:
    """``proc``'s exit code once it has exited, or None when ``timeout`` s passed first (None: no limit).

    Unlike ``proc.wait()``, this does not also wait for the process's output pipe to close: an engine
    child that outlives the engine (vLLM's EngineCore, when the guard itself was killed) keeps that pipe
    open, and the supervisor must notice the exit to take the group down. Polls ``returncode`` (set by
    asyncio's child watcher) every :data:`EXIT_POLL_S`.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while proc.returncode is None:
        if deadline is None:
            await asyncio.sleep(EXIT_POLL_S)
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(EXIT_POLL_S, remaining))
    return proc.returncode


def restart_delay(attempt: int, base_s: float) -> float:
    """Seconds to wait before restart ``attempt`` (1-based): ``base_s`` doubled per attempt, at most 30 s."""
    return float(min(base_s * 2.0 ** (attempt - 1), MAX_RESTART_DELAY_S))


class EngineStartError(QwenServeError):
    """The engine exited or never became healthy; ``message`` ends with its last log lines."""

    type = "engine_start_error"

    def __init__(self, reason: str, last_lines: Sequence[str]) -> None:
        tail = "\n".join(f"  | {line}" for line in last_lines)
        super().__init__(f"{reason}\nlast engine log lines:\n{tail}" if tail else reason)
        self.reason = reason


class EngineSupervisor:
    """Starts, watches, restarts and stops one engine process (see the module docstring)."""

    def __init__(
        self,
        vllm_args: Sequence[str],
        env: Mapping[str, str],
        upstream: Upstream,
        state: EngineState,
        *,
        startup_timeout_s: float,
        restart: str = "on-failure",
        max_restarts: int = 5,
        backoff_s: float = 2.0,
        unhealthy_restart_s: float | None = None,
        on_fatal: Callable[[str], None] | None = None,
        python: str = sys.executable,
        log_lines: int = 40,
        group_grace_s: float = GROUP_TERM_GRACE_S,
        group_gone_within_s: float = GROUP_GONE_WITHIN_S,
    ) -> None:
        self.argv = [python, "-m", ENGINE_MODULE, *vllm_args]
        self._python = python
        self._env = {**os.environ, **env}
        self._upstream = upstream
        self.state = state
        self._startup_timeout = startup_timeout_s
        self._restart = restart
        self._max_restarts = max_restarts
        self._backoff = backoff_s
        self._unhealthy_restart = unhealthy_restart_s
        self._ready_at: float | None = None  # when the running engine became ready (None: not ready yet)
        self._on_fatal = on_fatal
        self._group_grace = group_grace_s
        self._group_gone_within = group_gone_within_s
        self.last_lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False
        self._starting = False
        self._stop_requested = asyncio.Event()
        self.startup_seconds: float | None = None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: the engine is being (or has been) stopped for good."""
        return self._stopping

    def process_alive(self) -> bool:
        """Whether the engine's process (its guard) runs now: False before the first start, after it
        exited (a crash, during a restart's back-off) and after :meth:`stop`. Cheap: no system call."""
        return self.proc is not None and self.proc.returncode is None

    def unhealthy_for(self, now: float | None = None) -> float | None:
        """Seconds the running engine's ``/health`` probes have failed in a row at monotonic time ``now``
        (default: now), counted from ``state.failing_since`` (the monitor's clock, ``time.monotonic``) but
        from no earlier than the moment this engine became ready. None while the probes pass (or it is
        busy), and before the engine was ready: start-up is ``startup_timeout_s``'s business."""
        since = self.state.failing_since
        if since is None or self._ready_at is None:
            return None
        current = time.monotonic() if now is None else now
        return max(0.0, current - max(since, self._ready_at))

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Start the engine, then watch it. Returns on :meth:`stop` (no failure is reported for a start
        or restart that stop() interrupted) or after ``on_fatal`` was called: the first start failed
        (never retried: a wrong model path or flag would fail again), the engine exited with
        ``restart: never``, or the restarts were used up."""
        try:
            await self.start()
        except EngineStartError as exc:
            if self._stopping:
                log.info("engine start-up interrupted: stopping")
            else:
                self._fail(f"engine failed to start: {exc.message}")
            return
        await self.watch()

    async def start(self) -> None:
        """Spawn the engine and wait until ``/health`` answers 200; returns only then.

        Raises :class:`EngineStartError` when the engine exits first, when ``startup_timeout_s`` passes
        (the engine is terminated; the supervisor can start again), or when :meth:`stop` is called
        meanwhile (then :attr:`stopping` is True; stop() terminates the engine).
        """
        if self._stopping:
            raise EngineStartError("engine not started: stop was requested", [])
        self._starting = True
        try:
            await self._start()
        finally:
            self._starting = False

    async def _start(self) -> None:
        t0 = time.monotonic()
        self._ready_at = None
        self.state.up = False
        self.state.status = "starting"
        proc = await self._spawn()
        if self._stopping:  # stop() ran while the process was being created, before it could see it
            await self._terminate(STARTING_STOP_TIMEOUT_S)
        deadline = t0 + self._startup_timeout
        while True:
            if self._stopping:
                raise EngineStartError("engine start-up interrupted: stop was requested", list(self.last_lines))
            if proc.returncode is not None:
                await self._reap_group()
                await self._drain_pump()
                self.state.status = "failed"
                raise EngineStartError(f"engine exited with code {proc.returncode} during start-up",
                                       list(self.last_lines))
            if await self._healthy() and not self._stopping:  # stop() may have come during the check
                break
            if time.monotonic() > deadline:
                await self._terminate(STARTING_STOP_TIMEOUT_S)
                self.state.status = "failed"
                raise EngineStartError(
                    f"engine did not answer /health within engine.startup_timeout_s={self._startup_timeout:g}s",
                    list(self.last_lines))
            await exited(proc, 0.5)
        self._ready_at = time.monotonic()
        self.startup_seconds = self._ready_at - t0
        self.state.up = True
        self.state.status = "ready"
        log.info("engine healthy after %.1f s (pid %d)", self.startup_seconds, proc.pid)

    async def watch(self) -> None:
        """Wait for the engine to exit or to stay unhealthy for ``unhealthy_restart_s``; then take its group
        down and restart it or report a fatal failure. Returns on stop() or after ``on_fatal`` was called."""
        while not self._stopping:
            assert self.proc is not None
            code, unhealthy_s = await self._exit_or_unhealthy(self.proc)
            if self._stopping:
                return
            self.state.up = False
            self.state.status = "engine_down"
            if unhealthy_s is None:
                reason = f"engine exited with code {code}"
                log.error("engine exited unexpectedly with code %s", code)
                await self._reap_group()  # vLLM's EngineCore/workers outlive a crashed API server
            else:
                reason = (f"engine unhealthy: its /health probes failed for {unhealthy_s:.1f} s "
                          f"(engine.unhealthy_restart_s={self._unhealthy_restart:g})")
                log.error("%s; stopping its process group", reason)
                await self._terminate(UNHEALTHY_STOP_TIMEOUT_S)
            if self._stopping:
                return
            if not await self._restart_until_healthy(reason):
                return

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop for good: SIGTERM the engine's process group, SIGKILL after ``timeout`` (at most
        :data:`STARTING_STOP_TIMEOUT_S` while the engine is still starting); idempotent. Interrupts a
        start-up or a restart back-off in progress; no restart follows."""
        self._stopping = True
        self._stop_requested.set()
        await self._terminate(min(timeout, STARTING_STOP_TIMEOUT_S) if self._starting else timeout)
        self.state.up = False

    # ------------------------------------------------------------------ internals
    async def _exit_or_unhealthy(self, proc: asyncio.subprocess.Process) -> tuple[int | None, float | None]:
        """Wait until ``proc`` exits, returning ``(exit code, None)``, or until :meth:`unhealthy_for` reaches
        ``unhealthy_restart_s`` while the gateway is not draining, returning ``(None, seconds unhealthy)``;
        ``(None, None)`` on stop()."""
        while True:
            code = await exited(proc, UNHEALTHY_CHECK_S)
            if code is not None or self._stopping:
                return code, None
            if self._unhealthy_restart is None or self.state.draining:  # draining: the engine stops anyway
                continue
            unhealthy_s = self.unhealthy_for()
            if unhealthy_s is not None and unhealthy_s >= self._unhealthy_restart:
                return None, unhealthy_s

    async def _restart_until_healthy(self, reason: str) -> bool:
        """Restart with back-off until one start succeeds (True). False when stop() was called, or when
        no restart is allowed (any more): then ``on_fatal`` has been called with ``reason``."""
        while True:
            if self._restart != "on-failure" or self.state.restarts >= self._max_restarts:
                self._fail(f"{reason} (engine.restart={self._restart}, engine.max_restarts={self._max_restarts}, "
                           f"restarts so far {self.state.restarts})")
                return False
            self.state.restarts += 1
            attempt = self.state.restarts
            delay = restart_delay(attempt, self._backoff)
            log.warning("restarting the engine in %.1f s (restart %d of at most %d): %s", delay, attempt,
                        self._max_restarts, reason)
            if await self._stop_requested_within(delay):
                return False
            try:
                await self.start()
                return True
            except EngineStartError as exc:
                if self._stopping:
                    return False
                log.error("engine restart %d failed: %s", attempt, exc.message)
                self.state.status = "engine_down"
                reason = f"engine restart {attempt} failed: {exc.reason}"

    async def _stop_requested_within(self, seconds: float) -> bool:
        """Wait ``seconds`` unless stop() is called first; returns whether it was."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
        return self._stopping

    def _fail(self, reason: str) -> None:
        """The engine is down for good: mark it failed and call ``on_fatal`` (or log, without one)."""
        self.state.up = False
        self.state.status = "failed"
        self.state.failed = True
        if self._on_fatal is not None:
            self._on_fatal(reason)
        else:
            log.error("%s", reason)

    async def _terminate(self, timeout: float) -> None:
        """SIGTERM (and SIGCONT: a frozen engine acts on it only once continued) the engine's group, SIGKILL
        after ``timeout``; then reap what is left of the group."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            terminate_group(proc.pid)
            if await exited(proc, timeout) is None:
                log.warning("engine did not stop within %.0f s; killing it", timeout)
                self._signal(signal.SIGKILL)
                await exited(proc)
        await self._reap_group()
        await self._drain_pump()

    async def _spawn(self) -> asyncio.subprocess.Process:
        log.info("starting engine: %s", " ".join(self.argv[1:3]))
        argv = guarded_command(self.argv, python=self._python, parent=os.getpid())
        self.proc = await asyncio.create_subprocess_exec(
            *argv, env=self._env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        self._pump = asyncio.create_task(self._pump_output(self.proc), name="engine-log")
        return self.proc

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        engine_log = logging.getLogger(ENGINE_LOGGER)
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream limit: skip it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.last_lines.append(line)
            engine_log.info("%s", line)

    async def _drain_pump(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 5)

    async def _healthy(self) -> bool:
        try:
            status, _ = await self._upstream.get_bytes("/health", 2.0)
        except UpstreamError:
            return False
        return status == 200

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the engine's process group (its id is the guard's pid)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _reap_group(self) -> None:
        """Once the engine's leader (the guard) has exited: take down what is left of its group (orphaned
        engine children) and wait, bounded, until none is alive. The group id stays reserved while the
        group has members, so this reaches no other process. Logs what could not be stopped."""
        proc = self.proc
        if proc is None or proc.returncode is None:
            return
        t0 = time.monotonic()
        left = await reap_group(proc.pid, grace=self._group_grace, gone_within=self._group_gone_within)
        if left:
            log.error("engine processes %s still alive %.1f s after SIGKILL of their group", left,
                      time.monotonic() - t0)

"""Run vLLM's OpenAI server as a child process and keep it alive.

Owned by ``qwen_serve.serve`` (``qwen-serve up``); the gateway only sees the shared
:class:`~qwen_serve.engine.state.EngineState`.

* :meth:`EngineSupervisor.start` spawns ``python -m vllm.entrypoints.openai.api_server <plan args>``
  in its own process group (the plan binds it to 127.0.0.1), logs its output line by line
  (``qwen_serve.logs.ENGINE_LOGGER``, written as ``[engine] ...``) while keeping the last lines, and
  waits until ``/health`` answers 200. It raises :class:`EngineStartError` (carrying those last lines)
  when the process exits or ``startup_timeout_s`` passes first.
* :meth:`EngineSupervisor.watch` waits for the process; on an unexpected exit it restarts it
  (``restart: on-failure``, at most ``max_restarts`` times) or calls ``on_fatal`` (``restart: never``).
* :meth:`EngineSupervisor.stop` sends SIGTERM to the group, then SIGKILL after ``timeout``.
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

from qwen_serve.engine.state import EngineState
from qwen_serve.errors import QwenServeError, UpstreamError
from qwen_serve.gateway.upstream import Upstream
from qwen_serve.logs import ENGINE_LOGGER

__all__ = ["ENGINE_MODULE", "EngineStartError", "EngineSupervisor"]

log = logging.getLogger("qwen_serve.engine")

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


class EngineStartError(QwenServeError):
    """The engine exited or never became healthy; ``message`` ends with its last log lines."""

    type = "engine_start_error"

    def __init__(self, reason: str, last_lines: Sequence[str]) -> None:
        tail = "\n".join(f"  | {line}" for line in last_lines)
        super().__init__(f"{reason}\nlast engine log lines:\n{tail}" if tail else reason)
        self.reason = reason


class EngineSupervisor:
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
        on_restart: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        python: str = sys.executable,
        log_lines: int = 40,
    ) -> None:
        self.argv = [python, "-m", ENGINE_MODULE, *vllm_args]
        self._env = {**os.environ, **env}
        self._upstream = upstream
        self.state = state
        self._startup_timeout = startup_timeout_s
        self._restart = restart
        self._max_restarts = max_restarts
        self._on_restart = on_restart
        self._on_fatal = on_fatal
        self.last_lines: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the engine and wait for ``/health``; raises :class:`EngineStartError`."""
        t0 = time.monotonic()
        self.state.up = False
        self.state.status = "starting"
        await self._spawn()
        assert self.proc is not None
        deadline = t0 + self._startup_timeout
        while True:
            if self.proc.returncode is not None:
                await self._drain_pump()
                self.state.status = "failed"
                raise EngineStartError(f"engine exited with code {self.proc.returncode} during start-up",
                                       list(self.last_lines))
            if await self._healthy():
                break
            if time.monotonic() > deadline:
                await self.stop(timeout=10)
                self.state.status = "failed"
                raise EngineStartError(
                    f"engine did not answer /health within engine.startup_timeout_s={self._startup_timeout:g}s",
                    list(self.last_lines))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 0.5)
        self.startup_seconds = time.monotonic() - t0
        self.state.up = True
        self.state.status = "ready"
        log.info("engine healthy after %.1f s (pid %d)", self.startup_seconds, self.proc.pid)

    async def watch(self) -> None:
        """Wait for the engine to exit; restart it or report a fatal failure. Returns on stop()."""
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self.state.up = False
            self.state.status = "engine_down"
            log.error("engine exited unexpectedly with code %s", code)
            if self._restart != "on-failure" or self.state.restarts >= self._max_restarts:
                self.state.status = "failed"
                if self._on_fatal is not None:
                    self._on_fatal(f"engine exited with code {code} (engine.restart={self._restart}, "
                                   f"restarts so far {self.state.restarts})")
                return
            self.state.restarts += 1
            if self._on_restart is not None:
                self._on_restart()
            await asyncio.sleep(min(2.0 ** self.state.restarts, 30.0))
            try:
                await self.start()
            except EngineStartError as exc:
                log.error("engine restart failed: %s", exc.message)
                # loop: proc has exited, the next iteration counts another failure

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the engine's process group, SIGKILL after ``timeout``; idempotent."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            await self._drain_pump()
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("engine did not stop within %.0f s; killing it", timeout)
            self._signal(signal.SIGKILL)
            await proc.wait()
        self.state.up = False
        await self._drain_pump()

    # ------------------------------------------------------------------ internals
    async def _spawn(self) -> None:
        log.info("starting engine: %s", " ".join(self.argv[1:3]))
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self._env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        self._pump = asyncio.create_task(self._pump_output(self.proc), name="engine-log")

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
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

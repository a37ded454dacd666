"""One gateway worker process, and what it shares with the other workers of its host.

``gateway.workers`` > 1 runs the gateway as N processes (started and supervised by :mod:`qwen_serve.workers`);
this module is each one's side. A worker is ``python -m qwen_serve.gateway.workers``: it reads a
:class:`WorkerSpec` (JSON) from its stdin, binds ``gateway.port`` (and ``gateway.metrics_port``) with
``SO_REUSEPORT`` next to its siblings (the kernel spreads new connections over them), builds the app with its
own upstream connection pool and engine monitor, and serves it with the settings of one gateway process
(:func:`qwen_serve.serve.serving_config`). It writes one byte to the spec's ``ready_fd`` once it listens. On
SIGTERM/SIGINT it drains like one gateway process: ``/ready`` 503, new requests 503, in-flight streams may
finish for ``gateway.drain_timeout_s``; then it exits 0. It gets SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), so no worker outlives the supervisor.

Shared between the workers of a host, in the run directory the supervisor made (:class:`RunDir`):

* ``limits``: the rate limits (:class:`~qwen_serve.gateway.limits_shared.SharedLimiter`, chosen by
  ``build_limiter`` through :data:`~qwen_serve.gateway.limits.SHARED_LIMITS_ENV`);
* ``metrics/``: prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``,
  :mod:`qwen_serve.gateway.metrics`), so a scrape of any worker shows them all;
* ``engine``: under ``qwen-serve up``, the engine's state as the supervisor knows it
  (:class:`EngineStatus`: whether its process runs, its status while not ready, its restarts), which each
  worker mirrors into its own :class:`~qwen_serve.engine.state.EngineState` twice a second; its own monitor
  still probes the engine's ``/health``, and ``process_alive`` comes from here.

Each worker reloads the keys file on its own (every ``auth.reload_interval_s``), so for up to that long after an
edit workers may disagree on a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn

from qwen_serve.config import parse_config
from qwen_serve.engine.state import EngineState
from qwen_serve.gateway.app import build_app
from qwen_serve.gateway.metrics import GatewayMetrics
from qwen_serve.gc_tuning import tune_for_serving
from qwen_serve.logs import setup_logging
from qwen_serve.serve import GatewayServer, bind_listeners, uvicorn_config

__all__ = ["ENGINE_STATUSES", "MIRROR_INTERVAL_S", "EngineStatus", "RunDir", "WorkerServer", "WorkerSpec", "main"]

log = logging.getLogger("qwen_serve.workers")

ENGINE_STATUSES = ("starting", "ready", "engine_down", "failed", "draining")
MIRROR_INTERVAL_S = 0.5  # how often a worker copies the supervisor's engine state and syncs its gauges
_PR_SET_PDEATHSIG = 1
_MAGIC = 0x71737765_6E67696E  # "qswengin"
_WORDS = 8  # magic, alive, up, status, restarts, draining, 2 spare


@dataclass(frozen=True)
class RunDir:
    """The files the workers of one gateway share (made by :meth:`create`, removed by the supervisor)."""

    path: Path

    @classmethod
    def create(cls) -> RunDir:
        """A private (0700) directory on ``/dev/shm`` when writable (memory, never written back to disk),
        else in the temporary directory, with an empty ``metrics/``."""
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        path = Path(tempfile.mkdtemp(prefix="qwen-serve-", dir=base))
        (path / "metrics").mkdir()
        return cls(path)

    @property
    def limits(self) -> Path:
        return self.path / "limits"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def engine(self) -> Path:
        return self.path / "engine"


class EngineStatus:
    """The engine's state as the supervisor sees it, in a small shared file (``RunDir.engine``): the
    supervisor :meth:`create`\\ s it and :meth:`write`\\ s it; workers open it and read the properties."""

    def __init__(self, path: str | Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, _WORDS * 8)
        finally:
            os.close(fd)
        self._q = memoryview(self._mm).cast("q")
        if self._q[0] != _MAGIC:
            self.close()
            raise ValueError(f"{path}: not an engine status file")

    @classmethod
    def create(cls, path: str | Path) -> EngineStatus:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _WORDS * 8)
            with mmap.mmap(fd, _WORDS * 8) as mm:
                q = memoryview(mm).cast("q")
                q[3] = ENGINE_STATUSES.index("starting")
                q[0] = _MAGIC
                q.release()
        finally:
            os.close(fd)
        return cls(path)

    def write(self, *, alive: bool, up: bool, status: str, restarts: int, draining: bool) -> None:
        q = self._q
        q[1], q[2] = int(alive), int(up)
        q[3] = ENGINE_STATUSES.index(status) if status in ENGINE_STATUSES else ENGINE_STATUSES.index("engine_down")
        q[4], q[5] = restarts, int(draining)

    def process_alive(self) -> bool:
        """Whether the engine's process runs (the engine monitor's ``process_alive``)."""
        return bool(self._q[1])

    @property
    def status(self) -> str:
        return ENGINE_STATUSES[self._q[3]] if 0 <= self._q[3] < len(ENGINE_STATUSES) else "engine_down"

    @property
    def restarts(self) -> int:
        return int(self._q[4])

    def close(self) -> None:
        if not self._mm.closed:
            self._q.release()
            self._mm.close()


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker on its stdin (JSON; the config's secrets never touch a file)."""

    index: int
    config: dict[str, Any]  # Config.model_dump(mode="json")
    base_dir: str | None  # the config file's directory (relative paths, e.g. the keys file)
    upstream_url: str | None
    run_dir: str
    ready_fd: int
    parent: int
    engine_status: bool  # under qwen-serve up: read RunDir.engine

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerSpec:
        return cls(**json.loads(raw))


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)


def main() -> int:
    """The worker process (see the module docstring); returns its exit code."""
    spec = WorkerSpec.from_json(sys.stdin.buffer.read())
    _die_with_parent(spec.parent)
    setup_logging()
    config = parse_config(spec.config, base_dir=Path(spec.base_dir) if spec.base_dir else None)
    try:
        listeners = bind_listeners(config, reuse_port=True)
    except OSError as exc:
        log.error("gateway worker %d: %s", spec.index, exc.strerror)
        return 1
    run = RunDir(Path(spec.run_dir))
    status = EngineStatus(run.engine) if spec.engine_status else None
    state = EngineState()
    app = build_app(config, upstream_url=spec.upstream_url, state=state,
                    engine_alive=status.process_alive if status is not None else None)
    server = WorkerServer(uvicorn_config(app, config), state, listeners, spec.ready_fd, status,
                          app.fastapi.state.metrics)
    tune_for_serving()
    server.run()
    return server.exit_code


class WorkerServer(GatewayServer):
    """The gateway server of one worker: reports readiness on ``ready_fd`` (one byte, then closed) and, while
    it serves, mirrors the supervisor's engine state and syncs its gauges every :data:`MIRROR_INTERVAL_S`."""

    def __init__(self, config: uvicorn.Config, state: EngineState, listeners: list[socket.socket], ready_fd: int,
                 status: EngineStatus | None, metrics: GatewayMetrics) -> None:
        super().__init__(config, state, listeners)
        self._ready_fd = ready_fd
        self._status = status
        self._metrics = metrics

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._ready_fd, b"R")
            with contextlib.suppress(OSError):
                os.close(self._ready_fd)
            self._ready_fd = -1

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        mirror = asyncio.create_task(self._mirror(), name="engine-mirror")
        try:
            await super().serve(sockets)
        finally:
            mirror.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mirror

    def mirror_once(self) -> None:
        """Copy the supervisor's view (restarts, failed for good, the status while this worker's monitor has
        the engine down) into this worker's engine state, and the state into the gauges."""
        state, status = self.engine_state, self._status
        if status is not None:
            state.restarts = max(state.restarts, status.restarts)
            if status.status == "failed":
                state.failed = True  # down for good: /health fails, as in one gateway process
            if not state.up and status.status != "ready":
                state.status = status.status
        self._metrics.sync_engine(up=state.up, draining=state.draining, restarts=state.restarts)

    async def _mirror(self) -> None:
        while True:
            self.mirror_once()
            await asyncio.sleep(MIRROR_INTERVAL_S)


if __name__ == "__main__":
    raise SystemExit(main())

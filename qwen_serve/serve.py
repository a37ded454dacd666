"""Process entry points behind ``qwen-serve up`` and ``qwen-serve gateway``.

``run_up(config)`` plans, builds the gateway with an engine supervisor attached, and serves with
uvicorn (uvloop + the gateway's httptools protocol, which bounds request heads and the time to receive a
request: :mod:`qwen_serve.gateway.http_protocol`). The gateway listens at once (``/health`` 200, ``/ready`` 503) while the
engine loads. SIGTERM/SIGINT drain: ``/ready`` turns 503 and new requests get 503 + ``Retry-After``,
in-flight requests (streams included) may finish for up to ``gateway.drain_timeout_s``, then the
engine is stopped; a signal while the engine is still loading ends its start-up. Returns the process
exit code: 0 after a drain (also when the signal came during start-up), 1 when the engine could not
start, died with ``restart: never``, or used up ``engine.max_restarts`` (a restart that exits or times
out counts); the last engine log lines are printed. The engine runs under a guard that takes it and
its children down when this process dies, even by SIGKILL (``qwen_serve.engine.guard``).

With ``gateway.metrics_port`` set, the one uvicorn server listens on two sockets bound to
``gateway.host``: ``gateway.port`` and ``gateway.metrics_port`` (same process, event loop, lifespan,
signal handling and drain); the app tells them apart by the local port (``gateway.app.PortRouter``).
A port that cannot be bound ends the start with exit code 1 before the engine is started.

With ``gateway.workers`` above 1 (``auto``: the planned engine's token rate decides, see
:func:`qwen_serve.plan.gateway_sizing`; ``qwen-serve gateway`` resolves ``auto`` to 1) the gateway is N
processes instead: this process starts the engine once and supervises N worker processes that listen on the
same ports (``SO_REUSEPORT``) and only proxy (:mod:`qwen_serve.workers`, :mod:`qwen_serve.gateway.workers`).
With 1 nothing changes: one process, as described above.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import uvicorn

from qwen_serve.config import Config
from qwen_serve.constants import ENGINE_HOST
from qwen_serve.engine.state import EngineState
from qwen_serve.engine.supervisor import EngineSupervisor
from qwen_serve.gc_tuning import tune_for_serving
from qwen_serve.gateway.app import build_app
from qwen_serve.gateway.http_protocol import HttpLimits, gateway_protocol
from qwen_serve.upstream import create_upstream
from qwen_serve.logs import setup_logging

__all__ = ["GatewayServer", "bind_listeners", "check_ports", "run_gateway", "run_up", "uvicorn_config"]

log = logging.getLogger("qwen_serve")


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with the drain flag raised as soon as a shutdown signal arrives.

    ``listeners``: already bound sockets to serve on (``None``: uvicorn binds ``config.host:port``)."""

    def __init__(self, config: uvicorn.Config, state: EngineState,
                 listeners: list[socket.socket] | None = None) -> None:
        super().__init__(config)
        self.engine_state = state
        self.exit_code = 0
        self.listeners = listeners

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super().serve(sockets if sockets is not None else self.listeners)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.engine_state.draining:
            log.info("signal %s: draining (in-flight requests may finish)", sig)
        self.engine_state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown (exit -15); a finished drain is a clean exit.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig == signal.SIGTERM and sig in captured:
            captured.remove(sig)

    def fail(self, reason: str) -> None:
        log.error("%s", reason)
        self.exit_code = 1
        self.engine_state.draining = True
        self.should_exit = True


_Server = GatewayServer  # the earlier name


def uvicorn_config(app: Any, config: Config) -> uvicorn.Config:
    """uvicorn's settings for the gateway: uvloop, the gateway's httptools protocol bound to the
    ``gateway.max_header_bytes`` / ``header_timeout_s`` / ``body_timeout_s`` / ``keep_alive_timeout_s``
    limits (:mod:`qwen_serve.gateway.http_protocol`), no WebSocket protocol (the gateway serves none)."""
    gw = config.gateway
    return uvicorn.Config(
        app, host=gw.host, port=gw.port, loop="uvloop", http=gateway_protocol(HttpLimits.from_config(gw)),
        ws="none", lifespan="on", access_log=gw.log_requests, log_level="info",
        log_config=None,  # uvicorn's loggers propagate to the queued root handler (qwen_serve.logs)
        timeout_graceful_shutdown=int(gw.drain_timeout_s),
        timeout_keep_alive=max(1, round(gw.keep_alive_timeout_s)),  # the protocol uses the exact value
        server_header=False,
    )


_uvicorn_config = uvicorn_config  # the earlier name


def _listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (as uvicorn binds its own: IPv6 when the host has a colon,
    ``SO_REUSEADDR``; with ``reuse_port`` also ``SO_REUSEPORT``, so the gateway's worker processes each bind
    their own and the kernel spreads connections over them). Raises ``OSError`` when the address is taken
    or not local."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock  # not inheritable: the engine (a child process) never holds the gateway's ports


def _ports(config: Config) -> list[tuple[str, int]]:
    gw = config.gateway
    ports = [("gateway.port", gw.port)]
    if gw.metrics_port is not None:
        ports.append(("gateway.metrics_port", gw.metrics_port))
    return ports


def bind_listeners(config: Config, *, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets bound to ``gateway.host`` on ``gateway.port`` and, when set, ``gateway.metrics_port`` (see
    :func:`_listen`). Raises ``OSError`` naming the config key of the port that could not be bound."""
    gw = config.gateway
    sockets: list[socket.socket] = []
    try:
        for key, port in _ports(config):
            try:
                sockets.append(_listen(gw.host, port, reuse_port=reuse_port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {gw.host}:{port} ({key}): {exc.strerror}") from exc
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def check_ports(config: Config) -> None:
    """Raise ``OSError`` (as :func:`bind_listeners`) unless every gateway port can be bound now, by anyone's
    listener with or without ``SO_REUSEPORT``: a second gateway on the same ports fails instead of sharing
    their traffic. The sockets are closed again."""
    for sock in bind_listeners(config):
        sock.close()


def _sockets(config: Config) -> list[socket.socket] | None:
    """The listening sockets when the gateway needs more than uvicorn's one (``gateway.metrics_port``
    set), else ``None`` (uvicorn binds ``gateway.host:gateway.port`` itself). Raises ``OSError``
    naming the config key of the port that could not be bound."""
    gw = config.gateway
    if gw.metrics_port is None:
        return None
    sockets = bind_listeners(config)
    log.info("metrics on http://%s:%d/metrics (gateway.metrics_port); not served on the main port",
             gw.host, gw.metrics_port)
    return sockets


def run_gateway(config: Config, upstream_url: str | None = None) -> int:
    """Serve the gateway in front of an already running engine; returns the exit code. ``gateway.workers``
    above 1 (``auto`` is 1 here: the engine is not planned) serves it from that many processes."""
    setup_logging()
    workers = config.gateway.workers
    if isinstance(workers, int) and workers > 1:
        from qwen_serve.workers import run_workers

        return run_workers(config, workers, upstream_url=upstream_url)
    try:
        listeners = _sockets(config)
    except OSError as exc:
        log.error("%s", exc.strerror)
        return 1
    state = EngineState()
    app = build_app(config, upstream_url=upstream_url, state=state)
    server = GatewayServer(uvicorn_config(app, config), state, listeners)
    tune_for_serving()
    server.run()
    return server.exit_code


def run_up(config: Config) -> int:
    """Plan, start vLLM on 127.0.0.1, serve the gateway; returns the exit code."""
    from qwen_serve.plan import build_plan, detect_gpu

    setup_logging()
    plan = build_plan(config, gpu_visible=detect_gpu())
    for note in plan.gateway_notes:
        log.warning("plan: %s", note)
    if plan.gateway_workers > 1:
        for warning in plan.warnings:
            log.warning("plan: %s", warning)
        from qwen_serve.workers import run_workers

        return run_workers(config, plan.gateway_workers, plan=plan)
    try:
        listeners = _sockets(config)
    except OSError as exc:
        log.error("%s", exc.strerror)
        return 1
    for warning in plan.warnings:
        log.warning("plan: %s", warning)
    state = EngineState()
    gw = config.gateway
    upstream = create_upstream(gw.upstream_client, f"http://{ENGINE_HOST}:{config.engine.port}",
                               connect_timeout=gw.connect_timeout_s, read_timeout=gw.request_timeout_s)
    server: GatewayServer | None = None

    def fatal(reason: str) -> None:
        assert server is not None
        server.fail(reason)

    supervisor = EngineSupervisor(
        plan.vllm_args, plan.env, upstream, state,
        startup_timeout_s=config.engine.startup_timeout_s, restart=config.engine.restart,
        max_restarts=config.engine.max_restarts, unhealthy_restart_s=config.engine.unhealthy_restart_s,
        on_fatal=fatal,
    )
    app = build_app(config, upstream=upstream, state=state, engine_runner=supervisor.run,
                    engine_stopper=supervisor.stop, engine_alive=supervisor.process_alive)
    server = GatewayServer(uvicorn_config(app, config), state, listeners)
    tune_for_serving()
    server.run()
    return server.exit_code

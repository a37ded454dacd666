"""``build_app(config)``: the gateway's ASGI app (FastAPI), importable without vLLM.

Wiring only: routes are thin and call :class:`~qwen_serve.gateway.pipeline.Pipeline` (``/v1/responses``
too; ``GET``/``DELETE /v1/responses/{id}`` answer 404 like an unknown route unless
``gateway.responses_store``); one exception
handler turns every :class:`~qwen_serve.errors.QwenServeError` (and anything unexpected) into the
OpenAI error shape; :class:`~qwen_serve.gateway.middleware.GatewayMiddleware` wraps everything (and logs
what is unexpected). Paths match exactly: ``/health/`` is an unknown route (404), never a redirect.

The lifespan owns the resources: the upstream client (one pooled keep-alive client for the app's
life), the engine monitor, the key-file watcher, and, under ``qwen-serve up``, the engine supervisor
(started in the background so ``/health`` answers and ``/ready`` says 503 while vLLM loads).

Metrics: ``GET /metrics`` (the gateway's series followed by the engine's) and ``GET /metrics/engine``
(the engine's text as is). With ``gateway.metrics_port`` null they are routes of the main app. With it
set they live in a separate small app, :class:`PortRouter` sends every HTTP request that arrived on
that port there (and nothing else reaches it), and the main port answers them 404 like any unknown
route. The engine's text is fetched through one :class:`~qwen_serve.gateway.metrics.EngineScrapeCache`
(``gateway.engine_metrics_cache_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from qwen_serve.config import Config
from qwen_serve.constants import ENGINE_HOST, ROUTES
from qwen_serve.engine.inflight import gauge_reader
from qwen_serve.engine.state import EngineMonitor, EngineState
from qwen_serve.errors import (
    ClientClosedRequest,
    ClientError,
    EngineUnavailable,
    NotFound,
    QwenServeError,
    ServerError,
    error_body,
)
from qwen_serve.gateway.auth import build_authenticator
from qwen_serve.gateway.http_protocol import TIMED_OUT
from qwen_serve.gateway.limits import build_limiter
from qwen_serve.gateway.metrics import EngineScrapeCache, GatewayMetrics, merge_engine_metrics
from qwen_serve.gateway.middleware import GatewayMiddleware
from qwen_serve.gateway.multimodal import ImageGuard, model_accepts_images
from qwen_serve.gateway.pipeline import Pipeline, Stages
from qwen_serve.errors import UpstreamError
from qwen_serve.gateway.types import ASGIApp, Receive, Scope, Send
from qwen_serve.upstream import Upstream, create_upstream

__all__ = ["PortRouter", "build_app"]

log = logging.getLogger("qwen_serve.gateway")

_STATIC = Path(__file__).parent / "static"
# The chat page's answers: its own files only (no inline script or style, nothing from another origin).
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_ENGINE_SCRAPE_TIMEOUT_S = 2.0


def build_app(
    config: Config,
    *,
    upstream_url: str | None = None,
    upstream: Upstream | None = None,
    state: EngineState | None = None,
    engine_runner: Callable[[], Any] | None = None,
    engine_stopper: Callable[[], Any] | None = None,
    engine_alive: Callable[[], bool] | None = None,
) -> Any:
    """Build the gateway for ``config``.

    ``upstream_url`` defaults to the planned engine on ``127.0.0.1:<engine.port>``. Under
    ``qwen-serve up``, ``engine_runner`` (a coroutine function: start the engine, then watch it) runs in
    the background for the app's life and ``engine_stopper`` is awaited at shutdown after in-flight
    requests finished; ``engine_alive`` (the supervisor's ``process_alive``) lets the engine monitor
    tell a busy engine from a dead one. Returns the ASGI app (the FastAPI instance wrapped in the gateway
    middleware); the FastAPI object is reachable as ``app.fastapi`` for tests. With ``gateway.metrics_port`` set,
    the middleware wraps a :class:`PortRouter` instead and the metrics app is ``app.metrics_app``
    (``None`` otherwise); the server must then listen on both ports (``qwen_serve.serve`` does).
    """
    served = (config.model.name,)
    accepts_images = model_accepts_images(config)
    metrics = GatewayMetrics(shared_limiter=config.limits.backend == "redis", images=accepts_images)
    state = state or EngineState()
    url = upstream_url or f"http://{ENGINE_HOST}:{config.engine.port}"
    gw = config.gateway
    # first: a backend that cannot be built stops the start here
    backend_errors = metrics.limiter_backend_errors
    limiter = build_limiter(config.limits, on_backend_error=None if backend_errors is None
                            else lambda op: backend_errors.labels(op).inc())
    upstream = upstream or create_upstream(gw.upstream_client, url, connect_timeout=gw.connect_timeout_s,
                                           read_timeout=gw.request_timeout_s)  # idle read timeout
    auth = build_authenticator(config.auth, config.resolve_path)
    monitor = EngineMonitor(upstream, state, in_flight=gauge_reader(metrics.in_flight.collector),
                            process_alive=engine_alive)
    pipeline = Pipeline(Stages(auth=auth, limiter=limiter, guided=config.guided, upstream=upstream,
                               metrics=metrics, engine=state, served_models=served,
                               request_deadline_s=gw.request_deadline_s, responses_store=gw.responses_store,
                               images=ImageGuard(config.multimodal, accepts_images=accepts_images,
                                                 metrics=metrics.image_counters)))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await auth.start()
        engine_task = asyncio.create_task(engine_runner(), name="engine") if engine_runner else None
        monitor.start()
        try:
            yield
        finally:
            state.draining = True
            await monitor.aclose()
            if engine_stopper is not None:
                await engine_stopper()
            if engine_task is not None:
                engine_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await engine_task
            await auth.aclose()
            await limiter.aclose()
            await upstream.aclose()

    app = FastAPI(title="qwen-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    app.state.engine = state
    app.state.config = config

    async def chat_completions(request: Request) -> Any:
        return await pipeline.generate(request, "/v1/chat/completions")

    async def completions(request: Request) -> Any:
        return await pipeline.generate(request, "/v1/completions")

    async def responses(request: Request) -> Any:
        return await pipeline.responses(request)

    async def stored_response(request: Request) -> Response:
        status, body = await pipeline.stored_response(request, request.path_params["response_id"])
        return Response(body, status_code=status, media_type="application/json")

    async def tokenize(request: Request) -> Any:
        return await pipeline.passthrough(request, "/tokenize")

    async def detokenize(request: Request) -> Any:
        return await pipeline.passthrough(request, "/detokenize")

    async def models(request: Request) -> Response:
        return JSONResponse(await pipeline.models(request))

    async def model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if not model_id:  # "/v1/models/": no redirect to the listing, an unknown route as any other
            raise NotFound("Unknown route")
        return JSONResponse(await pipeline.model(request, model_id))

    async def health(_: Request) -> Response:
        if state.failed:  # the engine is down for good (no restart left): let the orchestrator replace us
            return JSONResponse({"status": "failed"}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": state.describe()}, status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                            headers={"retry-after": "5"})

    async def fetch_engine_text() -> bytes | None:
        try:
            status, text = await upstream.get_bytes("/metrics", _ENGINE_SCRAPE_TIMEOUT_S)
        except UpstreamError:
            return None
        return text if status == 200 else None

    engine_scrapes = EngineScrapeCache(fetch_engine_text, gw.engine_metrics_cache_s)
    app.state.engine_scrapes = engine_scrapes
    engine_text = engine_scrapes.get

    async def metrics_route(_: Request) -> Response:
        text = await engine_text()
        metrics.sync_engine(up=state.up and text is not None, draining=state.draining, restarts=state.restarts)
        body = metrics.render()
        if text is not None:
            body = merge_engine_metrics(body, text)
        return Response(body, media_type=_PROMETHEUS_TEXT)

    async def metrics_engine(_: Request) -> Response:
        text = await engine_text()
        if text is None:
            raise EngineUnavailable("engine metrics are unavailable (engine down)")
        return Response(text, media_type=_PROMETHEUS_TEXT)

    page_files = _page_files() if gw.ui else {}

    async def page_file(request: Request) -> Response:
        """The chat page (``/``), its files (``/static/<name>``) and ``/favicon.ico``; 404 with ``gateway.ui: false``."""
        found = page_files.get(request.url.path)
        if found is None:
            raise NotFound("the chat page is disabled (gateway.ui: false)" if not gw.ui else "Unknown route")
        body, media_type = found
        return Response(body, media_type=media_type, headers=_PAGE_HEADERS)

    endpoints: dict[str, Callable[[Request], Awaitable[Any]]] = {
        "/v1/chat/completions": chat_completions,
        "/v1/completions": completions,
        "/v1/responses": responses,
        "/v1/responses/{response_id}": stored_response,
        "/v1/models": models,
        "/v1/models/{model_id:path}": model,
        "/tokenize": tokenize,
        "/detokenize": detokenize,
        "/health": health,
        "/ready": ready,
        "/metrics": metrics_route,
        "/metrics/engine": metrics_engine,
        "/": page_file,
        "/static/{name}": page_file,
        "/favicon.ico": page_file,
    }
    if endpoints.keys() != ROUTES.keys():
        raise RuntimeError(f"endpoints and ROUTES disagree: {sorted(endpoints.keys() ^ ROUTES.keys())}")
    metrics_routes = [(path, endpoints[path], list(r.methods)) for path, r in ROUTES.items() if r.metrics]
    for path, route in ROUTES.items():
        if route.metrics and gw.metrics_port is not None:
            continue  # served on the metrics port only
        # plain Starlette routes: no body re-validation
        app.add_route(path, endpoints[path], methods=list(route.methods))
    _add_error_handlers(app)

    inner: ASGIApp = app
    metrics_app: FastAPI | None = None
    if gw.metrics_port is not None:
        # No lifespan of its own: the main app's owns the shared resources (upstream, engine state).
        metrics_app = FastAPI(title="qwen-serve metrics", docs_url=None, redoc_url=None, openapi_url=None,
                              redirect_slashes=False)
        for path, endpoint, methods in metrics_routes:
            metrics_app.add_route(path, endpoint, methods=methods)
        _add_error_handlers(metrics_app)
        inner = PortRouter(app, metrics_app, gw.metrics_port)

    wrapped = GatewayMiddleware(inner, metrics=metrics, max_request_bytes=gw.max_request_bytes)
    wrapped.fastapi = app  # type: ignore[attr-defined]
    wrapped.metrics_app = metrics_app  # type: ignore[attr-defined]
    return wrapped


def _page_files() -> dict[str, tuple[bytes, str]]:
    """The chat page's files by URL path, read once: ``/`` is ``static/index.html``, each other file of
    ``static/`` with a known type is ``/static/<name>``, and ``/favicon.ico`` is the SVG icon."""
    files: dict[str, tuple[bytes, str]] = {}
    if not _STATIC.is_dir():
        return files
    for path in sorted(_STATIC.iterdir()):
        media_type = _PAGE_TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        url = "/" if path.name == "index.html" else f"/static/{path.name}"
        files[url] = (path.read_bytes(), media_type)
    if "/static/favicon.svg" in files:
        files["/favicon.ico"] = files["/static/favicon.svg"]
    return files


class PortRouter:
    """Send each HTTP request to ``metrics_app`` when it arrived on ``metrics_port``, else to ``main``.

    The port is the local one of the connection (ASGI ``scope["server"]``), so a client cannot choose
    it with a header. Lifespan events and everything that is not HTTP go to ``main`` only.
    """

    def __init__(self, main: ASGIApp, metrics_app: ASGIApp, metrics_port: int) -> None:
        self.main = main
        self.metrics_app = metrics_app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            if server is not None and server[1] == self.metrics_port:
                await self.metrics_app(scope, receive, send)
                return
        await self.main(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in the OpenAI shape (unknown routes: 404 ``not_found``)."""
    app.add_exception_handler(QwenServeError, _qwen_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _qwen_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QwenServeError)
    if isinstance(exc, ClientClosedRequest):
        return await _client_gone(request, exc)
    if isinstance(exc, ServerError):
        log.warning("%s: %s", type(exc).__name__, exc.message)
    elif not isinstance(exc, ClientError):
        log.error("unexpected %s: %s", type(exc).__name__, exc.message)
    return JSONResponse(exc.to_dict(), status_code=int(exc.status), headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its request was complete: nothing to answer, nothing wrong here. One line at
    debug level, no traceback (none when the connection already logged a body timeout); the 499 is only
    recorded (the server drops a response to a client that has gone)."""
    if TIMED_OUT not in request.scope.get("state", {}):
        log.debug("%s %s: %s (499)", request.method, request.url.path,
                 exc.message if isinstance(exc, QwenServeError) else "the client went away before the request was read")
    return Response(status_code=ClientClosedRequest.status)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == HTTPStatus.NOT_FOUND:
        body = error_body("Unknown route", "invalid_request_error", "not_found")
    elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        body = error_body("Method not allowed for this route", "invalid_request_error", "method_not_allowed")
    else:
        body = error_body(str(exc.detail), "invalid_request_error", exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _unexpected_error(_: Request, exc: Exception) -> Response:
    """The 500 for an exception no other handler took. Not logged here: Starlette raises the exception on
    after this response, and :class:`~qwen_serve.gateway.middleware.GatewayMiddleware` logs it once."""
    return JSONResponse(error_body("internal error in the gateway", "server_error", "internal_error"),
                        status_code=HTTPStatus.INTERNAL_SERVER_ERROR)

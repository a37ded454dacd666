"""Plain ASGI middleware wrapped around the whole gateway (not ``BaseHTTPMiddleware``: that one buffers
and hides client disconnects).

For every HTTP request it:

* takes the client's ``X-Request-ID`` or makes one, stores it in ``scope["state"]["request_id"]`` and
  adds it to the response headers;
* refuses bodies over ``gateway.max_request_bytes`` with 413 (by ``Content-Length`` up front, and by
  counting bytes for chunked uploads, raising :class:`~qwen_serve.errors.RequestTooLarge` from
  ``receive``);
* adds ``Connection: close`` to every 5xx answer, so a client never reuses a connection after a server
  error;
* turns any exception that escapes the application into the last word on the request: before the
  response started, a 500 in the OpenAI shape (code ``internal_error``); after, the exception is kept from
  the server (which then closes the connection of the unfinished response). Either way it is logged here,
  once, through :func:`~qwen_serve.logs.log_server_error` (a traceback at most once a minute per exception
  type, one line otherwise);
* records ``qwen_serve_requests_total`` and ``qwen_serve_request_duration_seconds`` when the response
  ends, with the ``model`` and ``key_id`` labels the pipeline left in ``scope["state"]`` (code ``499`` when
  nothing was sent, or ``408`` when the connection answered a body timeout for the application).
"""

from __future__ import annotations

import logging
import time
import uuid

from qwen_serve.constants import OTHER_ROUTE, PROXIED_ROUTES, REQUEST_ID_HEADER, ROUTE_LABELS
from qwen_serve.errors import RequestTooLarge, ServerError
from qwen_serve.gateway.http_protocol import TIMED_OUT
from qwen_serve.gateway.metrics import OTHER_MODEL, GatewayMetrics
from qwen_serve.gateway.proxy import send_error
from qwen_serve.gateway.types import ASGIApp, Message, Receive, Scope, Send
from qwen_serve.logs import log_server_error

__all__ = ["GatewayMiddleware", "route_label"]

log = logging.getLogger("qwen_serve.gateway")

_RID = REQUEST_ID_HEADER.encode()
_CLOSE = (b"connection", b"close")


def route_label(path: str) -> str:
    """Bounded ``route`` label: a labelled route of :data:`~qwen_serve.constants.ROUTES`, else ``other``."""
    return path if path in ROUTE_LABELS else OTHER_ROUTE


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = b""
        length = -1
        for name, value in scope["headers"]:
            if name == _RID:
                rid = value[:128]
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
        if not rid:
            rid = uuid.uuid4().hex.encode()
        state = scope.setdefault("state", {})
        state["request_id"] = rid.decode("latin-1")
        state["t0"] = t0
        route = route_label(scope["path"])
        status = 0
        limit = self.max_request_bytes

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_RID, rid)]
                if status >= 500:
                    message["headers"].append(_CLOSE)
            await send(message)

        try:
            if length > limit:
                await send_error(send_wrapper, RequestTooLarge(
                    f"request body is {length} bytes; the limit is {limit} (gateway.max_request_bytes)"))
                return
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise RequestTooLarge(
                            f"request body exceeds {limit} bytes (gateway.max_request_bytes)")
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - the last line: nothing unexpected reaches the server
            log_server_error(log, f"{scope.get('method')} {scope['path']}: unexpected error", exc)
            if not status:
                await send_error(send_wrapper, ServerError("internal error in the gateway", code="internal_error"))
        finally:
            model = state.get("model", OTHER_MODEL)
            m = self.metrics
            m.requests.labels(route, model, state.get("key_id", "none"), str(state.get(TIMED_OUT) or status or 499)).inc()
            if route in PROXIED_ROUTES:
                m.request_duration.labels(route, model).observe(time.perf_counter() - t0)

"""The gateway's HTTP/1.1 connection: uvicorn's httptools protocol with bounds on what a client can hold.

:func:`gateway_protocol` returns the protocol class ``qwen_serve.serve`` hands to uvicorn
(``uvicorn.Config(http=...)``). Per connection, beyond uvicorn's own behaviour:

* **Head size.** The request line and headers of a request may take at most ``max_header_bytes``. Past
  that the client gets ``431 Request Header Fields Too Large`` and the connection is closed. Bytes are
  counted as they arrive, before the parser buffers them, so a client never makes the gateway hold more
  than the limit plus one socket read, however it splits its headers. (When a client pipelines, the
  bytes of a head that arrive in the same read as the end of the previous request are not counted: at
  most one read more.)
* **Head time.** The head must be complete within ``header_timeout_s``, counted from the connection's
  opening for its first request and from the first byte of each later request on a kept-alive
  connection; else ``408 Request Timeout`` and close.
* **Body time.** The body must be complete within ``body_timeout_s`` of the end of its head; else
  ``408`` and close when no response was started (the application then sees the client as gone, and
  ``scope["state"][TIMED_OUT]`` holds ``408`` so the request is recorded as such), or just close when the
  application has already answered (e.g. a 413 or 401 sent before the body was read).
* **Idle time.** A kept-alive connection with no request in progress is closed after
  ``keep_alive_timeout_s`` (uvicorn's keep-alive timer, given a float).

The 431 and 408 answers are the OpenAI error shape (``type`` ``invalid_request_error``, ``code``
``request_header_fields_too_large`` / ``request_timeout``) with ``Connection: close`` and an
``X-Request-ID``. After such an answer the gateway stops reading requests, half-closes, and discards what
the client still sends for up to :data:`LINGER_S` seconds or :data:`LINGER_MAX_BYTES` bytes before
closing, so the client reads the answer instead of a connection reset. When an earlier response on the
connection is still being sent (a pipelining client), the connection is closed without an answer.

Cost on the hot path: a request whose head and body arrive in one read arms no timer; a connection arms
one (its first head's) and cancels it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from qwen_serve.config import GatewayConfig
from qwen_serve.errors import error_body

__all__ = ["LINGER_MAX_BYTES", "LINGER_S", "TIMED_OUT", "GatewayHttpProtocol", "HttpLimits", "gateway_protocol"]

log = logging.getLogger("qwen_serve.gateway.http")

LINGER_S = 2.0  # after a 431/408: how long to keep reading (and discarding) before closing
LINGER_MAX_BYTES = 1 << 20  # ... and how many bytes at most
TIMED_OUT = "http_timed_out"  # scope["state"] key: the status the connection answered a request's timeout with
_REQUEST_LINE_BYTES = 16  # method, spaces and "HTTP/1.1\r\n" around the URL, for the exact head count


@dataclass(frozen=True)
class HttpLimits:
    """The per-connection bounds (``gateway.max_header_bytes`` and the three timeouts, in seconds)."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 75.0

    @classmethod
    def from_config(cls, gw: GatewayConfig) -> HttpLimits:
        return cls(max_header_bytes=gw.max_header_bytes, header_timeout_s=gw.header_timeout_s,
                   body_timeout_s=gw.body_timeout_s, keep_alive_timeout_s=gw.keep_alive_timeout_s)


def gateway_protocol(limits: HttpLimits) -> type[GatewayHttpProtocol]:
    """A :class:`GatewayHttpProtocol` class bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": limits})


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limit."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head size, head time and body time bounds of :class:`HttpLimits`
    (use :func:`gateway_protocol` to bind other limits than the defaults)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]  # float seconds
        self._in_head = True  # waiting for (the rest of) a request's head
        self._head_begun = False  # the parser has seen the first byte of that head
        self._head_seen = 0  # bytes received while in the head (an upper bound of the head's size)
        self._awaiting_body = False  # head done, body not complete yet
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # answered 431/408: discarding input until the connection closes
        self._discarded = 0

    # ------------------------------------------------------------------ connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_seen += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
            else:
                self._invalid_request()
            return
        except httptools.HttpParserError:
            self._invalid_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        if self._in_head:
            if self._head_seen > self.limits.max_header_bytes:
                self._head_too_large()
            elif self._head_timer is None and self._head_begun:  # a kept-alive connection's next request
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._awaiting_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._head_begun = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._head_seen > self.limits.max_header_bytes and self._head_size() > self.limits.max_header_bytes:
            raise _HeadTooLarge
        self._in_head = False
        self._head_begun = False
        self._head_seen = 0
        self._awaiting_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_body = False
        self._in_head = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """The gateway serves no WebSocket: an ``Upgrade`` request is answered as plain HTTP, quietly."""
        log.debug("ignored an Upgrade request")

    # ------------------------------------------------------------------ bounds
    def _head_size(self) -> int:
        """The request line and header lines of the head just parsed (without optional whitespace)."""
        return len(self.url) + _REQUEST_LINE_BYTES + sum(len(n) + len(v) + 4 for n, v in self.headers) + 2

    def _head_too_large(self) -> None:
        limit = self.limits.max_header_bytes
        log.info("%s: request line and headers over %d bytes (gateway.max_header_bytes): 431", self._peer(), limit)
        self._refuse(431, "request_header_fields_too_large",
                     f"the request line and headers exceed {limit} bytes (gateway.max_header_bytes)")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._lingering:
            return
        timeout = self.limits.header_timeout_s
        log.info("%s: request headers not received within %g s (gateway.header_timeout_s): 408", self._peer(), timeout)
        self._refuse(408, "request_timeout",
                     f"the request headers were not received within {timeout:g} s (gateway.header_timeout_s)")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._lingering:
            return
        timeout = self.limits.body_timeout_s
        if self.pipeline:  # queued behind an earlier request: uvicorn does not read its body yet
            self._body_timer = self.loop.call_later(timeout, self._body_timed_out)
            return
        cycle = self.cycle
        if cycle.response_started:  # the application answered already: nothing more can be sent
            log.info("%s: request body not received within %g s (gateway.body_timeout_s): closed",
                     self._peer(), timeout)
            self.transport.close()
            return
        log.info("%s: request body not received within %g s (gateway.body_timeout_s): 408", self._peer(), timeout)
        state = cycle.scope.get("state")
        if isinstance(state, dict):
            state[TIMED_OUT] = 408
        # The application sees the client as gone (its receive() answers http.disconnect, its sends are
        # dropped); the connection answers for it.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(408, "request_timeout",
                     f"the request body was not received within {timeout:g} s (gateway.body_timeout_s)",
                     request_id=state.get("request_id") if isinstance(state, dict) else None, in_flight_ok=True)

    # ------------------------------------------------------------------ answering and closing
    def _refuse(self, status: int, code: str, message: str, *, request_id: str | None = None,
                in_flight_ok: bool = False) -> None:
        """Answer ``status`` in the OpenAI shape with ``Connection: close``, then close by lingering. When an
        earlier response is still being sent on this connection, just close (nothing can be inserted)."""
        self._cancel_timers()
        if not in_flight_ok and self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
        rid = (request_id or uuid.uuid4().hex).encode("latin-1", "replace")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\nx-request-id: ", rid, b"\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self._linger()

    def _linger(self) -> None:
        """Stop reading requests, half-close once the answer is written, discard the client's further input
        (bounded in time and bytes), then close."""
        self._lingering = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _invalid_request(self) -> None:
        msg = "Invalid HTTP request received."
        log.info("%s: %s", self._peer(), msg)
        self._cancel_timers()
        self.send_400_response(msg)

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "client"

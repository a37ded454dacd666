"""Stage 4: the upstream hop as an ASGI response.

:class:`ProxyCall` is returned by the pipeline after auth, limits and guided checks passed. When the
server calls it, it sends the prepared request to the engine and relays the answer:

* **SSE** (the client asked ``stream: true`` and the engine answered ``text/event-stream``): bytes go
  out as they arrive, one ``send`` per complete event group, never re-serialised. Only events that
  the hooks must see are parsed (by default only those containing ``"usage"``; every event when the
  hooks set ``inspect_all``, e.g. to validate guided output); an event's data is its ``data:`` line, after
  an optional ``event:`` line (the Responses API names every event). A hook may drop an event (the usage
  chunk the gateway injected) or replace it (the guided verdict added to the last chunk). Partial events
  are held until their ``\\n\\n`` arrives, at most :data:`MAX_PENDING_EVENT_BYTES`: an engine that sends
  more without an event separator ends the call with :class:`UpstreamProtocolError` (code
  ``upstream_protocol_error``: 502 before the response started, else the stream's error event).
* **Other responses** are read whole and passed through (hooks may rewrite the body and add headers).

Every piece of a stream is shown to ``hooks.on_sent`` as it is handed to the server (the pipeline counts
the generated tokens a client was sent, for when the stream is cut short).

Timeouts: the upstream client's read timeout (``gateway.request_timeout_s``) is an *idle* timeout, the
longest the engine may stay silent. ``deadline`` (from ``gateway.request_deadline_s``) is the total one:
when it passes, the call ends like an engine failure (:class:`~qwen_serve.errors.DeadlineExceeded`, 504
before the response started, else the stream's error event) and the upstream response is closed, so the
engine aborts the request.

While the call runs, a watcher waits for ``http.disconnect``; when the client goes away the call is
cancelled and the upstream response is closed, which drops the connection so vLLM aborts the request.

Engine answers are parsed defensively: a body or event that is not JSON, or is nested too deeply to
parse, is relayed unchanged (or, for an error body, replaced by a generic message), never an exception.

Errors before the response started become an OpenAI-shaped JSON error with the right status (engine
error bodies are normalised to the contract's shape; an SSE stream whose first event is an error, as
vLLM sends for a grammar it cannot compile, becomes that HTTP error when the call was built with
``defer_headers``: guided streams send their headers with the first event); after the first byte they
end the stream with exactly one error event: ``data: {"error": ...}``, or what the call's ``error_frame``
makes of the error (the Responses API's ``error`` event). A stream is complete when the engine sends
``data: [DONE]`` or, with ``ends_stream``, an event it recognises as the last (``response.completed``);
the response then ends at once. Whatever happens, ``hooks.on_finish`` runs exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from qwen_serve.constants import SSE_DATA_PREFIX, SSE_DONE, SSE_EVENT_SEPARATOR
from qwen_serve.errors import DeadlineExceeded, QwenServeError, UpstreamError, error_body
from qwen_serve.gateway.types import Receive, Scope, Send
from qwen_serve.upstream import Upstream, UpstreamResponse

__all__ = ["MAX_PENDING_EVENT_BYTES", "ProxyCall", "ProxyHooks", "UpstreamProtocolError", "deadline_scope",
           "normalise_error", "send_error"]

log = logging.getLogger("qwen_serve.gateway")

MAX_PENDING_EVENT_BYTES = 1 << 20  # an incomplete SSE event held for its separator; more is a protocol error
_USAGE_MARK = b'"usage"'
_DONE_EVENT = SSE_DONE + SSE_EVENT_SEPARATOR
_ERROR_EVENT = SSE_DATA_PREFIX + b'{"error"'
_EVENT_FIELD = b"event:"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class UpstreamProtocolError(UpstreamError):
    """The engine's stream broke the SSE framing the gateway relies on (an event larger than
    :data:`MAX_PENDING_EVENT_BYTES`, i.e. no separator)."""

    code = "upstream_protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="protocol")


class ProxyHooks(Protocol):
    """What the pipeline wants to see of a proxied exchange (no method raises; ``on_event`` and ``on_response``
    are awaited: a guided answer's check may wait for a worker thread, never block the event loop)."""

    inspect_all: bool

    def on_first_chunk(self) -> None: ...

    async def on_event(self, event: Mapping[str, Any]) -> bool | bytes:
        """A parsed SSE data event: return True to relay it unchanged, False to drop it from the client's
        stream, or bytes to relay instead (a whole event, e.g. a ``data: ...`` line, without the event
        separator)."""
        ...

    def on_sent(self, data: bytes) -> None:
        """Stream bytes (whole events) about to be handed to the server for the client."""
        ...

    async def on_response(self, status: int, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """A whole (non-SSE) response: return the body to send and extra headers."""
        ...

    def on_finish(self, *, status: int, disconnected: bool, error: QwenServeError | None) -> None: ...


async def send_error(send: Send, exc: QwenServeError, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete OpenAI-shaped JSON error response."""
    body = exc.to_json()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    if extra_headers:
        headers += extra_headers
    await send({"type": "http.response.start", "status": int(exc.status), "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error_frame(exc: QwenServeError) -> bytes:
    """Chat's and completions' mid-stream error event: ``data: {"error": {...}}``."""
    return b"data: " + exc.to_json() + SSE_EVENT_SEPARATOR


def _ends_with_done(data: bytes) -> bool:
    return data.endswith(_DONE_EVENT)


@contextlib.asynccontextmanager
async def deadline_scope(deadline: float | None) -> AsyncIterator[None]:
    """Cancel the block and raise :class:`DeadlineExceeded` if it still runs at ``deadline`` (a
    ``time.perf_counter`` value, possibly past already); None: no limit. Other cancellations (a client
    disconnect) pass through unchanged."""
    if deadline is None:
        yield
        return
    scope = asyncio.timeout(deadline - time.perf_counter())
    try:
        async with scope:
            yield
    except TimeoutError:
        if not scope.expired():
            raise
        raise DeadlineExceeded("the request did not finish within its deadline (gateway.request_deadline_s)") \
            from None


class ProxyCall:
    """One proxied request; an ASGI app that is called exactly once."""

    def __init__(self, upstream: Upstream, method: str, path: str, body: bytes | None,
                 headers: Mapping[str, str], *, stream: bool, hooks: ProxyHooks,
                 defer_headers: bool = False, deadline: float | None = None,
                 error_frame: Callable[[QwenServeError], bytes] = _error_frame,
                 ends_stream: Callable[[bytes], bool] = _ends_with_done) -> None:
        self._upstream = upstream
        self._method = method
        self._path = path
        self._body = body
        self._headers = headers
        self._stream = stream
        self._hooks = hooks
        # Hold a stream's response headers until its first event (guided requests: vLLM reports a
        # grammar it cannot compile as the first event, which then becomes a real HTTP error).
        self._defer_headers = defer_headers
        self._deadline = deadline  # time.perf_counter() by which the call must be over; None: no limit
        self._error_frame = error_frame  # a failure after the first byte, as the stream's last event
        self._ends_stream = ends_stream  # whether relayed bytes end with the stream's last event
        self._started = False
        self._complete = False  # the client has the whole response (an SSE stream up to data: [DONE])
        self._status = 0
        self._resp: UpstreamResponse | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not self._complete:  # after the response is complete this is no abort
                        gone.set()
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        error: QwenServeError | None = None
        try:
            if self._deadline is None:  # the common case, without a context manager per request
                await self._run(send)
            else:
                async with deadline_scope(self._deadline):
                    await self._run(send)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            task.uncancel()
        except OSError:  # the server could not write: the client is gone
            gone.set()
        except QwenServeError as exc:
            if self._complete:  # e.g. the deadline while draining the engine's end: the client has it all
                return
            error = exc
            if isinstance(exc, UpstreamError):  # what the client library raised: no request data in it
                cause = exc.__cause__
                log.warning("upstream %s %s failed (%s): %s: %s", self._method, self._path, exc.kind,
                            type(cause).__name__ if cause else "-", cause)
            with contextlib.suppress(OSError):
                await self._fail(send, exc)
        finally:
            watcher.cancel()
            if self._resp is not None:
                await self._resp.aclose()
            self._hooks.on_finish(status=self._status or (int(error.status) if error else 499),
                                  disconnected=gone.is_set(), error=error)

    async def _fail(self, send: Send, exc: QwenServeError) -> None:
        if not self._started:
            self._status = int(exc.status)
            self._started = True
            await send_error(send, exc)
        else:
            log.warning("stream failed after start: %s", exc.message)
            await send({"type": "http.response.body", "body": self._error_frame(exc), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run(self, send: Send) -> None:
        self._resp = resp = await self._upstream.request(self._method, self._path, self._body, self._headers)
        if self._stream and resp.status == 200 and resp.content_type.startswith("text/event-stream"):
            await self._relay_sse(resp, send)
            return
        body = await resp.read()
        status = resp.status
        content_type = resp.content_type.encode() or b"application/json"
        if status >= 400:
            body, content_type = normalise_error(status, body), b"application/json"
        body, extra = await self._hooks.on_response(status, body)
        await self._send_whole(send, status, body, content_type, extra)

    async def _send_whole(self, send: Send, status: int, body: bytes, content_type: bytes,
                          extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or ())]
        self._status = status
        self._started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_sse(self, resp: UpstreamResponse, send: Send) -> None:
        hooks = self._hooks
        inspect_all = hooks.inspect_all
        first = True
        pending = b""
        if not self._defer_headers:
            await self._start_sse(send)
        chunks = resp.aiter_chunks()
        async for chunk in chunks:
            if pending:
                chunk = pending + chunk
            cut = chunk.rfind(SSE_EVENT_SEPARATOR)
            if cut < 0:  # no complete event yet
                pending = chunk
                if len(pending) > MAX_PENDING_EVENT_BYTES:
                    raise _oversized_event()
                continue
            cut += len(SSE_EVENT_SEPARATOR)
            pending = chunk[cut:]  # one read's tail at most; an incomplete event that keeps growing is caught above
            ready = chunk[:cut] if pending else chunk
            if first:
                first = False
                if not self._started:
                    if ready.startswith(_ERROR_EVENT):  # refused before any token: a real HTTP error
                        await self._refuse(send, ready)
                        return
                    await self._start_sse(send)
                hooks.on_first_chunk()
            if inspect_all or _USAGE_MARK in ready:
                ready = await _filter_events(ready, hooks, inspect_all)
                if not ready:
                    continue
            hooks.on_sent(ready)
            if self._ends_stream(ready):  # end the response now: clients may hang up right at [DONE]
                self._complete = True
                await send({"type": "http.response.body", "body": ready, "more_body": False})
                with contextlib.suppress(QwenServeError):  # drain (normally nothing) to reuse the connection
                    async for _ in chunks:
                        pass
                return
            await send({"type": "http.response.body", "body": ready, "more_body": True})
        if not self._started:  # the engine closed the stream without a single complete event
            raise UpstreamError("the engine ended the stream before any event", kind="protocol")
        if pending:
            hooks.on_sent(pending)
            await send({"type": "http.response.body", "body": pending, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start_sse(self, send: Send) -> None:
        self._status = 200
        self._started = True
        await send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})

    async def _refuse(self, send: Send, events: bytes) -> None:
        """vLLM streams some refusals (e.g. a grammar it cannot compile) as a lone error event after a
        200; since nothing was sent yet, answer with the HTTP status the error carries instead."""
        payload = events.split(SSE_EVENT_SEPARATOR, 1)[0][len(SSE_DATA_PREFIX):]
        try:
            code = json.loads(payload)["error"].get("code")
        except (ValueError, KeyError, AttributeError, TypeError, RecursionError):
            code = None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        self._complete = True
        await self._send_whole(send, status, normalise_error(status, payload), b"application/json")


def _oversized_event() -> UpstreamProtocolError:
    return UpstreamProtocolError(f"the engine sent more than {MAX_PENDING_EVENT_BYTES} bytes without an SSE event "
                                 "separator")


async def _filter_events(data: bytes, hooks: ProxyHooks, inspect_all: bool) -> bytes:
    """Parse each complete data event the hooks must see, keep what they keep (bytes unchanged unless the
    hook returned replacement bytes).

    Unless ``inspect_all``, only events containing ``"usage"`` are parsed: a read often coalesces many
    content events with the final usage event, and parsing all of them was the top cost of a stream.
    """
    out = []
    for event in data.split(SSE_EVENT_SEPARATOR):
        if not event:
            continue
        keep: bool | bytes = True
        start = _data_start(event)
        if start > 0 and event[start:start + 1] == b"{" and (inspect_all or _USAGE_MARK in event):
            try:
                obj = json.loads(event[start:])
            except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse: relayed as is
                obj = None
            if isinstance(obj, dict):
                keep = await hooks.on_event(obj)
        if keep is False:
            continue
        out.append(keep if isinstance(keep, bytes) else event)
        out.append(SSE_EVENT_SEPARATOR)
    return b"".join(out)


def _data_start(event: bytes) -> int:
    """Where the data of one SSE event starts: after ``data: `` on its first line, or on the line after an
    ``event:`` line; -1 for anything else (comments, other fields: relayed unparsed)."""
    if event.startswith(SSE_DATA_PREFIX):
        return len(SSE_DATA_PREFIX)
    if event.startswith(_EVENT_FIELD):
        at = event.find(b"\n" + SSE_DATA_PREFIX)
        if at >= 0:
            return at + 1 + len(SSE_DATA_PREFIX)
    return -1


_PARAM_IN_MESSAGE = re.compile(r"\(parameter=([A-Za-z_][\w.\[\]]*)")
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_exceeded"}


def normalise_error(status: int, body: bytes) -> bytes:
    """An engine error body in the contract's shape.

    vLLM answers ``{"error": {"message", "type": "BadRequestError", "param": null, "code": 400}}`` and
    names the parameter only inside the message (``(parameter=max_tokens, value=...)``); clients get
    ``type`` per status (``invalid_request_error`` for 4xx), ``param`` recovered from the message,
    and the engine's message unchanged. 5xx become ``upstream_error``. Error path only.
    """
    message, param, code = f"engine error (HTTP {status})", None, None
    try:
        obj = json.loads(body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param") if isinstance(err.get("param"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(obj, dict) and isinstance(obj.get("detail"), str):  # FastAPI-style {"detail": ...}
            message = obj["detail"]
    except (ValueError, RecursionError):
        pass
    if param is None and (found := _PARAM_IN_MESSAGE.search(message)):
        param = found.group(1)
    if status >= 500:
        return json.dumps(error_body(message, UpstreamError.type, code or UpstreamError.code, param)).encode()
    return json.dumps(error_body(message, _TYPES.get(status, "invalid_request_error"), code, param)).encode()

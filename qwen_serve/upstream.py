"""The upstream hop: one pooled keep-alive HTTP client to the engine (used by the gateway and the engine
supervisor alike, so neither package imports the other for it).

The gateway's hot path. :class:`Upstream` is the interface the proxy uses; three implementations exist
because the choice was measured (``benchmarks/RESULTS.md``): :class:`HttptoolsUpstream` (default: the
gateway's own HTTP/1.1 client on ``httptools``, the least CPU per streamed event, plain ``http://`` only),
:class:`AiohttpUpstream` (any other scheme) and :class:`HttpxUpstream`. Each keeps one connection pool for
the app's lifetime (created in the lifespan, closed with :meth:`Upstream.aclose`).

Errors from the client library are re-raised, inside :func:`map_upstream_errors`, as
:class:`~qwen_serve.errors.UpstreamError` (connect/protocol, 502) or
:class:`~qwen_serve.errors.UpstreamTimeout` (504), with ``kind`` set for the
``qwen_serve_upstream_errors_total{kind}`` metric (the httptools client raises them itself, with the
underlying error as ``__cause__``).

``read_timeout`` is an idle timeout: the longest the engine may stay silent, before the response headers or
between two reads of a body, while the proxy is waiting for it (time spent writing to a slow client does not
count). It costs one timer per request, re-armed at most once per ``read_timeout``, never one per read.

A response must be either read to the end or closed with :meth:`UpstreamResponse.aclose`; closing a
response that was not read to the end drops its connection, which is how the engine learns that the
client went away (vLLM aborts the request when its client disconnects).

Idle pooled connections are not reused after :data:`IDLE_S` seconds: vLLM's server closes keep-alive
connections idle for ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE`` (5 s by default), and a request sent on a
connection the engine is closing at that moment fails (a reset or a disconnect, answered 502). The
client must give up an idle connection before the server does; engines ``qwen-serve`` starts get a much
longer keep-alive (``plan.ENGINE_KEEP_ALIVE_S``), since a stalled gateway counts idle time from later
than the engine does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Protocol, cast

from qwen_serve.errors import UpstreamError, UpstreamTimeout

__all__ = ["IDLE_S", "AiohttpUpstream", "HttptoolsUpstream", "HttpxUpstream", "Upstream", "UpstreamResponse",
           "create_upstream", "map_upstream_errors"]

IDLE_S = 4.0  # below vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE default of 5 s (see the module docstring)


class UpstreamResponse(Protocol):
    status: int
    content_type: str

    def aiter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (no re-chunking, no buffering)."""
        ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None:
        """Release the response; drops the connection when the body was not fully read."""
        ...


class Upstream(Protocol):
    base_url: str

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send a request; returns once the status line and headers arrived."""
        ...

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        """Small control-plane GET (health, metrics) with its own short timeout."""
        ...

    async def aclose(self) -> None: ...


@contextlib.contextmanager
def map_upstream_errors() -> Iterator[None]:
    """Translate aiohttp/httpx/OS errors into :class:`UpstreamError` / :class:`UpstreamTimeout`."""
    try:
        yield
    except UpstreamError:
        raise
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise UpstreamTimeout("the engine did not answer in time") from exc
    except Exception as exc:  # aiohttp.ClientError, httpx.HTTPError, OSError, ...
        name = type(exc).__name__
        if "Timeout" in name:
            raise UpstreamTimeout("the engine did not answer in time") from exc
        kind = "connect" if ("Connect" in name or isinstance(exc, OSError)) else "protocol"
        raise UpstreamError(f"engine connection failed ({kind})", kind=kind) from exc


# ------------------------------------------------------------------------------------------- httptools
_HIGH_WATER = 256 * 1024  # buffered body bytes at which a connection stops reading until the proxy catches up
_CONTROL = str.maketrans("", "", "\r\n")


class _Exchange:
    """One request/response on a :class:`_Connection`: the ``httptools`` parser's callbacks and the body
    buffer the proxy drains. At most one coroutine waits on it at a time (the request for its headers, then
    the reader of its body)."""

    __slots__ = ("status", "content_type", "_conn", "_parser", "_chunks", "_buffered", "_waiter", "_since",
                 "_timeout", "_timer", "_headers_done", "_complete", "_eof_framed", "_error", "_keep_alive",
                 "_messages")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        import httptools

        self.status = 0
        self.content_type = ""
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._since: float | None = None  # loop time the current wait began (the engine's silence)
        self._timeout = timeout
        self._timer = conn.loop.call_later(timeout, self._check_idle) if timeout else None
        self._headers_done = False
        self._complete = False
        self._eof_framed = True  # no content-length and not chunked: the body ends with the connection
        self._error: UpstreamError | None = None
        self._keep_alive = False
        self._messages = 0

    # -- parser callbacks (httptools calls them by name) ---------------------------------------------------
    def on_message_begin(self) -> None:
        self._messages += 1  # a second message on one exchange: the engine broke HTTP; never reuse

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self._eof_framed = False

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive() and self._messages == 1
        self._wake()

    # -- connection events ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        import httptools

        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError("engine connection failed (protocol)", kind="protocol"), exc)

    def lost(self, exc: BaseException | None) -> None:
        if self._complete:
            return
        if exc is None and self._headers_done and self._eof_framed:
            self._complete = True  # a body delimited by the end of the connection
            self._wake()
            return
        kind = "connect" if not self._headers_done and isinstance(exc, OSError) else "protocol"
        self.fail(UpstreamError(f"engine connection failed ({kind})", kind=kind),
                  exc or ConnectionResetError("the engine closed the connection"))

    def fail(self, error: UpstreamError, cause: BaseException) -> None:
        if self._error is None and not self._complete:
            error.__cause__ = cause
            self._error = error
            self._conn.close()
        self._wake()

    def _check_idle(self) -> None:
        since, timeout, now = self._since, self._timeout, self._conn.loop.time()
        assert timeout is not None
        if since is not None and now - since >= timeout:
            self._timer = None
            exc = TimeoutError(f"the engine sent nothing for {timeout:g} s")
            timed_out = UpstreamTimeout("the engine did not answer in time")
            timed_out.__cause__ = exc
            if self._error is None:
                self._error = timed_out
                self._conn.close()
            self._wake()
            return
        self._timer = self._conn.loop.call_later(timeout if since is None else since + timeout - now,
                                                 self._check_idle)

    # -- the waiting side -----------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the parser or the connection has news; raises the exchange's error."""
        loop = self._conn.loop
        self._waiter = waiter = loop.create_future()
        self._since = loop.time()
        try:
            await waiter
        finally:
            self._since = None
            self._waiter = None

    async def headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunks = self._chunks
            if chunks:
                self._chunks = []
                if self._buffered > _HIGH_WATER:
                    self._conn.resume()
                self._buffered = 0
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_chunks()])

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.finish(self._complete and self._keep_alive and self._error is None)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the engine, one :class:`_Exchange` at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[_Connection], None]) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self._release = release
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the engine broke HTTP (or is closing); drop it
            self.close()
            return
        exchange.feed(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.lost(exc)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool when ``reusable``, else closed (an engine that sees the
        connection drop before the end of its answer aborts the request)."""
        self.exchange = None
        self.resume()
        if reusable and not self.closed:
            self.idle_since = self.loop.time()
            self._release(self)
        else:
            self.close()


class HttptoolsUpstream:
    """A keep-alive HTTP/1.1 client of its own to one ``http://`` engine: ``asyncio`` connections parsed
    by ``httptools`` (uvicorn's parser). On the hot path a body read is one parser callback and, when the
    proxy waits, one future: no stream-reader layers and no timer per read (one idle timer per exchange,
    re-armed at most once per ``read_timeout``). Connections are pooled most-recently-used first, without
    a limit, and not reused after :data:`IDLE_S` idle seconds. Bodies over 256 KiB not yet taken by the
    proxy pause reading from the engine.
    """

    # Measured against aiohttp: 60.5 → 52.1 µs of gateway CPU per relayed event, −14% (benchmarks/RESULTS.md,
    # 2026-12-05, "CPU per relayed event").

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float) -> None:
        from urllib.parse import urlsplit

        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the httptools client speaks plain http:// only, not {self.base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._prefix = parts.path
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if parts.port is None else f"{host}:{self._port}"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False

    def _release(self, conn: _Connection) -> None:
        idle = self._idle
        if self._closed:
            conn.close()
            return
        idle.append(conn)
        horizon = conn.idle_since - IDLE_S
        while idle and (idle[0].closed or idle[0].idle_since <= horizon):  # the oldest first: drop the expired
            idle.popleft().close()

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        with map_upstream_errors():
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop, self._release), self._host,
                                                       self._port)
        return conn

    def _head(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {self._prefix}{path} HTTP/1.1", f"host: {self._host_header}"]
        if headers:
            lines += [f"{k.translate(_CONTROL)}: {v.translate(_CONTROL)}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"content-length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None, *, timeout: float | None = None) -> _Exchange:
        conn = await self._connection()
        exchange = conn.exchange = _Exchange(conn, timeout or self._read_timeout)
        assert conn.transport is not None
        head = self._head(method, path, body, headers)
        conn.transport.write(head + body if body else head)
        try:
            await exchange.headers()
        except BaseException:
            await exchange.aclose()  # not complete: the connection is dropped
            raise
        return exchange

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        exchange: _Exchange | None = None
        try:
            async with asyncio.timeout(timeout):
                exchange = await self.request("GET", path, timeout=timeout)
                return exchange.status, await exchange.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("the engine did not answer in time") from exc
        finally:
            if exchange is not None:
                await exchange.aclose()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


# --------------------------------------------------------------------------------------------- aiohttp
class _IdleWatch:
    """The idle read timeout of one streamed body, with one timer per stream instead of one per read.

    The reader sets :attr:`since` to the loop time when it starts waiting for the engine and back to None
    when bytes came (time spent sending to a slow client is not the engine's silence). The timer fires
    ``timeout`` s after it was armed; if the reader has been waiting that long it calls ``fail`` with a
    ``TimeoutError``, else it re-arms for the rest of the period. Per read that is two attribute stores,
    where aiohttp's ``sock_read`` cancels and creates a timer for every read."""

    __slots__ = ("since", "_loop", "_timeout", "_fail", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 fail: Callable[[BaseException], None]) -> None:
        self.since: float | None = None
        self._loop = loop
        self._timeout = timeout
        self._fail = fail
        self._handle: asyncio.TimerHandle | None = loop.call_later(timeout, self._check)

    def _check(self) -> None:
        since, now = self.since, self._loop.time()
        if since is not None and now - since >= self._timeout:
            self._handle = None
            self._fail(TimeoutError(f"the engine sent nothing for {self._timeout:g} s"))
            return
        rest = self._timeout if since is None else since + self._timeout - now
        self._handle = self._loop.call_later(rest, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _AiohttpResponse:
    __slots__ = ("_resp", "status", "content_type", "_idle_s")

    def __init__(self, resp: "aiohttp.ClientResponse",  # type: ignore[name-defined] # noqa: F821
                 idle_s: float | None) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("content-type", "")
        self._idle_s = idle_s

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, read straight from aiohttp's ``StreamReader.readany`` (no iterator
        objects in between). The idle read timeout (``read_timeout``) is kept by an :class:`_IdleWatch`
        for the whole body, and aiohttp's own per-read timer is switched off for this connection."""
        content = self._resp.content
        loop = asyncio.get_running_loop()
        watch = None
        if self._idle_s:
            connection = self._resp.connection
            protocol = connection.protocol if connection is not None else None
            if protocol is not None and hasattr(protocol, "read_timeout"):
                protocol.read_timeout = None  # the timer armed by the last read is dropped at the next one
                watch = _IdleWatch(loop, self._idle_s, content.set_exception)
        readany = content.readany
        clock = loop.time
        try:
            with map_upstream_errors():
                while True:
                    if watch is not None:
                        watch.since = clock()
                        chunk = await readany()
                        watch.since = None
                    else:
                        chunk = await readany()
                    if not chunk:
                        return
                    yield chunk
        finally:
            if watch is not None:
                watch.cancel()

    async def read(self) -> bytes:
        with map_upstream_errors():
            data: bytes = await self._resp.read()
            return data

    async def aclose(self) -> None:
        if not self._resp.closed:
            # Not read to the end → close() drops the connection (the engine sees a disconnect).
            if self._resp.content.at_eof():
                self._resp.release()
            else:
                self._resp.close()


class AiohttpUpstream:
    """aiohttp ``ClientSession`` with an unlimited keep-alive pool to one engine."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float) -> None:
        import aiohttp

        self.base_url = base_url.rstrip("/")
        self._aiohttp = aiohttp
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> "aiohttp.ClientSession":  # type: ignore[name-defined] # noqa: F821
        if self._session is None:  # created lazily inside the running loop
            connector = self._aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=IDLE_S)
            self._session = self._aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> _AiohttpResponse:
        with map_upstream_errors():
            resp = await self._get_session().request(method, self.base_url + path, data=body, headers=headers)
        return _AiohttpResponse(resp, self._read_timeout)

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        t = self._aiohttp.ClientTimeout(total=timeout)
        with map_upstream_errors():
            async with self._get_session().get(self.base_url + path, timeout=t) as resp:
                return resp.status, await resp.read()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ----------------------------------------------------------------------------------------------- httpx
class _HttpxResponse:
    def __init__(self, resp: "httpx.Response") -> None:  # type: ignore[name-defined] # noqa: F821
        self._resp = resp
        self.status = resp.status_code
        self.content_type = resp.headers.get("content-type", "")

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        with map_upstream_errors():
            async for chunk in self._resp.aiter_raw():
                yield chunk

    async def read(self) -> bytes:
        with map_upstream_errors():
            data: bytes = await self._resp.aread()
            return data

    async def aclose(self) -> None:
        await self._resp.aclose()


class HttpxUpstream:
    """One shared ``httpx.AsyncClient`` (HTTP/1.1 keep-alive pool) to one engine."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._httpx = httpx
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=IDLE_S),
            trust_env=False,
        )

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> _HttpxResponse:
        req = self._client.build_request(method, path, content=body, headers=headers)
        with map_upstream_errors():
            resp = await self._client.send(req, stream=True)
        return _HttpxResponse(resp)

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        with map_upstream_errors():
            resp = await self._client.get(path, timeout=timeout)
        return resp.status_code, resp.content

    async def aclose(self) -> None:
        await self._client.aclose()


def create_upstream(kind: str, base_url: str, *, connect_timeout: float, read_timeout: float) -> Upstream:
    """Build the configured upstream client (``gateway.upstream_client``). ``httptools`` speaks plain
    ``http://`` only; for another scheme it falls back to aiohttp."""
    if kind == "httptools":
        if base_url.startswith("http://"):
            return HttptoolsUpstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout)
        kind = "aiohttp"
    if kind == "aiohttp":
        return AiohttpUpstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout)
    if kind == "httpx":
        return HttpxUpstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout)
    raise ValueError(f"gateway.upstream_client: unknown client {kind!r} (httptools, aiohttp, httpx)")

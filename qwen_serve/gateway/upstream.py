"""The upstream hop: one pooled keep-alive HTTP client to the engine.

The gateway's hot path. :class:`Upstream` is the interface the proxy uses; two implementations exist
because the choice was measured (``benchmarks/RESULTS.md``): :class:`AiohttpUpstream` (default) and
:class:`HttpxUpstream`. Both keep one connection pool for the app's lifetime (created in the
lifespan, closed with :meth:`Upstream.aclose`).

Errors from the client library are re-raised, inside :func:`map_upstream_errors`, as
:class:`~qwen_serve.errors.UpstreamError` (connect/protocol, 502) or
:class:`~qwen_serve.errors.UpstreamTimeout` (504), with ``kind`` set for the
``qwen_serve_upstream_errors_total{kind}`` metric.

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
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Protocol

from qwen_serve.errors import UpstreamError, UpstreamTimeout

__all__ = ["IDLE_S", "AiohttpUpstream", "HttpxUpstream", "Upstream", "UpstreamResponse", "create_upstream",
           "map_upstream_errors"]

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


# --------------------------------------------------------------------------------------------- aiohttp
class _AiohttpResponse:
    def __init__(self, resp: "aiohttp.ClientResponse") -> None:  # type: ignore[name-defined] # noqa: F821
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("content-type", "")

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        with map_upstream_errors():
            async for chunk in self._resp.content.iter_any():
                yield chunk

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
        return _AiohttpResponse(resp)

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
    """Build the configured upstream client (``gateway.upstream_client``)."""
    if kind == "aiohttp":
        return AiohttpUpstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout)
    if kind == "httpx":
        return HttpxUpstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout)
    raise ValueError(f"gateway.upstream_client: unknown client {kind!r} (aiohttp, httpx)")

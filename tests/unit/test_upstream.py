"""qwen_serve.upstream: pooled connections are given up before the engine closes them."""

from __future__ import annotations

import asyncio

import pytest

from qwen_serve import upstream as upstream_mod

VLLM_KEEP_ALIVE_S = 5.0  # vLLM 0.32's VLLM_HTTP_TIMEOUT_KEEP_ALIVE default


def test_idle_limit_is_below_the_engines_keep_alive() -> None:
    """Below vLLM's default (an engine qwen-serve did not start), and far below what qwen-serve sets for the
    engines it starts (margin for a stalled gateway)."""
    from qwen_serve.config import parse_config
    from qwen_serve.plan import ENGINE_KEEP_ALIVE_S, build_plan

    assert 0 < upstream_mod.IDLE_S < VLLM_KEEP_ALIVE_S
    assert ENGINE_KEEP_ALIVE_S >= 10 * upstream_mod.IDLE_S
    for device in ("cpu", "cuda"):
        config = parse_config({"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}, "engine": {"device": device}})
        env = build_plan(config, gpu_visible=device == "cuda").env
        assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == str(ENGINE_KEEP_ALIVE_S)


class _KeepAliveServer:
    """HTTP/1.1 keep-alive server answering ``{}``; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.parametrize("kind", ["aiohttp", "httptools", "httpx"])
async def test_idle_connections_are_not_reused(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_mod, "IDLE_S", 0.4)  # read when the pool is created
    fake = _KeepAliveServer()
    async with fake as url:
        up = upstream_mod.create_upstream(kind, url, connect_timeout=5, read_timeout=5)
        try:
            async def call() -> None:
                resp = await up.request("POST", "/v1/chat/completions", b'{"a": 1}',
                                        {"content-type": "application/json"})
                assert resp.status == 200 and await resp.read() == b"{}"
                await resp.aclose()

            await call()
            await asyncio.sleep(0.1)
            await call()
            assert fake.connections == 1  # kept alive while recently used
            await asyncio.sleep(0.6)
            await call()
            assert fake.connections == 2  # idle past IDLE_S: a new connection, not the old one
        finally:
            await up.aclose()

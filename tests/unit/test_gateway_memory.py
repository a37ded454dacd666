"""The gateway's memory under slow readers: 200 concurrent streams whose clients read slowly keep the
gateway process's RSS growth bounded (``qwen-serve gateway`` in front of the built-in stub engine).

Each stream asks for far more than its client reads in the test's time (2,000 events of ~300 bytes, read
at 1 KiB every 50 ms through a 4 KiB receive buffer), so every stream's backlog piles up somewhere in the
gateway unless the relay is flow-controlled end to end (uvicorn's write buffer holds the gateway's ``send``,
which holds the upstream read, which holds the engine). Measured on a 2-vCPU VM: the gateway's RSS grew by
9-10 MiB over its warm baseline of 64 MiB with 200 such streams (~50 KiB per stream: connections, the ASGI
and aiohttp buffers of one read each). The bound asserted, :data:`MAX_GROWTH_MIB` (64 MiB), leaves a wide
margin for allocator noise while still catching a relay that buffers a stream's backlog (~350 KiB a stream
left unread here, i.e. ~70 MiB in all).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qwen_serve.bench.stub import StubProcess, start_stub
from tests.conftest import free_port, wait_ready

STREAMS = 200
MAX_GROWTH_MIB = 64
READ_S = 12.0  # how long the slow clients read before the peak is taken
MODEL = "qwen2-random"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """``(port, pid)`` of a ``qwen-serve gateway`` (auth off) in front of the stub."""
    with start_stub(chunks_default=16) as stub:
        port = free_port()
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump({"model": {"source": "x", "served_name": MODEL}, "auth": {"enabled": False},
                                       "gateway": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 1}}))
        proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(cfg),
                                 "--upstream", stub.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}", timeout=30)
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _request(port: int, max_tokens: int) -> bytes:
    body = (b'{"model": "' + MODEL.encode() + b'", "stream": true, "max_tokens": ' + str(max_tokens).encode()
            + b', "messages": [{"role": "user", "content": "Tell me a long story."}]}')
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:" + str(port).encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


async def _slow_client(port: int, stop: asyncio.Event, started: list[int]) -> int:
    """One stream read 1 KiB at a time every 50 ms through a 4 KiB receive buffer; returns bytes read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.transport.set_write_buffer_limits(0)
    writer.write(_request(port, 2000))
    await writer.drain()
    total = 0
    try:
        while not stop.is_set():
            data = await reader.read(1024)
            if not data:
                break
            if total == 0:
                started.append(1)
            total += len(data)
            await asyncio.sleep(0.05)
    finally:
        writer.transport.abort()
    return total


async def _run(port: int, pid: int) -> tuple[int, int, int, list[int]]:
    stop = asyncio.Event()
    started: list[int] = []
    tasks = [asyncio.create_task(_slow_client(port, stop, started)) for _ in range(STREAMS)]
    peak = 0
    t_end = time.monotonic() + 40
    while len(started) < STREAMS and time.monotonic() < t_end:  # every stream has sent its first bytes
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.2)
    t_read = time.monotonic() + READ_S
    while time.monotonic() < t_read:
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.2)
    stop.set()
    read = await asyncio.gather(*tasks)
    return peak, len(started), sum(read), read


def test_slow_readers_keep_the_gateways_rss_growth_bounded(gateway: tuple[int, int]) -> None:
    port, pid = gateway
    import httpx

    for _ in range(3):  # warm: imports, the upstream pool, the first stream's allocations
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "stream": True, "max_tokens": 50,
                             "messages": [{"role": "user", "content": "warm up"}]})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    baseline = rss_kib(pid)
    peak, started, total, per_stream = asyncio.run(_run(port, pid))
    growth_mib = (peak - baseline) / 1024
    print(f"gateway RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB;"
          f" {started} streams, {total / 1e6:.1f} MB read by the clients (min {min(per_stream)} B a stream)")
    assert started == STREAMS
    assert min(per_stream) < 600_000  # no client read its whole stream: every one kept a backlog upstream
    assert growth_mib < MAX_GROWTH_MIB, f"RSS grew {growth_mib:.1f} MiB with {STREAMS} slow streams"

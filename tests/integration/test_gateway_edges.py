"""Gateway edge cases the real engine cannot produce on demand (engine down, hangs, garbage, a stream
that breaks mid-way, the total deadline, a client gone during its upload), against a scripted fake
upstream, plus the pacing check: events the upstream sends apart reach the client apart (no buffering in
the gateway). The tests marked ``engine`` use the shared real engine where the behaviour depends on
vLLM: the field types its lax model would coerce, the tokens a client was sent before it hung up, and
the abort at the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwen_serve.config import Config, parse_config
from qwen_serve.gateway.app import build_app
from tests.conftest import free_port, metric_value, serve_in_thread, wait_ready
from tests.gateway_harness import ScriptedEngine
from tests.relay import LoopbackRelay

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


class _SlowUpstream(ScriptedEngine):
    """A scripted fake engine for failure edges only: healthy, but hangs or breaks on generation."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.finished = False
        self.hung_up_at: float | None = None
        super().__init__()

    def respond(self, conn: socket.socket, request: bytes, body: bytes) -> None:
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


# ----------------------------------------------------------------------------------------- deadline, upload
def test_deadline_before_the_headers_is_504_although_the_idle_timeout_is_longer() -> None:
    with _gateway_before(_SlowUpstream("hang"), _config(request_timeout_s=60, request_deadline_s=1)) as url:
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json={"model": "qwen2-random", "messages": CHAT}, timeout=30)
        elapsed = time.monotonic() - t0
    _assert_openai_error(r, 504, "upstream_timeout")
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert elapsed < 8, elapsed  # the fake hangs 10 s; the idle timeout is 60 s


def test_deadline_mid_stream_ends_it_with_an_error_event_and_drops_the_engine() -> None:
    """A stream that keeps sending (so the idle timeout never fires) still ends at the total deadline."""
    fake = _SlowUpstream("paced_watch")  # 10 s of events 50 ms apart
    with _gateway_before(fake, _config(request_timeout_s=60, request_deadline_s=1.5)) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                          json={"model": "qwen2-random", "messages": CHAT, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        deadline = time.monotonic() + 5
        while fake.hung_up_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == "t0"
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "deadline_exceeded" and set(last["error"]) == {"message", "type", "param", "code"}
    assert not fake.finished and fake.hung_up_at is not None, "the gateway kept reading after the deadline"


def test_client_gone_during_the_upload_is_499_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up halfway through its body is no gateway error: no traceback, no 500."""
    import logging

    caplog.set_level(logging.DEBUG)
    fake = _SlowUpstream("paced")
    app = build_app(_config(), upstream_url=f"http://127.0.0.1:{fake.port}")
    with serve_in_thread(app, free_port()) as url:
        wait_ready(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000\r\n\r\n" + b'{"model": "qwen2-random", ')
            time.sleep(0.3)  # the gateway is reading the body now
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:  # the gateway's own metrics (the fake answers /metrics with junk)
            text = app.fastapi.state.metrics.render().decode()
            if metric_value(text, "qwen_serve_requests_total", {"route": "/v1/chat/completions"}) is not None:
                break
            time.sleep(0.1)
    fake.close()
    assert metric_value(text, "qwen_serve_requests_total", {"route": "/v1/chat/completions", "code": "499"}) == 1.0
    assert metric_value(text, "qwen_serve_requests_total", {"route": "/v1/chat/completions", "code": "500"}) is None
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]


# ----------------------------------------------------------------------------------------- real engine
REAL_MODEL = "qwen2-random"


@pytest.mark.engine
@pytest.mark.parametrize("extra,param", [
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"n": "2"}, "n"),
    ({"max_tokens": "4"}, "max_tokens"),
])
def test_engine_coerced_field_types_are_400(gateway: Any, extra: dict[str, Any], param: str) -> None:
    """vLLM's lax model accepts ``"true"``, ``1``, ``"yes"``, ``"2"`` (and a non-boolean ``stream`` streams);
    the gateway answers the OpenAI API's 400 naming the field."""
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gateway.api_key}"},
                   json={"model": gateway.model, "messages": CHAT, "max_tokens": 2, **extra}, timeout=120)
    _assert_openai_error(r, 400, "invalid_request_error")
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "invalid_type")


class _PacedRelay(LoopbackRelay):
    """A relay in front of the engine that passes the engine's answers on at most ``rate`` bytes/s
    (requests go through at once), so a stream lasts seconds however fast the test model writes."""

    def __init__(self, target: str, rate: int = 100_000, piece: int = 2048) -> None:
        self.pause = piece / rate
        self.piece = piece
        super().__init__(int(target.rsplit(":", 1)[1]))

    async def pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_engine: bool) -> None:
        if to_engine:
            await super().pipe(src, dst, to_engine)
            return
        while data := await src.read(self.piece):
            dst.write(data)
            await dst.drain()
            await asyncio.sleep(self.pause)


def _read_tokens_then_hang_up(url: str, secret: str, tokens: int, stop_after: int) -> tuple[int, bool]:
    """Stream a ``tokens``-token answer with a raw socket, hang up after ``stop_after`` token events.
    Returns the token events received and whether the answer was already complete (a scheduler stall can
    let a whole answer pile up)."""
    body = json.dumps({"model": REAL_MODEL, "messages": CHAT, "stream": True, "max_tokens": tokens,
                       "min_tokens": tokens, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(120)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s" % (secret.encode(), len(body), body))
        received = b""
        while received.count(b'"delta":{"content"') < stop_after:
            chunk = sock.recv(65536)
            assert chunk, f"the stream ended early: {received[-300:]!r}"
            received += chunk
    return received.count(b'"delta":{"content"'), b'"finish_reason":"length"' in received


@pytest.mark.engine
def test_tokens_streamed_before_a_disconnect_are_charged(gateway_factory: Any, stack: Any, tmp_path: Path) -> None:
    """A client that reads part of an answer and hangs up pays for what it was sent: the tokens metric counts
    it, and the key's tpm (100 here; the prompt estimate is ~11) is spent, so the next request must wait.

    The test model writes ~1,000 tokens/s here, so the engine's answer reaches the gateway through a relay
    that paces it (~100 KB/s: a 1,900-token stream lasts seconds). A scheduler stall can still let a whole
    answer through before the hang-up; such a round says nothing and is repeated with a fresh key."""
    from qwen_serve import keys as keys_mod

    keys_file = tmp_path / "keys.yaml"
    secrets = {f"r{i}": keys_mod.create_key(keys_file, f"r{i}", tpm=100) for i in range(3)}
    gw = gateway_factory(_PacedRelay(stack.engine_url).url, auth={"enabled": True, "keys_file": str(keys_file)})

    def sample(name: str, **labels: str) -> float | None:
        return metric_value(httpx.get(gw.url + "/metrics", timeout=30).text, name, labels)

    rounds = []
    for key_id, secret in secrets.items():
        before = sample("qwen_serve_client_disconnects_total") or 0.0
        received, complete = _read_tokens_then_hang_up(gw.url, secret, 1900, 120)
        deadline = time.monotonic() + 30
        while True:  # until the gateway finished the request: a disconnect, or an answer sent whole
            disconnected = (sample("qwen_serve_client_disconnects_total") or 0.0) > before
            completion = sample("qwen_serve_tokens_total", key_id=key_id, kind="completion")
            if disconnected or completion is not None:
                break
            assert time.monotonic() < deadline, "the gateway never finished the request"
            time.sleep(0.2)
        disconnected = (sample("qwen_serve_client_disconnects_total") or 0.0) > before  # both are set by now
        if complete or not disconnected:
            rounds.append(f"{key_id}: the whole answer was sent before the hang-up")
            continue
        completion = sample("qwen_serve_tokens_total", key_id=key_id, kind="completion")
        assert completion is not None and received <= completion < 1900, (received, completion)
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                       json={"model": REAL_MODEL, "messages": CHAT, "max_tokens": 1})
        _assert_openai_error(r, 429, "rate_limit_exceeded")
        assert "tokens per minute" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 30
        return
    pytest.fail(f"no round hung up mid-answer: {rounds}")


@pytest.mark.engine
def test_deadline_aborts_a_real_stream(gateway_factory: Any, engine: Any) -> None:
    """``request_deadline_s`` ends a long answer with an error event, and the engine stops generating it.

    The test model writes ~1,000 tokens/s here, so the deadline is short; a round where a scheduler stall let
    the whole answer through first says nothing and is repeated."""
    gw = gateway_factory(auth={"enabled": False}, gateway={"request_deadline_s": 0.5})
    body = {"model": REAL_MODEL, "messages": CHAT, "stream": True, "max_tokens": 1900, "min_tokens": 1900,
            "ignore_eos": True}
    rounds = []
    for _ in range(5):
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        if lines[-1] == "data: [DONE]":
            rounds.append("the whole answer arrived before the deadline")
            continue
        last = json.loads(lines[-1][6:])
        assert last["error"]["code"] == "deadline_exceeded", lines[-3:]
        deadline = time.monotonic() + 10
        while True:
            running = metric_value(httpx.get(engine.url + "/metrics", timeout=30).text, "vllm:num_requests_running",
                                   {"model_name": REAL_MODEL})
            if running == 0:
                return
            assert time.monotonic() < deadline, "the engine still runs the request 10 s after the deadline"
            time.sleep(0.2)
    pytest.fail(f"no round reached the deadline: {rounds}")

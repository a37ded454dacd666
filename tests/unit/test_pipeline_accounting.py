"""The gateway pipeline's accounting, engine-free: the whole ASGI app (middleware, routes, pipeline, proxy)
driven in-process against a scripted fake upstream.

Covered: usage injection and stripping on streams, the lease released exactly once on every path with the
tokens it must be charged (the engine's usage on finish; on a disconnect or a mid-stream failure the
generated tokens that were sent), rpm and concurrency on the non-generating routes, refusals that no wait
can fix, type checks of the fields the gateway branches on, a client gone during the body upload, and the
total request deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.config import Config, parse_config
from qwen_serve.engine.state import EngineState
from qwen_serve.errors import UpstreamError
from qwen_serve.gateway.app import build_app
from qwen_serve.gateway.limits import KeyLimits, Lease, LocalLimiter
from qwen_serve.keys import create_key

MODEL = "qwen2-random"
CHAT = [{"role": "user", "content": "Say something."}]
PROMPT_TOKENS = 12


# ----------------------------------------------------------------------------------------- SSE as vLLM
def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def role_event(index: int = 0) -> bytes:
    return _event({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [
        {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})


def token_event(text: str, finish: str | None = None, index: int = 0) -> bytes:
    return _event({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [
        {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}]})


def usage_event(completion: int, prompt: int = PROMPT_TOKENS) -> bytes:
    return _event({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [],
                   "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                             "completion_tokens": completion}})


DONE = b"data: [DONE]\n\n"


def whole_stream(tokens: int) -> list[bytes]:
    """A complete chat stream of ``tokens`` tokens with the usage chunk, one event per read."""
    return [role_event(), *(token_event(f"t{i}", "length" if i == tokens - 1 else None) for i in range(tokens)),
            usage_event(tokens), DONE]


def completion_body(completion: int) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + completion,
                  "completion_tokens": completion}}).encode()


# ----------------------------------------------------------------------------------------- fake upstream
@dataclass
class FakeResponse:
    """An upstream response: ``chunks`` one read each; then ``fail`` (raise mid-stream) or ``hold`` (never
    end until closed)."""

    status: int = 200
    content_type: str = "text/event-stream"
    chunks: list[bytes] = field(default_factory=list)
    fail: bool = False
    hold: bool = False
    closed: bool = False
    read_to_end: bool = False
    holding: bool = False  # reached ``hold``: everything before it was read

    async def aiter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk
        if self.fail:
            raise UpstreamError("engine connection failed (protocol)", kind="protocol")
        if self.hold:
            self.holding = True
            await asyncio.Event().wait()
        self.read_to_end = True

    async def read(self) -> bytes:
        self.read_to_end = True
        return b"".join(self.chunks)

    async def aclose(self) -> None:
        self.closed = True


Script = Callable[[str, dict[str, Any] | None], "FakeResponse | BaseException | None"]


class FakeUpstream:
    """Answers each request with what ``script(path, body)`` returns: a response, an exception to raise, or
    None to hang before the headers (until cancelled)."""

    base_url = "http://fake-engine"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[str, str, bytes | None]] = []
        self.responses: list[FakeResponse] = []

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Any = None) -> FakeResponse:
        self.requests.append((method, path, body))
        answer = self.script(path, json.loads(body) if body else None)
        if answer is None:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, FakeResponse)
        self.responses.append(answer)
        return answer

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        return 200, b""

    async def aclose(self) -> None:
        pass

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _, _, b in self.requests if b]


def default_script(path: str, body: dict[str, Any] | None) -> FakeResponse:
    """What a healthy engine answers."""
    if path == "/v1/models":
        return FakeResponse(content_type="application/json", chunks=[json.dumps(
            {"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()])
    if path in ("/tokenize", "/detokenize"):
        return FakeResponse(content_type="application/json", chunks=[b'{"tokens": [1, 2], "count": 2}'])
    if body and body.get("stream") is True:
        return FakeResponse(chunks=whole_stream(5))
    return FakeResponse(content_type="application/json", chunks=[completion_body(5)])


# ----------------------------------------------------------------------------------------- limiter spy
class RecordedLease:
    def __init__(self, inner: Lease, estimate: int) -> None:
        self.inner = inner
        self.estimate = estimate
        self.releases: list[int | None] = []

    def release(self, actual_tokens: int | None = None) -> None:
        self.releases.append(actual_tokens)
        self.inner.release(actual_tokens)


class RecordingLimiter:
    """A :class:`LocalLimiter` whose leases record every release."""

    def __init__(self) -> None:
        self.inner = LocalLimiter(resolution_s=0)
        self.leases: list[RecordedLease] = []
        self.principals: list[KeyLimits] = []

    async def acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        lease = RecordedLease(await self.inner.acquire(principal, estimated_tokens), estimated_tokens)
        self.leases.append(lease)
        self.principals.append(principal)
        return lease

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def only(self) -> RecordedLease:
        assert len(self.leases) == 1, self.leases
        return self.leases[0]


# ----------------------------------------------------------------------------------------- ASGI client
@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line[6:]) for line in self.body.decode().splitlines()
                if line.startswith("data: {")]

    def token_events(self) -> int:
        return sum(1 for e in self.events() if e.get("choices") and "role" not in e["choices"][0].get("delta", {}))


@dataclass
class Gateway:
    app: Any
    upstream: FakeUpstream
    limiter: RecordingLimiter
    secrets: dict[str, str]

    def metrics(self) -> str:
        return self.app.fastapi.state.metrics.render().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` with these labels (0 when there is none)."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(s.value for f in text_string_to_metric_families(self.metrics()) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    async def call(self, method: str, path: str, body: Any = None, *, key: str | None = "k",
                   raw: bytes | None = None, disconnect_after: int | None = None,
                   upload_then_disconnect: bool = False, gone: asyncio.Event | None = None) -> Reply:
        """One request through the app. The client hangs up when ``gone`` is set, once it has been sent
        ``disconnect_after`` body messages, or (``upload_then_disconnect``) halfway through its body. Every
        message the app sends is recorded: what the gateway handed over is what it sent."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if key is not None:
            headers.append((b"authorization", f"Bearer {self.secrets[key]}".encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
        if upload_then_disconnect:
            inbox = [{"type": "http.request", "body": data[: len(data) // 2], "more_body": True},
                     {"type": "http.disconnect"}]
        else:
            inbox = [{"type": "http.request", "body": data, "more_body": False}]
        gone = gone or asyncio.Event()
        reply = Reply()

        async def receive() -> dict[str, Any]:
            if inbox:
                return inbox.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                reply.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    reply.chunks.append(message["body"])
                if disconnect_after is not None and len(reply.chunks) >= disconnect_after:
                    gone.set()
            await asyncio.sleep(0)

        await asyncio.wait_for(asyncio.create_task(self.app(scope, receive, send)), 30)
        return reply


def make_gateway(tmp_path: Path, script: Script = default_script, *, gateway: dict[str, Any] | None = None,
                 **keys: dict[str, Any]) -> Gateway:
    """The app with auth on (``keys``: id → limits; ``k`` unlimited unless given), a fake upstream, and a
    recording limiter."""
    keys_file = tmp_path / "keys.yaml"
    keys.setdefault("k", {})
    secrets = {key_id: create_key(keys_file, key_id, **limits) for key_id, limits in keys.items()}
    config: Config = parse_config({"model": {"source": "x", "served_name": MODEL},
                                   "auth": {"enabled": True, "keys_file": str(keys_file)},
                                   "gateway": gateway or {}})
    upstream = FakeUpstream(script)
    app = build_app(config, upstream=upstream, state=EngineState(up=True, status="ready"))  # type: ignore[arg-type]
    limiter = RecordingLimiter()
    app.fastapi.state.pipeline.s.limiter = limiter
    return Gateway(app, upstream, limiter, secrets)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": CHAT, **extra}


def assert_error(reply: Reply, status: int, type_: str, code: str | None, param: str | None = None) -> None:
    assert reply.status == status, reply.body
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert (err["type"], err["code"], err["param"]) == (type_, code, param), err


def _hang(path: str, body: dict[str, Any] | None) -> None:
    """A script whose engine never answers (the request hangs before the headers)."""
    return None


async def until(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# ----------------------------------------------------------------------------------------- usage
async def test_stream_gets_usage_injected_and_stripped(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path)
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True))
    assert reply.status == 200 and reply.body.endswith(DONE)
    sent = gw.upstream.bodies()[0]
    assert sent["stream_options"] == {"include_usage": True}  # the gateway asked the engine for usage
    assert b'"usage"' not in reply.body and reply.token_events() == 5  # ... and the client never sees it
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 5]
    assert gw.metric("qwen_serve_tokens_total", kind="prompt") == PROMPT_TOKENS
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 5
    assert gw.upstream.responses[0].closed


async def test_stream_keeps_the_usage_the_client_asked_for(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path)
    raw = json.dumps(chat_body(stream=True, stream_options={"include_usage": True})).encode()
    reply = await gw.call("POST", "/v1/chat/completions", raw=raw)
    assert reply.status == 200
    assert gw.upstream.requests[0][2] == raw  # forwarded byte for byte
    assert reply.events()[-1]["usage"]["completion_tokens"] == 5
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 5]


async def test_non_stream_is_charged_its_usage(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path)
    reply = await gw.call("POST", "/v1/chat/completions", chat_body())
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 5
    assert "stream_options" not in gw.upstream.bodies()[0]
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 5]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 5


# ----------------------------------------------------------------------------------------- tokens sent
async def test_disconnect_mid_stream_is_charged_the_tokens_sent(tmp_path: Path) -> None:
    long = [role_event(), *(token_event(f"t{i}") for i in range(200))]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=long, hold=True))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True), disconnect_after=41)
    sent = reply.token_events()
    assert 40 <= sent < 200
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + sent]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == sent
    assert gw.metric("qwen_serve_tokens_total", kind="prompt") == lease.estimate
    assert gw.metric("qwen_serve_client_disconnects_total") == 1
    assert gw.upstream.responses[0].closed and not gw.upstream.responses[0].read_to_end


async def test_disconnect_after_the_usage_is_charged_the_usage(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=whole_stream(5)[:-1], hold=True))
    gone = asyncio.Event()
    task = asyncio.create_task(gw.call("POST", "/v1/chat/completions", chat_body(stream=True), gone=gone))
    await until(lambda: gw.upstream.responses and gw.upstream.responses[0].holding)
    gone.set()
    await task
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 5]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 5


async def test_midstream_failure_is_charged_the_tokens_sent(tmp_path: Path) -> None:
    events = [role_event(), *(token_event(f"t{i}") for i in range(7))]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=events, fail=True))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True))
    assert reply.status == 200 and reply.events()[-1]["error"]["type"] == "upstream_error"
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + 7]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 7
    assert gw.metric("qwen_serve_upstream_errors_total", kind="protocol") == 1


async def test_completions_stream_counts_every_text_event(tmp_path: Path) -> None:
    def text_event(i: int) -> bytes:
        return _event({"id": "c", "object": "text_completion", "created": 1, "model": MODEL,
                       "choices": [{"index": 0, "text": f"t{i}", "logprobs": None, "finish_reason": None}]})

    # Several events in one read, as a busy engine sends them.
    chunks = [text_event(0) + text_event(1) + text_event(2), text_event(3), text_event(4) + text_event(5)]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=chunks, fail=True))
    await gw.call("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "stream": True})
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + 6]


# ----------------------------------------------------------------------------------------- every path
BAD_SCHEMA = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}}
NOTHING_GENERATED: dict[str, tuple[Script, dict[str, Any]]] = {
    "connect_error": (lambda p, b: UpstreamError("engine connection failed (connect)"), {"stream": True}),
    "engine_400": (lambda p, b: FakeResponse(400, "application/json", [b'{"error": {"message": "bad"}}']), {}),
    "engine_500_stream": (lambda p, b: FakeResponse(500, "text/plain", [b"oops"]), {"stream": True}),
    "guided_400": (default_script, BAD_SCHEMA),
}


@pytest.mark.parametrize("name", list(NOTHING_GENERATED))
async def test_lease_released_once_with_nothing_charged_when_nothing_was_generated(tmp_path: Path,
                                                                                   name: str) -> None:
    script, extra = NOTHING_GENERATED[name]
    gw = make_gateway(tmp_path, script, k={"tpm": 10_000, "max_concurrent": 4})
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(**extra))
    assert reply.status >= 400 and reply.json()["error"]["message"]
    assert gw.limiter.only.releases == [0]
    assert gw.metric("qwen_serve_tokens_total") == 0
    state = gw.limiter.inner._states["k"]
    assert state.in_flight == 0 and state.in_flight_tokens == 0 and state.done.total == 0


async def test_upstream_hang_then_client_gone_releases_the_lease(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, _hang)
    gone = asyncio.Event()
    task = asyncio.create_task(gw.call("POST", "/v1/chat/completions", chat_body(stream=True), gone=gone))
    await until(lambda: gw.upstream.requests)
    gone.set()
    reply = await task
    assert reply.status == 0  # nothing was sent
    assert gw.limiter.only.releases == [0]
    assert gw.metric("qwen_serve_client_disconnects_total") == 1
    assert gw.metric("qwen_serve_requests_total", code="499") == 1


# ----------------------------------------------------------------------------------------- field types
@pytest.mark.parametrize("extra,param", [
    ({"stream": 1}, "stream"),
    ({"stream": "true"}, "stream"),
    ({"stream": 0}, "stream"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"n": "2"}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_tokens": False}, "max_tokens"),
    ({"max_completion_tokens": [5]}, "max_completion_tokens"),
])
async def test_wrong_json_types_of_branching_fields_are_400(tmp_path: Path, extra: dict[str, Any],
                                                             param: str) -> None:
    gw = make_gateway(tmp_path)
    for route, body in (("/v1/chat/completions", chat_body(**extra)),
                        ("/v1/completions", {"model": MODEL, "prompt": "Hi", **extra})):
        if route == "/v1/completions" and param == "max_completion_tokens":
            continue
        reply = await gw.call("POST", route, body)
        assert_error(reply, 400, "invalid_request_error", "invalid_type", param)
        assert param.split(".")[-1] in reply.json()["error"]["message"]
    assert gw.upstream.requests == [] and gw.limiter.leases == []  # refused before the limiter and the engine
    assert gw.metric("qwen_serve_requests_total", code="400") >= 1


@pytest.mark.parametrize("extra", [
    {"stream": None}, {"stream": False, "n": None, "max_tokens": None},
    {"stream": True, "stream_options": None}, {"stream": True, "stream_options": {"include_usage": None}},
    {"n": 2, "max_tokens": 3, "max_completion_tokens": 3},
])
async def test_nulls_and_right_types_pass(tmp_path: Path, extra: dict[str, Any]) -> None:
    gw = make_gateway(tmp_path)
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(**extra))
    assert reply.status == 200, reply.body


async def test_stream_null_include_usage_gets_usage_injected(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path)
    reply = await gw.call("POST", "/v1/chat/completions",
                          chat_body(stream=True, stream_options={"include_usage": None}))
    assert reply.status == 200 and b'"usage"' not in reply.body
    assert gw.upstream.bodies()[0]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
async def test_deeply_nested_json_is_400_not_500(tmp_path: Path, raw: bytes) -> None:
    gw = make_gateway(tmp_path, gateway={"max_request_bytes": 1_000_000})
    reply = await gw.call("POST", "/v1/chat/completions", raw=raw)
    assert_error(reply, 400, "invalid_request_error", None)


# ----------------------------------------------------------------------------------------- limits
async def test_request_over_the_keys_tpm_is_413_and_not_retryable(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, small={"tpm": 50})
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x" * 400}]),
                          key="small")
    assert_error(reply, 413, "invalid_request_error", "request_too_large_for_limit")
    assert reply.headers.get("x-should-retry") == "false" and "retry-after" not in reply.headers
    assert "50 tokens per minute" in reply.json()["error"]["message"]
    assert gw.upstream.requests == []
    assert gw.metric("qwen_serve_rate_limited_total", key_id="small", limit="tpm") == 1
    assert gw.metric("qwen_serve_requests_total", key_id="small", code="413") == 1
    # A request that fits is still admitted: nothing was charged for the refusal.
    assert (await gw.call("POST", "/v1/chat/completions", chat_body(), key="small")).status == 200


async def test_retryable_429_has_retry_after_and_no_should_retry_false(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, one={"rpm": 1})
    assert (await gw.call("POST", "/v1/chat/completions", chat_body(), key="one")).status == 200
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(), key="one")
    assert_error(reply, 429, "rate_limit_exceeded", "rate_limit_exceeded")
    assert int(reply.headers["retry-after"]) >= 1 and "x-should-retry" not in reply.headers


@pytest.mark.parametrize("route,method,body", [
    ("/tokenize", "POST", {"model": MODEL, "prompt": "hello"}),
    ("/detokenize", "POST", {"model": MODEL, "tokens": [1, 2]}),
    ("/v1/models", "GET", None),
])
async def test_non_generating_routes_count_toward_rpm(tmp_path: Path, route: str, method: str,
                                                      body: dict[str, Any] | None) -> None:
    gw = make_gateway(tmp_path, two={"rpm": 2, "tpm": 1})
    for _ in range(2):
        reply = await gw.call(method, route, body, key="two")
        assert reply.status == 200, reply.body  # tpm 1: tokens are not what these routes spend
    assert_error(await gw.call(method, route, body, key="two"), 429, "rate_limit_exceeded", "rate_limit_exceeded")
    assert gw.metric("qwen_serve_rate_limited_total", key_id="two", limit="rpm") == 1
    assert [lease.releases for lease in gw.limiter.leases] == [[0], [0]]
    assert all(p.tpm is None for p in gw.limiter.principals)


@pytest.mark.parametrize("route,method,body", [
    ("/tokenize", "POST", {"model": MODEL, "prompt": "hello"}),
    ("/detokenize", "POST", {"model": MODEL, "tokens": [1, 2]}),
    ("/v1/models", "GET", None),
])
async def test_non_generating_routes_count_toward_concurrency(tmp_path: Path, route: str, method: str,
                                                              body: dict[str, Any] | None) -> None:
    def script(path: str, request: dict[str, Any] | None) -> FakeResponse | None:
        if path == route and request is not None and request.get("prompt") == "hold":
            return None  # this one hangs: it holds its slot
        if path.startswith("/v1/chat"):
            return FakeResponse(chunks=[role_event(), token_event("a")], hold=True)
        return default_script(path, request)

    gw = make_gateway(tmp_path, script, solo={"max_concurrent": 1})
    gone = asyncio.Event()
    stream = asyncio.create_task(gw.call("POST", "/v1/chat/completions", chat_body(stream=True), key="solo",
                                         gone=gone))
    await until(lambda: gw.upstream.responses and gw.upstream.responses[0].holding)
    reply = await gw.call(method, route, body, key="solo")
    assert_error(reply, 429, "rate_limit_exceeded", "rate_limit_exceeded")
    assert "concurrent" in reply.json()["error"]["message"]
    gone.set()
    await stream
    # Running, one of these routes holds the slot too; finished, it frees it.
    if method == "POST":
        held = asyncio.create_task(gw.call(method, route, {**(body or {}), "prompt": "hold"}, key="solo"))
        await until(lambda: len(gw.upstream.requests) == 2)
        assert (await gw.call("POST", "/v1/chat/completions", chat_body(), key="solo")).status == 429
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    assert (await gw.call(method, route, body, key="solo")).status == 200
    assert all(lease.releases == [lease.releases[0]] for lease in gw.limiter.leases)


# ----------------------------------------------------------------------------------------- upload
async def test_client_gone_during_the_upload_is_499_and_logged_at_debug(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    gw = make_gateway(tmp_path)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    for route in ("/v1/chat/completions", "/tokenize"):
        await gw.call("POST", route, chat_body(stream=True), upload_then_disconnect=True)
    assert gw.metric("qwen_serve_requests_total", code="499") == 2
    assert gw.metric("qwen_serve_requests_total", code="500") == 0
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("qwen_serve", "uvicorn"))]
    assert loud == [], [r.getMessage() for r in loud]
    assert not any(r.exc_info for r in caplog.records)
    assert any("upload" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert gw.upstream.requests == [] and gw.limiter.leases == []


# ----------------------------------------------------------------------------------------- deadline
async def test_deadline_mid_stream_ends_with_an_error_event(tmp_path: Path) -> None:
    events = [role_event(), token_event("a"), token_event("b")]
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=events, hold=True),
                      gateway={"request_deadline_s": 0.3, "request_timeout_s": 60})
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True))
    assert reply.status == 200
    *_, last = reply.events()
    assert last["error"]["code"] == "deadline_exceeded" and last["error"]["type"] == "upstream_timeout"
    assert "request_deadline_s" in last["error"]["message"]
    assert gw.upstream.responses[0].closed and not gw.upstream.responses[0].read_to_end
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + 2]


@pytest.mark.parametrize("route,method,body", [
    ("/v1/chat/completions", "POST", chat_body()),
    ("/tokenize", "POST", {"model": MODEL, "prompt": "hello"}),
    ("/v1/models", "GET", None),
])
async def test_deadline_before_the_headers_is_504(tmp_path: Path, route: str, method: str,
                                                  body: dict[str, Any] | None) -> None:
    gw = make_gateway(tmp_path, _hang, gateway={"request_deadline_s": 0.3})
    reply = await gw.call(method, route, body)
    assert_error(reply, 504, "upstream_timeout", "deadline_exceeded")
    assert gw.limiter.only.releases == [0]


async def test_deadline_after_done_while_draining_is_no_error(tmp_path: Path) -> None:
    """The engine keeps the connection open after ``[DONE]``: the client has its whole answer, so the
    deadline passing while the gateway drains it is nobody's error."""
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=whole_stream(5), hold=True),
                      gateway={"request_deadline_s": 0.3})
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True))
    assert reply.status == 200 and reply.body.endswith(DONE) and b'"error"' not in reply.body
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 5]
    assert gw.metric("qwen_serve_upstream_errors_total") == 0


async def test_disconnect_before_the_deadline_stays_a_disconnect(tmp_path: Path) -> None:
    events = [role_event(), token_event("a"), token_event("b")]
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=events, hold=True),
                      gateway={"request_deadline_s": 30})
    gone = asyncio.Event()
    task = asyncio.create_task(gw.call("POST", "/v1/chat/completions", chat_body(stream=True), gone=gone))
    await until(lambda: gw.upstream.responses and gw.upstream.responses[0].holding)
    gone.set()
    reply = await task
    assert b'"error"' not in reply.body
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + 2]
    assert gw.metric("qwen_serve_client_disconnects_total") == 1
    assert gw.metric("qwen_serve_upstream_errors_total") == 0


# ----------------------------------------------------------------------------------------- SSE framing bound
async def test_an_event_that_never_ends_is_cut_at_the_pending_bound(tmp_path: Path) -> None:
    """An engine that streams bytes without an SSE separator is not buffered without end: past
    ``MAX_PENDING_EVENT_BYTES`` the stream ends with the usual error event (``upstream_protocol_error``), the
    events before it relayed, the upstream response closed and the lease released with the tokens sent."""
    from qwen_serve.gateway.proxy import MAX_PENDING_EVENT_BYTES

    piece = b"x" * (64 << 10)
    endless = [role_event(), token_event("a"), b'data: {"choices": "' + piece,
               *([piece] * (MAX_PENDING_EVENT_BYTES // len(piece) + 1))]
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=endless, hold=True))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True))
    assert reply.status == 200
    events = reply.events()
    assert len(events) == 3 and events[1]["choices"][0]["delta"]["content"] == "a"
    err = events[-1]["error"]
    assert (err["type"], err["code"]) == ("upstream_error", "upstream_protocol_error"), err
    assert len(reply.body) < 4096  # the partial event never reached the client
    assert gw.upstream.responses[0].closed and not gw.upstream.responses[0].holding
    assert gw.limiter.only.releases == [gw.limiter.only.estimate + 1]
    assert gw.metric("qwen_serve_upstream_errors_total", kind="protocol") == 1


async def test_an_endless_first_event_of_a_guided_stream_is_502(tmp_path: Path) -> None:
    """Guided streams hold their headers until the first event: an oversized one is then a 502 response."""
    from qwen_serve.gateway.proxy import MAX_PENDING_EVENT_BYTES

    endless = [b"data: {" + b" " * (MAX_PENDING_EVENT_BYTES + 1)]
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=endless, hold=True))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, **GUIDED_JSON))
    assert_error(reply, 502, "upstream_error", "upstream_protocol_error")
    assert gw.limiter.only.releases == [0]


# ----------------------------------------------------------------------------------------- streamed verdict
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
GUIDED_JSON = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}


def guided_stream(pieces: list[str], finish: str = "stop", choices: int = 1) -> list[bytes]:
    """A chat stream of ``choices`` choices (interleaved) writing ``pieces``, each ending with ``finish``."""
    out = [role_event(i) for i in range(choices)]
    for j, text in enumerate(pieces):
        for i in range(choices):
            out.append(token_event(text, finish if j == len(pieces) - 1 else None, index=i))
    return [*out, usage_event(len(pieces) * choices), DONE]


@pytest.mark.parametrize("pieces,finish,verdict", [
    (['{"a"', ": 1}"], "stop", "valid"),
    (['{"a"', ': "x"}'], "stop", "invalid"),
    (['{"a"', ": 1"], "length", "truncated"),
])
async def test_a_guided_stream_carries_its_verdict_in_the_last_chunk(tmp_path: Path, pieces: list[str],
                                                                     finish: str, verdict: str) -> None:
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=guided_stream(pieces, finish)))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, **GUIDED_JSON))
    assert reply.status == 200 and reply.body.endswith(DONE)
    events = reply.events()
    assert [e.get("guided_output") for e in events] == [None] * (len(events) - 1) + [verdict]
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == finish and last["choices"][0]["delta"]["content"] == pieces[-1]
    assert "x-guided-output" not in reply.headers
    assert gw.metric("qwen_serve_guided_requests_total", outcome=verdict) == 1
    assert gw.limiter.only.releases == [PROMPT_TOKENS + len(pieces)]  # the rewritten chunk still counts


async def test_a_guided_stream_with_n_choices_gets_the_verdict_when_the_last_one_finishes(tmp_path: Path) -> None:
    stream = guided_stream(['{"a"', ": 1}"], choices=2)
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=stream))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, n=2, **GUIDED_JSON))
    flagged = [(i, e) for i, e in enumerate(reply.events()) if "guided_output" in e]
    assert len(flagged) == 1 and flagged[0][1]["guided_output"] == "valid"
    index, event = flagged[0]
    assert index == len(reply.events()) - 1 and event["choices"][0]["index"] == 1


async def test_a_guided_stream_keeps_the_usage_chunk_after_the_verdict(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=guided_stream(['{"a": 1}'])))
    body = chat_body(stream=True, stream_options={"include_usage": True}, **GUIDED_JSON)
    events = (await gw.call("POST", "/v1/chat/completions", body)).events()
    assert events[-2]["guided_output"] == "valid" and "guided_output" not in events[-1]
    assert events[-1]["usage"]["completion_tokens"] == 1


async def test_no_streamed_verdict_when_validate_output_is_off(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=guided_stream(['{"a"', ": 1}"])))
    stages = gw.app.fastapi.state.pipeline.s
    stages.guided = stages.guided.model_copy(update={"validate_output": False})
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, **GUIDED_JSON))
    assert reply.status == 200 and b"guided_output" not in reply.body


async def test_an_unchecked_guided_stream_says_unchecked(tmp_path: Path) -> None:
    grammar = {"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}
    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=guided_stream(["yes"])))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, **grammar))
    assert reply.events()[-1]["guided_output"] == "unchecked"


async def test_the_openai_sdk_reads_a_stream_with_the_verdict(tmp_path: Path) -> None:
    """The field rides on an ordinary chunk: the SDK parses it as a ``ChatCompletionChunk`` whose
    ``choices[0]`` is there as usual, and keeps the field as an extra attribute."""
    import httpx
    import openai

    gw = make_gateway(tmp_path, lambda p, b: FakeResponse(chunks=guided_stream(['{"a"', ": 1}"])))
    reply = await gw.call("POST", "/v1/chat/completions", chat_body(stream=True, **GUIDED_JSON))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=reply.body)

    client = openai.OpenAI(api_key="x", base_url="http://gateway/v1",
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == '{"a": 1}'
    assert getattr(chunks[-1], "guided_output") == "valid"
    assert chunks[-1].model_extra == {"guided_output": "valid"}

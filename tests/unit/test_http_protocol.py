"""qwen_serve.gateway.http_protocol on an event loop with an in-memory transport: head size counted as bytes
arrive (however they are split), no false 431 for a big body behind a small head, the head and body timers,
lingering close after a refusal, and no timer armed for a request that arrives in one read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from qwen_serve.config import parse_config
from qwen_serve.gateway.http_protocol import LINGER_S, TIMED_OUT, GatewayHttpProtocol, HttpLimits, gateway_protocol

LIMITS = HttpLimits(max_header_bytes=1024, header_timeout_s=0.2, body_timeout_s=0.2, keep_alive_timeout_s=0.5)


class _Transport(asyncio.Transport):
    """Records what the protocol writes and whether it half-closed or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.protocol: asyncio.Protocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: Any) -> None:
        assert not self.closed
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _echo_length(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Reads the whole body, answers 200 with its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _answer_at_once(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Answers 413 without reading the body (as the gateway does for a too large Content-Length)."""
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _connect(loop: asyncio.AbstractEventLoop, app: Any = _echo_length,
             limits: HttpLimits = LIMITS) -> tuple[GatewayHttpProtocol, _Transport]:
    config = uvicorn.Config(app, http=gateway_protocol(limits), lifespan="off", log_level="warning")
    config.load()
    proto = config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)  # type: ignore[call-arg]
    assert isinstance(proto, GatewayHttpProtocol)
    transport = _Transport()
    transport.protocol = proto
    proto.connection_made(transport)
    return proto, transport


def _run(loop: asyncio.AbstractEventLoop, seconds: float = 0.02) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def _status(transport: _Transport) -> int:
    return int(bytes(transport.written).split(b" ", 2)[1])


def _error(transport: _Transport) -> dict[str, Any]:
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in head and b"\r\ncontent-type: application/json\r\n" in head
    err: dict[str, Any] = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


def test_limits_come_from_the_gateway_config() -> None:
    gw = parse_config({"model": {"source": "x"}, "gateway": {"max_header_bytes": 2048, "header_timeout_s": 3,
                                                              "body_timeout_s": 4, "keep_alive_timeout_s": 5.5}}).gateway
    cls = gateway_protocol(HttpLimits.from_config(gw))
    assert issubclass(cls, GatewayHttpProtocol)
    assert cls.limits == HttpLimits(2048, 3, 4, 5.5)
    assert GatewayHttpProtocol.limits == HttpLimits()  # binding limits does not change the base class


@pytest.mark.parametrize("piece", [1, 7, 100, 5000])
def test_a_head_over_the_limit_is_431_however_it_is_split(loop: asyncio.AbstractEventLoop, piece: int) -> None:
    proto, transport = _connect(loop)
    data = b"GET /x HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 4000  # no end of head: the client keeps going
    fed = 0
    for i in range(0, len(data), piece):
        proto.data_received(data[i:i + piece])
        fed += len(data[i:i + piece])
        if transport.written:
            break
    assert _status(transport) == 431 and _error(transport)["code"] == "request_header_fields_too_large"
    assert fed <= LIMITS.max_header_bytes + piece  # refused at the first read past the limit
    assert transport.eof and not transport.closed  # half-closed; lingering for the client to read the answer
    proto.data_received(b"b" * 1000)  # discarded, not parsed
    assert _status(transport) == 431 and transport.written.count(b"HTTP/1.1") == 1


def test_many_small_headers_over_the_limit_are_431(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(300)) + b"\r\n")
    assert _status(transport) == 431


def test_a_head_over_the_limit_in_one_read_with_its_body_is_431(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"POST / HTTP/1.1\r\nx-big: " + b"a" * 1100 + b"\r\ncontent-length: 3\r\n\r\nabc")
    assert _status(transport) == 431


def test_a_big_body_behind_a_small_head_is_no_431(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    body = b"x" * 20_000
    proto.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    _run(loop)
    assert _status(transport) == 200 and transport.written.endswith(b"20000")


def test_a_head_just_under_the_limit_is_served(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    head = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: "
    proto.data_received(head + b"a" * (LIMITS.max_header_bytes - len(head) - 8) + b"\r\n\r\n")
    _run(loop)
    assert _status(transport) == 200


def test_a_request_in_one_read_arms_no_timer(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    for _ in range(3):  # kept alive
        proto.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nab")
        assert proto._head_timer is None and proto._body_timer is None
        _run(loop)
    assert transport.written.count(b"HTTP/1.1 200") == 3


def test_a_stalled_head_is_408_and_closed(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"GET / HTTP/1.1\r\nhost:")
    _run(loop, LIMITS.header_timeout_s / 2)
    assert not transport.written
    _run(loop, LIMITS.header_timeout_s)
    assert _status(transport) == 408 and _error(transport)["code"] == "request_timeout"
    _run(loop, LINGER_S + 0.1)
    assert transport.closed


def test_a_silent_connection_is_408(loop: asyncio.AbstractEventLoop) -> None:
    _, transport = _connect(loop)
    _run(loop, LIMITS.header_timeout_s + 0.1)
    assert _status(transport) == 408


def test_idle_time_between_requests_is_not_head_time(
        loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    _run(loop, LIMITS.header_timeout_s * 2)  # idle past the head timeout: no 408 between requests
    assert transport.written.count(b"HTTP/1.1") == 1 and not transport.closed
    proto.data_received(b"GET / HTTP/1.1\r\nhost:")  # the next request's head starts its own clock
    _run(loop, LIMITS.header_timeout_s + 0.1)
    assert transport.written.count(b"HTTP/1.1 408") == 1


def test_kept_alive_idle_then_closed(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    _run(loop, LIMITS.keep_alive_timeout_s + 0.1)
    assert transport.closed and transport.written.count(b"HTTP/1.1") == 1  # no answer, just closed


def test_a_stalled_body_is_408_and_the_app_sees_a_disconnect(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
    _run(loop, LIMITS.body_timeout_s / 2)
    proto.data_received(b"def")  # progress does not restart the body's clock
    _run(loop, LIMITS.body_timeout_s)
    assert _status(transport) == 408 and _error(transport)["code"] == "request_timeout"
    assert proto.cycle.disconnected and proto.cycle.scope["state"][TIMED_OUT] == 408
    _run(loop)
    assert transport.written.count(b"HTTP/1.1") == 1  # the app's own (dropped) answer never reaches the wire


def test_a_body_still_arriving_after_the_answer_is_closed_without_a_second_answer(
        loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop, app=_answer_at_once)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nabc")
    _run(loop)
    assert _status(transport) == 413 and not transport.closed
    _run(loop, LIMITS.body_timeout_s + 0.1)
    assert transport.closed and transport.written.count(b"HTTP/1.1") == 1


def test_a_stalled_pipelined_head_behind_an_unfinished_response_closes_without_an_answer(
        loop: asyncio.AbstractEventLoop) -> None:
    release = asyncio.Event()

    async def slow(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await release.wait()
        await send({"type": "http.response.body", "body": b"ok"})

    proto, transport = _connect(loop, app=slow)
    proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nho")
    _run(loop, LIMITS.header_timeout_s + 0.1)
    assert transport.closed and b"408" not in transport.written  # nothing inserted into the first response
    release.set()
    _run(loop)


def test_invalid_http_is_400(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = _connect(loop)
    proto.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert _status(transport) == 400 and transport.closed

"""A gateway served as in production (``qwen_serve.serve._uvicorn_config``: uvloop and the gateway's HTTP
protocol) in a background thread, in front of a scripted fake engine; plus raw-socket helpers.

Everything listens on and talks to 127.0.0.1 only; every wait is bounded.

* :func:`config` — a gateway config (auth off, served model ``qwen2-random``, a free port on 127.0.0.1).
* :class:`ScriptedEngine` — a fake engine whose subclasses script the answers (one request per connection,
  in threads); :class:`FakeEngine` answers by path prefix with fixed bytes (a whole HTTP response each).
* :func:`serve` — the gateway app of a config, served in a thread with the production uvicorn settings.
* :func:`read_response` — one HTTP/1.1 response read from a socket (status, headers, body) and whether the
  server closed the connection after it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from qwen_serve.config import Config, parse_config
from qwen_serve.gateway.app import build_app
from qwen_serve.serve import _uvicorn_config
from tests.conftest import free_port, wait_ready

MODEL = "qwen2-random"


def config(**gateway: Any) -> Config:
    """A gateway config on a free 127.0.0.1 port (``gateway`` keys override), auth off."""
    return parse_config({"model": {"source": "x", "served_name": MODEL}, "auth": {"enabled": False},
                         "gateway": {"host": "127.0.0.1", "port": free_port(), "ui": False, **gateway}})


def http_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    # connection: close — the fake engine answers one request per connection, and says so, as HTTP/1.1
    # requires of a server that closes (a client would otherwise reuse the closed connection).
    return (b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, content_type.encode(), len(body), body))


def json_response(obj: Any, status: int = 200) -> bytes:
    return http_response(status, json.dumps(obj).encode())


Answer = bytes | Callable[[bytes], bytes]  # a whole HTTP response, or one made from the request's body


class ScriptedEngine:
    """A fake engine on 127.0.0.1 that serves each connection in a thread: it reads one request (head and
    ``content-length`` body, bounded), answers ``GET /health`` with 200, and hands any other request to
    :meth:`respond`. The connection is closed after :meth:`respond` returns."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def respond(self, conn: socket.socket, request: bytes, body: bytes) -> None:
        """Answer one request (``request``: its head, from the request line on) on ``conn``."""
        raise NotImplementedError

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            if head.startswith(b"GET /health"):
                conn.sendall(http_response(200, b""))
                return
            self.respond(conn, head, body)


class FakeEngine(ScriptedEngine):
    """Each request gets the response of the first ``routes`` prefix that its request line starts with
    (e.g. ``"GET /v1/models"``), else 404."""

    def __init__(self, routes: dict[str, Answer] | None = None) -> None:
        self.routes = routes or {}
        super().__init__()

    def respond(self, conn: socket.socket, request: bytes, body: bytes) -> None:
        for prefix, answer in self.routes.items():
            if request.startswith(prefix.encode()):
                conn.sendall(answer(body) if callable(answer) else answer)
                return
        conn.sendall(json_response({"error": {"message": "no such route"}}, 404))


@contextlib.contextmanager
def serve(cfg: Config, upstream: str | None = None, app: Any = None) -> Iterator[str]:
    """Serve ``app`` (default: the gateway of ``cfg`` in front of ``upstream``) with the production uvicorn
    settings of ``cfg`` in a thread; yields the URL once ``/ready`` says 200 (``/health`` when there is no
    upstream), stops the server at the end."""
    app = app if app is not None else build_app(cfg, upstream_url=upstream or f"http://127.0.0.1:{free_port()}")
    server = uvicorn.Server(_uvicorn_config(app, cfg))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.gateway.port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("in-process gateway did not start")
            time.sleep(0.02)
        if upstream is not None:
            wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def connect(url: str, timeout: float = 10) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names; the last value of a repeated header
    body: bytes
    closed: bool  # the server closed the connection after this response (EOF, not a reset)

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout: float = 10, expect_close: bool | None = None) -> RawResponse:
    """Read one response with a ``content-length`` from ``sock``. With ``expect_close`` set, also wait (up
    to ``timeout``) to see whether the server then closes the connection; a reset raises."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed inside a response body")
        body += chunk
    closed = False
    if expect_close is not None:
        sock.settimeout(timeout if expect_close else 0.3)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return RawResponse(status, headers, body[:length], closed)


def assert_openai_error(body: Any, code: str | None = None, type_: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    if type_ is not None:
        assert err["type"] == type_, body

"""A ``redis-server`` of the tests' own on 127.0.0.1 (:class:`RedisServer`), and
:func:`require_redis_server`: without ``redis-server`` or the ``redis`` package the calling test fails when
``QWEN_SERVE_REQUIRE_ENGINE=1`` (CI) and skips otherwise."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ENGINE

try:
    import redis.asyncio as redis_asyncio
except ImportError:  # pip install -e '.[redis]' (make test does)
    redis_asyncio = None  # type: ignore[assignment]

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 10.0


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` without persistence, in ``workdir``; startable again on the same
    port after :meth:`kill` (an empty store, as a restarted cache would be)."""

    def __init__(self, workdir: Path, port: int, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                     f"{(self.workdir / 'redis.log').read_text(errors='replace')[-2000:]}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"redis-server did not answer on 127.0.0.1:{self.port} within {START_TIMEOUT_S}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def require_redis_package() -> None:
    """The ``redis`` package (the ``redis`` extra, which ``make`` installs): fails without it under
    ``QWEN_SERVE_REQUIRE_ENGINE=1``, skips otherwise."""
    if redis_asyncio is None:
        message = "the redis package is not installed (pip install -e '.[redis]')"
        if REQUIRE_ENGINE:
            pytest.fail(message, pytrace=False)
        pytest.skip(f"{message}; set QWEN_SERVE_REQUIRE_ENGINE=1 to make this an error")


def require_redis_server() -> None:
    """``redis-server`` and the ``redis`` package: fails without either under ``QWEN_SERVE_REQUIRE_ENGINE=1``,
    skips otherwise."""
    require_redis_package()
    if REDIS_SERVER is None:
        message = "redis-server is not installed (make sysdeps installs it)"
        if REQUIRE_ENGINE:
            pytest.fail(message, pytrace=False)
        pytest.skip(f"{message}; set QWEN_SERVE_REQUIRE_ENGINE=1 to make this an error")

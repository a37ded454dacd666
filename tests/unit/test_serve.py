"""qwen_serve.serve: the uvicorn settings the gateway runs with, and ``qwen-serve up``'s lifecycle (SIGTERM
while the engine loads, a restart that times out, a SIGKILLed gateway) against a stand-in engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from qwen_serve.config import parse_config
from qwen_serve.gateway.http_protocol import GatewayHttpProtocol, HttpLimits
from qwen_serve.serve import _uvicorn_config
from tests import fake_engine
from tests.conftest import free_port


def test_uvicorn_settings_follow_the_config() -> None:
    config = parse_config({"model": {"source": "x"},
                           "gateway": {"host": "0.0.0.0", "port": 9000, "drain_timeout_s": 42, "log_requests": True,
                                       "max_header_bytes": 4096, "header_timeout_s": 2, "body_timeout_s": 3,
                                       "keep_alive_timeout_s": 4.5}})
    settings = _uvicorn_config(object(), config)
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.timeout_graceful_shutdown == 42  # in-flight streams get the drain time
    assert settings.access_log is True
    assert settings.log_config is None  # uvicorn logs through the queued handler of qwen_serve.logs
    assert settings.loop == "uvloop" and settings.ws == "none"
    # The gateway's httptools protocol, bound to the gateway.* limits (qwen_serve.gateway.http_protocol).
    assert isinstance(settings.http, type) and issubclass(settings.http, GatewayHttpProtocol)
    assert settings.http.limits == HttpLimits(max_header_bytes=4096, header_timeout_s=2, body_timeout_s=3,
                                              keep_alive_timeout_s=4.5)


# --- `qwen-serve up` lifecycle against the stand-in engine (tests.fake_engine) ---------------------------


@dataclass
class _Up:
    proc: subprocess.Popen[bytes]
    url: str
    engine_port: int
    state_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qwen-serve up still running after {timeout:g} s:\n{self.log()[-3000:]}") from None


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., _Up]]:
    """Start ``qwen-serve up`` on the stand-in engine (mode and engine settings per test); killed at the end."""
    started: list[_Up] = []

    def start(mode: str, core: bool = False, gateway: dict[str, Any] | None = None, **engine: Any) -> _Up:
        fake = fake_engine.install(tmp_path)
        engine_port, gateway_port = free_port(), free_port()
        env = {"PYTHONPATH": str(fake), "FAKE_ENGINE_MODE": mode, "FAKE_ENGINE_DIR": str(tmp_path),
               "FAKE_ENGINE_CORE": "1" if core else "0"}
        cfg = {"model": {"source": "qwen2.5-0.5b-instruct", "max_model_len": 2048},
               "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": engine_port, "env": env,
                          "startup_timeout_s": 600, **engine},
               "gateway": {"host": "127.0.0.1", "port": gateway_port, "drain_timeout_s": 5, **(gateway or {})},
               "auth": {"enabled": False}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "up.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(tmp_path / "config.yaml")],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(_Up(proc, f"http://127.0.0.1:{gateway_port}", engine_port, tmp_path, log_path))
        return started[-1]

    yield start
    for u in started:
        if u.proc.poll() is None:
            os.killpg(u.proc.pid, signal.SIGKILL)
            u.proc.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not {what} after {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_while_the_engine_loads_exits_0(up: Callable[..., _Up]) -> None:
    u = up("unhealthy")  # /health 503 forever: the engine is still "loading" when SIGTERM comes
    # The stand-in answers /health 503 (its SIGTERM handler is set by then) and the gateway is not ready.
    _wait_for("loading", lambda: _status(f"http://127.0.0.1:{u.engine_port}/health") == 503
              and _status(u.url + "/ready") == 503, 60)
    engine_pid = fake_engine.launches(u.state_dir)[0]
    u.proc.send_signal(signal.SIGTERM)
    assert u.wait(60) == 0, u.log()[-3000:]
    assert "engine failed to start" not in u.log()
    assert (u.state_dir / "sigterm").exists() and not _alive(engine_pid)


def test_restart_that_times_out_ends_in_a_non_zero_exit(up: Callable[..., _Up]) -> None:
    # The first engine crashes after 1 s; the restarted one never turns healthy (startup_timeout_s 3).
    u = up("crash-then-hang", restart="on-failure", max_restarts=1, startup_timeout_s=3)
    code = u.wait(90)
    log = u.log()
    assert code == 1, log[-3000:]
    assert len(fake_engine.launches(u.state_dir)) == 2
    assert "engine restart 1 failed" in log and "startup_timeout_s=3" in log


def test_sigkill_of_up_takes_the_engine_group_down(up: Callable[..., _Up]) -> None:
    u = up("ok", core=True)  # the engine starts a child that outlives it (as vLLM's EngineCore does)
    _wait_for("ready", lambda: _status(u.url + "/ready") == 200, 60)
    engine_pid = fake_engine.launches(u.state_dir)[0]
    core_pid = int((u.state_dir / f"core-{engine_pid}").read_text())
    u.proc.kill()
    u.proc.wait()
    _wait_for("engine port free", lambda: not _port_open(u.engine_port), 10)
    # The guard SIGTERMs the group, waits ORPHAN_GRACE_S (3 s), then SIGKILLs it: 20 s leaves room for this
    # VM's stalls, and a failure names what is left.
    try:
        _wait_for("engine processes gone", lambda: not _alive(engine_pid) and not _alive(core_pid), 20)
    except AssertionError as exc:
        left = {pid: _describe(pid) for pid in (engine_pid, core_pid) if _alive(pid)}
        raise AssertionError(f"{exc}: {left}") from None


def _describe(pid: int) -> str:
    """State, parent, group and command line of a live process, for a failure message."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    return f"state {fields[0]}, ppid {fields[1]}, pgrp {fields[2]}: {cmdline[:200]}"


def _raw_status(url: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` on a new connection; the answer's status and what followed until the server closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):  # until the server closes (bounded by the socket timeout)
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_up_serves_with_the_gateway_protocol(up: Callable[..., _Up]) -> None:
    """``qwen-serve up`` bounds request heads and their time as ``qwen-serve gateway`` does."""
    u = up("ok", gateway={"max_header_bytes": 4096, "header_timeout_s": 0.5})
    _wait_for("ready", lambda: _status(u.url + "/ready") == 200, 60)
    status, data = _raw_status(u.url, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000 + b"\r\n\r\n")
    assert status == 431 and b"request_header_fields_too_large" in data and b"connection: close" in data
    status, data = _raw_status(u.url, b"GET /health HTTP/1.1\r\nhost: x\r\n")
    assert status == 408 and b"request_timeout" in data


# --- gateway.workers > 1: one engine, N gateway processes on one port -----------------------------------------


def test_workers_bind_the_same_port_and_a_foreign_listener_fails_the_check() -> None:
    from qwen_serve.serve import bind_listeners, check_ports

    config = parse_config({"model": {"source": "x"}, "gateway": {"host": "127.0.0.1", "port": free_port(),
                                                                 "metrics_port": free_port()}})
    check_ports(config)  # free: the check binds and lets go
    first, second = bind_listeners(config, reuse_port=True), bind_listeners(config, reuse_port=True)
    try:
        assert [s.getsockname()[1] for s in first] == [s.getsockname()[1] for s in second]
        for sock in first:
            sock.listen(1)
        with pytest.raises(OSError, match=r"gateway\.port"):
            check_ports(config)  # a listener (even one with SO_REUSEPORT) makes the start fail
    finally:
        for sock in first + second:
            sock.close()


def _workers_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z" and b"qwen_serve.gateway.workers" in cmdline:
                out.append(int(entry.name))
    return out


def test_up_with_two_workers_starts_the_engine_once_and_drains_before_stopping_it(up: Callable[..., _Up]) -> None:
    u = up("stall", gateway={"workers": 2})
    _wait_for("ready", lambda: _status(u.url + "/ready") == 200, 60)
    assert len(_workers_of(u.proc.pid)) == 2
    for _ in range(10):  # new connections: both workers proxy to the one engine
        r = httpx.post(u.url + "/v1/chat/completions", json={"model": "qwen2.5-0.5b-instruct",
                                                              "messages": [{"role": "user", "content": "hi"}]},
                       timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert len(fake_engine.launches(u.state_dir)) == 1  # started once, by the supervisor only
    engine_pid = fake_engine.launches(u.state_dir)[0]
    u.proc.send_signal(signal.SIGTERM)
    assert u.wait(60) == 0, u.log()[-3000:]
    log = u.log()
    assert log.index("draining 2 gateway workers") < log.rindex("Finished server process")
    assert (u.state_dir / "sigterm").exists() and not _alive(engine_pid)
    assert _workers_of(u.proc.pid) == []


def test_up_with_workers_reports_restarts_once_per_host(up: Callable[..., _Up]) -> None:
    """The first engine crashes, the restarted one never turns healthy: every worker's /metrics shows one
    restart (the supervisor's count, not one per worker) and /ready says why it is not ready."""
    u = up("crash-then-hang", gateway={"workers": 2}, restart="on-failure", max_restarts=1)
    _wait_for("restarted", lambda: len(fake_engine.launches(u.state_dir)) == 2, 60)

    def restarts() -> float | None:
        try:
            text = httpx.get(u.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        found = [float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("qwen_serve_engine_restarts_total ")]
        return found[0] if found else None

    _wait_for("one restart in the metrics", lambda: restarts() == 1.0, 10)
    assert all(restarts() == 1.0 for _ in range(6))  # whichever worker answers
    r = httpx.get(u.url + "/ready", timeout=5)
    assert r.status_code == 503 and r.json()["status"] in ("starting", "engine_down")
    u.proc.send_signal(signal.SIGTERM)
    assert u.wait(60) == 0, u.log()[-3000:]


def test_up_with_workers_exits_1_when_the_engine_cannot_start(up: Callable[..., _Up]) -> None:
    u = up("exit", gateway={"workers": 2})
    assert u.wait(60) == 1, u.log()[-3000:]
    assert "engine failed to start" in u.log()
    assert _workers_of(u.proc.pid) == []

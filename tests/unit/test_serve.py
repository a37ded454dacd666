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
from qwen_serve.serve import _uvicorn_config
from tests import fake_engine
from tests.conftest import free_port


def test_uvicorn_settings_follow_the_config() -> None:
    config = parse_config({"model": {"source": "x"},
                           "gateway": {"host": "0.0.0.0", "port": 9000, "drain_timeout_s": 42, "log_requests": True}})
    settings = _uvicorn_config(object(), config)
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.timeout_graceful_shutdown == 42  # in-flight streams get the drain time
    assert settings.access_log is True
    assert settings.log_config is None  # uvicorn logs through the queued handler of qwen_serve.logs
    assert (settings.loop, settings.http) == ("uvloop", "httptools")


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

    def start(mode: str, core: bool = False, **engine: Any) -> _Up:
        fake = fake_engine.install(tmp_path)
        engine_port, gateway_port = free_port(), free_port()
        env = {"PYTHONPATH": str(fake), "FAKE_ENGINE_MODE": mode, "FAKE_ENGINE_DIR": str(tmp_path),
               "FAKE_ENGINE_CORE": "1" if core else "0"}
        cfg = {"model": {"source": "qwen2.5-0.5b-instruct", "max_model_len": 2048},
               "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": engine_port, "env": env,
                          "startup_timeout_s": 600, **engine},
               "gateway": {"host": "127.0.0.1", "port": gateway_port, "drain_timeout_s": 5},
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
    _wait_for("engine processes gone", lambda: not _alive(engine_pid) and not _alive(core_pid), 10)

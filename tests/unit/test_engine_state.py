"""EngineMonitor: a busy engine is not down, a dead or refusing one is.

The decision logic runs against a scripted ``/health`` and a fake clock; the gateway tests put a real
gateway (uvicorn in a thread) in front of the stand-in engine (``tests.fake_engine``, mode ``stall``): a
request whose body says ``stall`` keeps the stand-in's one-request-at-a-time server busy for a while, so
``/health`` goes unanswered, as vLLM's API server does while it prepares an expensive request. Once
without a supervisor (``qwen-serve gateway --upstream``), once with one (``qwen-serve up``'s wiring).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwen_serve.config import Config, parse_config
from qwen_serve.engine.inflight import gauge_reader
from qwen_serve.engine.state import BUSY_LOG_INTERVAL_S, EngineMonitor, EngineState, Probe
from qwen_serve.errors import UpstreamError, UpstreamTimeout
from qwen_serve.gateway.app import build_app
from qwen_serve.gateway.metrics import GatewayMetrics
from tests import fake_engine
from tests.conftest import free_port, serve_in_thread, wait_ready

# --- the decision logic --------------------------------------------------------------------------------------


class _Scripted:
    """An upstream whose ``/health`` answers follow a script: a status, ``"timeout"`` or ``"refused"``."""

    base_url = "scripted"

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.calls = 0

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        assert path == "/health"
        self.calls += 1
        answer = self.answers.pop(0)
        if answer == "timeout":
            raise UpstreamTimeout("slow")
        if answer == "refused":
            raise UpstreamError("engine connection failed (connect)", kind="connect")
        assert isinstance(answer, int)
        return answer, b""


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _monitor(answers: list[object], *, in_flight: Callable[[], int] | None = None,
             process_alive: Callable[[], bool] | None = None,
             **kw: Any) -> tuple[EngineMonitor, EngineState, _Clock, _Scripted]:
    clock = _Clock()
    upstream = _Scripted(answers)
    state = EngineState()
    monitor = EngineMonitor(upstream, state, in_flight=in_flight, process_alive=process_alive,  # type: ignore[arg-type]
                            clock=clock, **kw)
    return monitor, state, clock, upstream


async def _run(monitor: EngineMonitor, clock: _Clock, probes: int, step: float = 3.0) -> list[bool]:
    """``probes`` checks, ``step`` seconds apart on the fake clock."""
    seen = []
    for _ in range(probes):
        seen.append(await monitor.check())
        clock.now += step
    return seen


async def test_slow_health_while_requests_are_in_flight_is_busy_not_down() -> None:
    monitor, state, clock, _ = _monitor([200] + ["timeout"] * 100 + [200], in_flight=lambda: 2,
                                        process_alive=lambda: True)
    seen = await _run(monitor, clock, 102)  # 300 s of unanswered probes, far past every threshold
    assert all(seen)
    assert state.up and state.ready and state.describe() == "ready" and not state.busy  # the 200 ended it


async def test_busy_is_reported_in_the_state_and_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    monitor, state, clock, _ = _monitor([200] + ["timeout"] * 100, in_flight=lambda: 7)
    caplog.set_level(logging.INFO, logger="qwen_serve.engine")
    await _run(monitor, clock, 1)
    assert not state.busy
    await _run(monitor, clock, 100, step=1.0)  # 100 s busy
    assert state.up and state.busy
    busy_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine busy:")]
    assert busy_lines[0] == "engine busy: /health slow while 7 requests in flight"
    assert len(busy_lines) == -(-100 // int(BUSY_LOG_INTERVAL_S))  # one per 30 s: 4


async def test_refused_goes_down_after_the_threshold_even_with_requests_in_flight() -> None:
    monitor, state, clock, _ = _monitor([200, "refused", "refused", "refused"], in_flight=lambda: 5,
                                        process_alive=lambda: True, failure_threshold=3)
    assert await _run(monitor, clock, 4, step=1.0) == [True, True, True, False]
    assert state.describe() == "engine_down"


async def test_an_error_status_goes_down_after_the_threshold() -> None:
    monitor, state, clock, _ = _monitor([200, 503, 503, 503], in_flight=lambda: 1, failure_threshold=3)
    assert await _run(monitor, clock, 4, step=1.0) == [True, True, True, False]


async def test_a_dead_process_is_down_at_once_without_a_probe() -> None:
    alive = [True]
    monitor, state, clock, upstream = _monitor([200], in_flight=lambda: 3, process_alive=lambda: alive[0])
    assert await monitor.check()
    alive[0] = False
    assert not await monitor.check()  # the script is used up: a probe would fail the test
    assert upstream.calls == 1 and not state.up and state.describe() == "engine_down" and not state.busy
    assert await monitor.probe() is Probe.DEAD


async def test_slow_with_nothing_in_flight_goes_down_only_after_the_stall_window() -> None:
    monitor, state, clock, _ = _monitor([200] + ["timeout"] * 20, in_flight=lambda: 0, process_alive=lambda: True,
                                        failure_threshold=3, stall_down_after_s=30.0)
    assert await _run(monitor, clock, 1)
    seen = await _run(monitor, clock, 20, step=3.0)  # failures at t = 0, 3, 6, ...
    assert seen.index(False) == 10  # the first probe 30 s after the first failure
    assert not any(seen[10:]) and state.describe() == "engine_down"


async def test_without_in_flight_or_process_information_slow_needs_the_stall_window() -> None:
    # `qwen-serve gateway --upstream URL` with nothing in flight: no process to check, nothing known busy
    monitor, state, clock, _ = _monitor([200] + ["timeout"] * 12 + ["refused"] * 3, stall_down_after_s=30.0)
    seen = await _run(monitor, clock, 16, step=1.0)
    assert all(seen[:13])  # 12 s of slow probes: not down yet
    assert seen[13:] == [False, False, False]  # a refused connection ends a run of 12 failures: down


async def test_a_busy_probe_starts_the_run_of_failures_over() -> None:
    in_flight = [0]
    monitor, state, clock, _ = _monitor([200, "refused", "refused", "timeout", "refused", "refused", "refused"],
                                        in_flight=lambda: in_flight[0], failure_threshold=3)
    seen = [await monitor.check()]
    seen += [await monitor.check() for _ in range(2)]
    in_flight[0] = 1
    seen.append(await monitor.check())  # busy
    seen += [await monitor.check() for _ in range(3)]
    assert seen == [True, True, True, True, True, True, False]


async def test_busy_does_not_bring_a_down_engine_up() -> None:
    monitor, state, clock, _ = _monitor(["refused", "timeout", "timeout", 200], in_flight=lambda: 4)
    assert await _run(monitor, clock, 3, step=1.0) == [False, False, False]
    assert not state.busy and state.describe() == "starting"
    assert await monitor.check() and state.describe() == "ready"


async def test_failing_since_marks_the_start_of_a_run_of_failed_probes() -> None:
    # What the supervisor's engine.unhealthy_restart_s rule reads: the first failed probe of the current run.
    monitor, state, clock, _ = _monitor([200, "refused", 503, "timeout", 200, "timeout", "timeout"],
                                        in_flight=lambda: 0, process_alive=lambda: True)
    since = []
    for _ in range(7):
        await monitor.check()
        since.append(state.failing_since)
        clock.now += 1.0
    assert since == [None, 1001.0, 1001.0, 1001.0, None, 1005.0, 1005.0]  # also before the engine is down


async def test_a_busy_probe_is_no_failure_for_failing_since() -> None:
    in_flight = [0]
    monitor, state, clock, _ = _monitor([200, "timeout", "timeout", "timeout", "refused"],
                                        in_flight=lambda: in_flight[0], process_alive=lambda: True)
    await monitor.check()
    clock.now += 1.0
    await monitor.check()  # slow, nothing in flight: a failure
    assert state.failing_since == 1001.0
    in_flight[0] = 1
    for _ in range(2):  # busy: the run of failures is over
        clock.now += 1.0
        await monitor.check()
        assert state.failing_since is None and state.busy
    clock.now += 1.0
    await monitor.check()
    assert state.failing_since == 1004.0  # a refused connection is a failure, in flight or not


async def test_a_dead_process_starts_a_run_of_failures() -> None:
    monitor, state, clock, _ = _monitor([200], process_alive=lambda: False)
    await monitor.check()
    assert state.failing_since == 1000.0 and not state.up


def test_gauge_reader_sums_every_label_value() -> None:
    metrics = GatewayMetrics()
    read = gauge_reader(metrics.in_flight.collector)
    assert read() == 0
    metrics.in_flight.labels("m").inc()
    metrics.in_flight.labels("other").inc(2)
    assert read() == 3
    metrics.in_flight.labels("m").dec()
    assert read() == 2


# --- a gateway in front of a stalling engine --------------------------------------------------------------

STALL_S = 14.0  # longer than the old rule needed to mark an engine down (3 probes: about 9 s)
MODEL = "qwen2-random"


def _config() -> Config:
    return parse_config({"model": {"source": "x", "served_name": MODEL}, "auth": {"enabled": False}})


def _chat(url: str, content: str, timeout: float = 60) -> int:
    r = httpx.post(url + "/v1/chat/completions", timeout=timeout,
                   json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
    return r.status_code


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout:g} s"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _engine_env(fake: Path, tmp_path: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(fake), "FAKE_ENGINE_MODE": "stall", "FAKE_ENGINE_STALL_S": str(STALL_S),
            "FAKE_ENGINE_DIR": str(tmp_path)}


def _stalled_request_keeps_the_gateway_ready(url: str, engine_url: str) -> None:
    """While one request stalls the engine: ``/health`` of the engine goes unanswered, the gateway's
    ``/ready`` stays 200, and another request is passed on (answered 200 once the engine is free)."""
    results: dict[str, int] = {}

    def send(name: str, content: str) -> None:
        results[name] = _chat(url, content)

    stalled = threading.Thread(target=send, args=("stalled", "stall please"), daemon=True)
    t0 = time.monotonic()
    stalled.start()
    _wait_for("engine stalled", lambda: _status(engine_url + "/health") is None, 10)
    ready: list[int | None] = []
    other: threading.Thread | None = None
    while stalled.is_alive() and time.monotonic() - t0 < STALL_S + 30:
        ready.append(_status(url + "/ready"))
        if other is None and time.monotonic() - t0 > STALL_S - 3:  # past where the old rule gave up
            other = threading.Thread(target=send, args=("other", "hello"), daemon=True)
            other.start()
        time.sleep(0.25)
    stalled.join(30)
    assert other is not None
    other.join(30)
    assert time.monotonic() - t0 >= STALL_S - 1  # the engine was busy that long
    assert len(ready) > 20 and set(ready) == {200}, ready
    assert results == {"stalled": 200, "other": 200}, results


@pytest.fixture
def standalone_engine(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The stand-in engine in ``stall`` mode, started by hand (no supervisor); killed at the end."""
    fake = fake_engine.install(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port)],
                            env={**os.environ, **_engine_env(fake, tmp_path)}, start_new_session=True)
    try:
        _wait_for("engine healthy", lambda: _status(f"http://127.0.0.1:{port}/health") == 200, 30)
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_gateway_without_supervisor_stays_ready_while_the_engine_is_busy_and_goes_down_when_it_dies(
        standalone_engine: tuple[subprocess.Popen[bytes], int], caplog: pytest.LogCaptureFixture) -> None:
    proc, port = standalone_engine
    engine_url = f"http://127.0.0.1:{port}"
    caplog.set_level(logging.INFO, logger="qwen_serve.engine")
    with serve_in_thread(build_app(_config(), upstream_url=engine_url), free_port()) as url:
        wait_ready(url)
        _stalled_request_keeps_the_gateway_ready(url, engine_url)
        assert any(r.getMessage().startswith("engine busy: /health slow while 1 requests in flight")
                   for r in caplog.records)
        os.kill(proc.pid, signal.SIGKILL)  # nothing listens any more: refused connections
        proc.wait()
        _wait_for("ready 503", lambda: _status(url + "/ready") == 503, 15)
        assert _chat(url, "hello") == 503


def test_supervised_gateway_stays_ready_while_the_engine_is_busy_and_goes_down_when_it_dies(
        tmp_path: Path) -> None:
    from qwen_serve.engine.guard import group_members
    from qwen_serve.engine.supervisor import EngineSupervisor
    from qwen_serve.upstream import create_upstream

    fake = fake_engine.install(tmp_path)
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    state = EngineState()
    upstream = create_upstream("aiohttp", engine_url, connect_timeout=5, read_timeout=600)
    supervisor = EngineSupervisor(["--port", str(port)], {**_engine_env(fake, tmp_path), "FAKE_ENGINE_CORE": "1"},
                                  upstream, state, startup_timeout_s=60, restart="on-failure", max_restarts=1,
                                  backoff_s=3.0)
    app = build_app(_config(), upstream=upstream, state=state, engine_runner=supervisor.run,
                    engine_stopper=supervisor.stop, engine_alive=supervisor.process_alive)
    with serve_in_thread(app, free_port()) as url:
        wait_ready(url, timeout=60)
        _stalled_request_keeps_the_gateway_ready(url, engine_url)
        assert supervisor.process_alive()
        first = fake_engine.launches(tmp_path)[0]
        group = supervisor.proc.pid if supervisor.proc else -1
        core = int((tmp_path / f"core-{first}").read_text())
        os.kill(first, signal.SIGKILL)  # the engine crashes: the gateway says so within seconds
        _wait_for("ready 503", lambda: _status(url + "/ready") == 503, 15)
        assert not supervisor.process_alive() or _status(engine_url + "/health") is None
        _wait_for("restarted and ready", lambda: _status(url + "/ready") == 200, 60)
        assert len(fake_engine.launches(tmp_path)) == 2 and state.restarts == 1
        assert fake_engine.alive_at_launch(tmp_path, fake_engine.launches(tmp_path)[1]) == []
        assert group_members(group) == [] and not _alive(core)
    assert not supervisor.process_alive()

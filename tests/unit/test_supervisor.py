"""EngineSupervisor against a stand-in engine process (``tests.fake_engine``).

The stand-in is a real subprocess started exactly as the engine is (``python -m
vllm.entrypoints.openai.api_server ...``), found first on ``PYTHONPATH``: it serves ``/health`` and
behaves as the test's ``--mode`` says (healthy, exit at once, never healthy, crash after a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.engine.state import EngineState
from qwen_serve.engine.supervisor import EngineStartError, EngineSupervisor
from qwen_serve.upstream import create_upstream
from tests import fake_engine
from tests.conftest import free_port


@pytest.fixture
def fake_engine_path(tmp_path: Path) -> Path:
    return fake_engine.install(tmp_path)


def _supervisor(fake: Path, tmp_path: Path, mode: str, **kw: object) -> tuple[EngineSupervisor, EngineState, Path]:
    port = free_port()
    marker = tmp_path / f"marker-{mode}"
    state = EngineState()
    upstream = create_upstream("aiohttp", f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=5)
    env = {"PYTHONPATH": str(fake), **kw.pop("env", {})}  # type: ignore[dict-item]
    sup = EngineSupervisor(["--port", str(port), "--mode", mode, "--marker", str(marker)],
                           env, upstream, state,
                           startup_timeout_s=kw.pop("startup_timeout_s", 20), **kw)  # type: ignore[arg-type]
    return sup, state, marker


async def test_start_healthy_then_sigterm_on_stop(fake_engine_path: Path, tmp_path: Path) -> None:
    sup, state, marker = _supervisor(fake_engine_path, tmp_path, "ok")
    await sup.start()
    assert state.up and state.status == "ready" and sup.startup_seconds is not None
    await sup.stop(timeout=10)
    assert marker.read_text() == "SIGTERM"
    assert not state.up
    await sup._upstream.aclose()


async def test_exit_during_startup_reports_last_lines(fake_engine_path: Path, tmp_path: Path) -> None:
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "exit")
    with pytest.raises(EngineStartError) as info:
        await sup.start()
    assert "exited with code 3" in info.value.message
    assert "ValueError: model not found" in info.value.message
    assert state.status == "failed"
    await sup._upstream.aclose()


async def test_startup_timeout(fake_engine_path: Path, tmp_path: Path) -> None:
    sup, state, marker = _supervisor(fake_engine_path, tmp_path, "unhealthy", startup_timeout_s=2)
    with pytest.raises(EngineStartError) as info:
        await sup.start()
    assert "startup_timeout_s=2" in info.value.message
    assert sup.proc is not None and sup.proc.returncode is not None  # it was stopped
    await sup._upstream.aclose()


async def test_crash_restarts_on_failure(fake_engine_path: Path, tmp_path: Path) -> None:
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "crash", restart="on-failure", max_restarts=1)
    fatal: list[str] = []
    sup._on_fatal = fatal.append
    await sup.start()
    first_pid = sup.proc.pid if sup.proc else None
    await asyncio.wait_for(sup.watch(), 30)  # crash → restart → crash → out of restarts → fatal
    assert state.restarts == 1
    assert sup.proc is not None and sup.proc.pid != first_pid
    assert fatal and "exited with code" in fatal[0] and state.status == "failed"
    await sup.stop()
    await sup._upstream.aclose()


async def test_crash_with_restart_never_is_fatal(fake_engine_path: Path, tmp_path: Path) -> None:
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "crash", restart="never", on_fatal=fatal.append)
    await sup.start()
    await asyncio.wait_for(sup.watch(), 20)
    assert state.restarts == 0 and not state.up and fatal
    await sup._upstream.aclose()


def test_engine_runs_in_its_own_process_group(fake_engine_path: Path, tmp_path: Path) -> None:
    async def run() -> None:
        sup, _, _ = _supervisor(fake_engine_path, tmp_path, "ok")
        await sup.start()
        assert sup.proc is not None
        assert os.getpgid(sup.proc.pid) == sup.proc.pid != os.getpgid(0)
        await sup.stop()
        await sup._upstream.aclose()

    asyncio.run(run())


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _all_gone(pids: list[int], within: float = 5.0) -> bool:
    """Whether every pid is gone within ``within`` s (SIGKILL is delivered asynchronously)."""
    import time

    deadline = time.monotonic() + within
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def _until_answering(sup: EngineSupervisor) -> None:
    """Wait until the stand-in answers ``/health`` (any status): its SIGTERM handling is in place then."""
    from qwen_serve.errors import UpstreamError

    while True:
        with contextlib.suppress(UpstreamError):
            await sup._upstream.get_bytes("/health", 2.0)
            return
        await asyncio.sleep(0.05)


async def test_restart_that_times_out_is_retried_then_fatal(fake_engine_path: Path, tmp_path: Path) -> None:
    # First launch: healthy, crashes after 1 s. Every restart: /health 503 until startup_timeout_s.
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "crash-then-hang", startup_timeout_s=1.5,
                                restart="on-failure", max_restarts=2, backoff_s=0.2,
                                on_fatal=fatal.append)
    await sup.start()
    await asyncio.wait_for(sup.watch(), 60)  # crash → restart 1 times out → restart 2 times out → fatal
    pids = fake_engine.launches(tmp_path)
    assert len(pids) == 3 and state.restarts == 2
    assert len(fatal) == 1 and "restart" in fatal[0] and "startup_timeout_s=1.5" in fatal[0], fatal
    assert state.status == "failed" and not state.up
    assert _all_gone(pids)
    await sup.stop()
    await sup._upstream.aclose()


def test_restart_back_off_doubles_up_to_a_cap() -> None:
    from qwen_serve.engine.supervisor import restart_delay

    assert [restart_delay(n, 2.0) for n in range(1, 8)] == [2, 4, 8, 16, 30, 30, 30]


async def test_stop_during_startup_is_not_a_failure(fake_engine_path: Path, tmp_path: Path) -> None:
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "unhealthy", startup_timeout_s=600,
                                on_fatal=fatal.append)
    runner = asyncio.create_task(sup.run())
    await asyncio.wait_for(_until_answering(sup), 30)
    await sup.stop(timeout=10)
    await asyncio.wait_for(runner, 10)  # returns: no failure is reported for a start that stop() ended
    assert fatal == [] and not state.up and sup.stopping
    assert (tmp_path / "sigterm").exists()
    await sup._upstream.aclose()


async def test_an_engine_deaf_to_sigterm_while_starting_is_killed_soon(fake_engine_path: Path, tmp_path: Path) -> None:
    import time

    from qwen_serve.engine.supervisor import STARTING_STOP_TIMEOUT_S

    sup, _, _ = _supervisor(fake_engine_path, tmp_path, "deaf", startup_timeout_s=600)
    runner = asyncio.create_task(sup.run())
    await asyncio.wait_for(_until_answering(sup), 30)
    t0 = time.monotonic()
    await sup.stop(timeout=120)  # the drain grace of a running engine does not apply to a starting one
    elapsed = time.monotonic() - t0
    assert STARTING_STOP_TIMEOUT_S <= elapsed < STARTING_STOP_TIMEOUT_S + 15, elapsed
    assert sup.proc is not None and sup.proc.returncode == -9
    await asyncio.wait_for(runner, 10)
    await sup._upstream.aclose()


async def test_stop_during_restart_back_off_returns_at_once(fake_engine_path: Path, tmp_path: Path) -> None:
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "crash", max_restarts=3, backoff_s=300,
                                on_fatal=fatal.append)
    runner = asyncio.create_task(sup.run())
    while state.restarts == 0:  # the engine crashed; the supervisor waits out the back-off
        await asyncio.sleep(0.05)
    await sup.stop(timeout=10)
    await asyncio.wait_for(runner, 10)
    assert fatal == [] and len(fake_engine.launches(tmp_path)) == 1
    await sup._upstream.aclose()


async def test_first_start_failure_is_fatal_without_restart(fake_engine_path: Path, tmp_path: Path) -> None:
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "exit", max_restarts=3, on_fatal=fatal.append)
    await asyncio.wait_for(sup.run(), 20)
    assert len(fatal) == 1 and fatal[0].startswith("engine failed to start: engine exited with code 3")
    assert state.restarts == 0 and len(fake_engine.launches(tmp_path)) == 1
    await sup._upstream.aclose()


# --- the guard: the engine's process-group leader ---------------------------------------------------------


def _guarded(*argv: str) -> list[str]:
    import sys

    from qwen_serve.engine.guard import guarded_command

    return guarded_command([sys.executable, *argv], python=sys.executable, parent=os.getpid())


@pytest.mark.parametrize(("code", "expected"), [("raise SystemExit(7)", 7), ("import os; os.kill(os.getpid(), 9)", -9)])
def test_guard_exits_as_the_engine_did(code: str, expected: int) -> None:
    import subprocess

    proc = subprocess.run(_guarded("-c", code), start_new_session=True, timeout=30)
    assert proc.returncode == expected


def test_guard_kills_what_the_engine_leaves_behind(tmp_path: Path) -> None:
    import subprocess

    # The "engine" starts a child and exits at once, leaving the child orphaned in the group.
    script = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
              f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))")
    proc = subprocess.run(_guarded("-c", script), start_new_session=True, timeout=30)
    assert proc.returncode == 0
    child = int((tmp_path / "child").read_text())
    assert _all_gone([child])


class _Scripted:
    """An upstream whose /health answers follow a script (200, 503, or raise)."""

    base_url = "scripted"

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers

    async def get_bytes(self, path: str, timeout: float) -> tuple[int, bytes]:
        from qwen_serve.errors import UpstreamTimeout

        answer = self.answers.pop(0)
        if answer == "timeout":
            raise UpstreamTimeout("slow")
        assert isinstance(answer, int)
        return answer, b""


async def test_monitor_needs_consecutive_failures_to_mark_down() -> None:
    from qwen_serve.engine.state import EngineMonitor

    state = EngineState()
    monitor = EngineMonitor(_Scripted([503, 200, "timeout", "timeout", 200, "timeout", 503, 503]),  # type: ignore[arg-type]
                            state, failure_threshold=3)
    seen = [await monitor.check() for _ in range(8)]
    # down until the first success; slow answers (fewer than 3 failures in a row) keep it up; the third
    # failure in a row, an error status, marks it down (tests/unit/test_engine_state.py: the other cases)
    assert seen == [False, True, True, True, True, True, True, False]
    assert state.describe() == "engine_down"


# --- a crashed engine's process group is gone before the restart -------------------------------------------


def _core_of(state_dir: Path, engine_pid: int) -> int:
    return int((state_dir / f"core-{engine_pid}").read_text())


async def _until(predicate: Callable[[], bool], within: float) -> None:
    """Wait (without blocking the loop) until ``predicate`` holds; fails after ``within`` s."""
    import time

    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not true after {within:g} s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("victim", ["api-server", "guard"])
async def test_a_crash_takes_the_old_group_down_before_the_restart(fake_engine_path: Path, tmp_path: Path,
                                                                   victim: str) -> None:
    import signal

    from qwen_serve.engine.guard import group_members

    # The stand-in starts a "core" child that ignores SIGTERM and its parent's death: only SIGKILL ends it.
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "ok", restart="on-failure", max_restarts=1,
                                backoff_s=0.2, group_grace_s=0.5, env={"FAKE_ENGINE_CORE": "stubborn"})
    await sup.start()
    assert sup.proc is not None
    old_group = sup.proc.pid
    old_engine = fake_engine.launches(tmp_path)[0]
    old_core = _core_of(tmp_path, old_engine)
    assert sorted(group_members(old_group)) == sorted([old_group, old_engine, old_core])
    watcher = asyncio.create_task(sup.watch())
    # SIGKILL of vLLM's API server (the guard then stops the group), or of the guard itself (the supervisor
    # is then the one that finds the core left in the group)
    os.kill(old_engine if victim == "api-server" else old_group, signal.SIGKILL)
    await _until(lambda: len(fake_engine.launches(tmp_path)) == 2 and state.up, 60)
    new_engine = fake_engine.launches(tmp_path)[1]
    assert fake_engine.alive_at_launch(tmp_path, new_engine) == []  # nothing of the old engine at the restart
    assert group_members(old_group) == [] and not _alive(old_core)
    assert state.restarts == 1 and sup.proc.pid != old_group
    new_group, new_core = sup.proc.pid, _core_of(tmp_path, new_engine)
    await sup.stop(timeout=10)
    await asyncio.wait_for(watcher, 10)
    assert group_members(new_group) == [] and not _alive(new_core)  # stop() returns once the group is gone
    await sup._upstream.aclose()


async def test_reap_group_escalates_to_sigkill_without_blocking_the_loop() -> None:
    import subprocess
    import sys
    import time

    from qwen_serve.engine.group import reap_group
    from qwen_serve.engine.guard import group_members

    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)")
    leader = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    try:
        await _until(lambda: len(group_members(leader.pid)) == 2, 30)
        members = group_members(leader.pid)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        t0 = time.monotonic()
        left = await reap_group(leader.pid, grace=0.5, gone_within=10)
        elapsed = time.monotonic() - t0
        ticker.cancel()
        assert left == [] and group_members(leader.pid) == []
        assert not any(_alive(pid) for pid in members if pid != leader.pid)
        assert 0.5 <= elapsed < 10, elapsed  # SIGTERM was ignored: SIGKILL after the grace
        assert ticks >= 20, ticks  # the loop kept running meanwhile
        assert leader.wait(10) == -9
        assert await reap_group(leader.pid) == []  # an empty group: nothing to do, at once
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_guard_escalates_to_sigkill_for_what_ignores_sigterm(tmp_path: Path) -> None:
    import subprocess
    import time

    from qwen_serve.engine.guard import LEFTOVER_GRACE_S

    # The "engine" leaves a child that ignores SIGTERM; the guard exits only once that child is gone.
    script = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); import time; time.sleep(0.5); "
              f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))")
    t0 = time.monotonic()
    proc = subprocess.run(_guarded("-c", script), start_new_session=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0
    assert not _alive(int((tmp_path / "child").read_text()))  # at once: the guard waited for it
    assert elapsed >= LEFTOVER_GRACE_S, elapsed


# --- an engine that turns unhealthy after it was ready is restarted -----------------------------------------


def _monitor_for(sup: EngineSupervisor, in_flight: Callable[[], int] | None = None) -> Any:
    """The gateway's health monitor on ``sup``'s engine, probing quickly (every 0.2 s, 0.5 s time-out)."""
    from qwen_serve.engine.state import EngineMonitor

    return EngineMonitor(sup._upstream, sup.state, interval=0.2, timeout=0.5, in_flight=in_flight,
                         process_alive=sup.process_alive)


def _cores(state_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in state_dir.glob("core-*")]


async def test_an_engine_that_turns_unhealthy_is_restarted_and_the_restart_counts(
        fake_engine_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    # Every launch answers /health 200 for 1.5 s, then 503: ready, then unhealthy.
    fatal: list[str] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "sicken", restart="on-failure", max_restarts=1,
                                backoff_s=0.2, unhealthy_restart_s=1.0,
                                on_fatal=fatal.append,
                                env={"FAKE_ENGINE_HEALTHY_S": "1.5", "FAKE_ENGINE_CORE": "1"})
    caplog.set_level(logging.INFO, logger="qwen_serve.engine")
    monitor = _monitor_for(sup)
    monitor.start()
    try:
        # ready → unhealthy 1 s → group stopped → restart 1 → ready → unhealthy 1 s → none left → fatal
        await asyncio.wait_for(sup.run(), 60)
    finally:
        await monitor.aclose()
    pids = fake_engine.launches(tmp_path)
    assert len(pids) == 2 and state.restarts == 1
    assert fake_engine.alive_at_launch(tmp_path, pids[1]) == []  # the unhealthy engine's group was gone
    assert len(fatal) == 1, fatal
    assert fatal[0].startswith("engine unhealthy: its /health probes failed for "), fatal
    assert "engine.unhealthy_restart_s=1)" in fatal[0] and "engine.max_restarts=1, restarts so far 1" in fatal[0]
    unhealthy = [float(re.findall(r"probes failed for ([0-9.]+) s", r.getMessage())[0]) for r in caplog.records
                 if r.levelno == logging.ERROR and r.getMessage().startswith("engine unhealthy")]
    assert len(unhealthy) == 2 and all(1.0 <= s < 5.0 for s in unhealthy), unhealthy
    assert "restarting the engine in 0.2 s (restart 1 of at most 1): engine unhealthy" in caplog.text
    assert state.failed and state.status == "failed" and not state.up
    assert not sup.process_alive() and _all_gone(pids + _cores(tmp_path))  # killed, not left behind
    await sup.stop()
    await sup._upstream.aclose()


async def test_a_frozen_engine_is_killed_and_restarted(fake_engine_path: Path, tmp_path: Path) -> None:
    import signal
    import time

    from qwen_serve.engine.guard import group_members

    # SIGSTOP of the whole group (guard, API server, a core that ignores SIGTERM) is a hang: /health goes
    # unanswered, nothing is in flight. The stopped processes act on SIGTERM only once continued.
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "ok", restart="on-failure", max_restarts=2,
                                backoff_s=0.2, unhealthy_restart_s=1.0, group_grace_s=0.5,
                                env={"FAKE_ENGINE_CORE": "stubborn"})
    monitor = _monitor_for(sup)
    monitor.start()
    watcher: asyncio.Task[None] | None = None
    old_group = -1
    try:
        await sup.start()
        assert sup.proc is not None
        old_group = sup.proc.pid
        old = fake_engine.launches(tmp_path)[0]
        old_members = group_members(old_group)
        assert len(old_members) == 3, old_members  # guard, API server, core
        watcher = asyncio.create_task(sup.watch())
        await _until(lambda: state.failing_since is None, 10)
        t0 = time.monotonic()
        os.killpg(old_group, signal.SIGSTOP)
        await _until(lambda: len(fake_engine.launches(tmp_path)) == 2 and state.up, 60)
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 30, elapsed  # not before unhealthy_restart_s
        assert state.restarts == 1 and sup.proc.pid != old_group and not state.failed
        new = fake_engine.launches(tmp_path)[1]
        assert fake_engine.alive_at_launch(tmp_path, new) == []  # the frozen group was gone at the restart
        assert group_members(old_group) == [] and not any(_alive(pid) for pid in old_members)
        assert old != new and not _alive(_core_of(tmp_path, old))
        assert str(old) in (tmp_path / "sigterm").read_text().split()  # continued, it acted on SIGTERM
        await sup.stop(timeout=10)
        await asyncio.wait_for(watcher, 10)
    finally:
        await monitor.aclose()
        if watcher is not None and not watcher.done():
            watcher.cancel()
        for pid in fake_engine.launches(tmp_path) + _cores(tmp_path) + ([old_group] if old_group > 0 else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)  # SIGKILL ends a stopped process too
        await sup._upstream.aclose()


async def test_a_busy_engine_is_not_restarted(fake_engine_path: Path, tmp_path: Path) -> None:
    import httpx

    # One request stalls the stand-in's one-request-at-a-time server for 3 s: /health goes unanswered while
    # that request is in flight. That is busy, not unhealthy, however long it lasts.
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "stall", restart="on-failure", max_restarts=2,
                                backoff_s=0.2, unhealthy_restart_s=1.0, env={"FAKE_ENGINE_STALL_S": "3"})
    in_flight = [0]
    busy_seen: list[bool] = []
    monitor = _monitor_for(sup, in_flight=lambda: in_flight[0])
    monitor.start()
    watcher: asyncio.Task[None] | None = None
    try:
        await sup.start()
        watcher = asyncio.create_task(sup.watch())
        port = sup.argv[sup.argv.index("--port") + 1]

        async def note_busy() -> None:
            for _ in range(200):  # bounded: 200 × 0.05 s
                busy_seen.append(state.busy)
                await asyncio.sleep(0.05)

        noter = asyncio.create_task(note_busy())
        in_flight[0] = 1
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b'{"stall": 1}')
        finally:
            in_flight[0] = 0
        assert r.status_code == 200
        await asyncio.sleep(1.5)  # past unhealthy_restart_s after the stall
        noter.cancel()
        assert any(busy_seen), "the monitor never saw the engine busy"
        assert len(fake_engine.launches(tmp_path)) == 1 and state.restarts == 0
        assert sup.process_alive() and state.up and not watcher.done()
        await sup.stop(timeout=10)
        await asyncio.wait_for(watcher, 10)
    finally:
        await monitor.aclose()
        if watcher is not None and not watcher.done():
            watcher.cancel()
        await sup._upstream.aclose()


async def test_unhealthy_time_counts_from_the_later_of_the_first_failed_probe_and_readiness(
        fake_engine_path: Path, tmp_path: Path) -> None:
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "ok", unhealthy_restart_s=5.0)
    assert sup.unhealthy_for(1000.0) is None  # never ready
    state.failing_since = 990.0
    assert sup.unhealthy_for(1000.0) is None  # still starting: startup_timeout_s's business
    sup._ready_at = 995.0  # probes that failed during start-up do not count
    assert sup.unhealthy_for(1000.0) == 5.0
    state.failing_since = 997.0
    assert sup.unhealthy_for(1000.0) == 3.0
    state.failing_since = None
    assert sup.unhealthy_for(1000.0) is None
    await sup._upstream.aclose()


def test_health_fails_once_the_engine_is_down_for_good(fake_engine_path: Path, tmp_path: Path) -> None:
    import time

    import httpx

    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app
    from tests.conftest import serve_in_thread, wait_ready

    # restart: never, and no on_fatal (nothing ends the process): the gateway stays up in a failed state,
    # so its own /health (the liveness probe) must say so.
    port = free_port()
    state = EngineState()
    upstream = create_upstream("aiohttp", f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=5)
    sup = EngineSupervisor(["--port", str(port), "--mode", "sicken"],
                           {"PYTHONPATH": str(fake_engine_path), "FAKE_ENGINE_HEALTHY_S": "3",
                            "FAKE_ENGINE_DIR": str(tmp_path)},
                           upstream, state, startup_timeout_s=30, restart="never", unhealthy_restart_s=1.0)
    config = parse_config({"model": {"source": "x", "served_name": "m"}, "auth": {"enabled": False}})
    app = build_app(config, upstream=upstream, state=state, engine_runner=sup.run, engine_stopper=sup.stop,
                    engine_alive=sup.process_alive)
    with serve_in_thread(app, free_port()) as url:
        wait_ready(url, timeout=30)
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 30 s after the engine turned unhealthy"
            time.sleep(0.1)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json() == {"status": "failed"}
        assert state.failed and state.restarts == 0 and len(fake_engine.launches(tmp_path)) == 1
        assert not sup.process_alive()  # the unhealthy engine was stopped, not left holding its memory
        assert _all_gone(fake_engine.launches(tmp_path))

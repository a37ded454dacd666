"""EngineSupervisor against a stand-in engine process.

The stand-in is a real subprocess started exactly as the engine is (``python -m
vllm.entrypoints.openai.api_server ...``), found first on ``PYTHONPATH``: it serves ``/health`` and
behaves as the test's ``--mode`` says (healthy, exit at once, never healthy, crash after a while).
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest

from qwen_serve.engine.state import EngineState
from qwen_serve.engine.supervisor import EngineStartError, EngineSupervisor
from qwen_serve.gateway.upstream import create_upstream
from tests.conftest import free_port

FAKE_ENGINE = '''
import argparse, http.server, os, signal, sys, threading, time
p = argparse.ArgumentParser()
p.add_argument("--port", type=int); p.add_argument("--mode"); p.add_argument("--marker")
a, _ = p.parse_known_args()
print("fake engine starting", a.mode, flush=True)
if a.mode == "exit":
    print("ValueError: model not found", flush=True); sys.exit(3)
def term(*_):
    open(a.marker, "w").write("SIGTERM"); sys.exit(0)
signal.signal(signal.SIGTERM, term)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = a.mode != "unhealthy"
        self.send_response(200 if ok else 503); self.end_headers()
    def log_message(self, *args): pass
srv = http.server.HTTPServer(("127.0.0.1", a.port), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
if a.mode == "crash":
    time.sleep(1.0); os._exit(9)
while True:
    time.sleep(0.1)
'''


@pytest.fixture
def fake_engine_path(tmp_path: Path) -> Path:
    pkg = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "fake" / "vllm", tmp_path / "fake" / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(textwrap.dedent(FAKE_ENGINE))
    return tmp_path / "fake"


def _supervisor(fake: Path, tmp_path: Path, mode: str, **kw: object) -> tuple[EngineSupervisor, EngineState, Path]:
    port = free_port()
    marker = tmp_path / f"marker-{mode}"
    state = EngineState()
    upstream = create_upstream("aiohttp", f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=5)
    sup = EngineSupervisor(["--port", str(port), "--mode", mode, "--marker", str(marker)],
                           {"PYTHONPATH": str(fake)}, upstream, state,
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
    restarts: list[int] = []
    sup, state, _ = _supervisor(fake_engine_path, tmp_path, "crash", restart="on-failure", max_restarts=1,
                                on_restart=lambda: restarts.append(1))
    fatal: list[str] = []
    sup._on_fatal = fatal.append
    await sup.start()
    first_pid = sup.proc.pid if sup.proc else None
    await asyncio.wait_for(sup.watch(), 30)  # crash → restart → crash → out of restarts → fatal
    assert restarts == [1] and state.restarts == 1
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
    monitor = EngineMonitor(_Scripted([503, 200, "timeout", "timeout", 200, "timeout", 503, "timeout"]),  # type: ignore[arg-type]
                            state, failure_threshold=3)
    seen = [await monitor.check() for _ in range(8)]
    # down until the first success; a busy engine's slow answers (fewer than 3 in a row) keep it up
    assert seen == [False, True, True, True, True, True, True, False]
    assert state.describe() == "engine_down"

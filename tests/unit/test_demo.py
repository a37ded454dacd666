"""``qwen-serve demo``: the key file, ``--keep``/``--no-keep`` and the keep-serving loop (no engine).

The stack itself (``qwen-serve up``) is replaced by a fake process and the two answers by stubs, so
these tests cover what ``run_demo`` does around them: where the key goes and with which mode, what is
printed, which signals end a kept demo and that the stack is always drained.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_serve import cli, demo, keys


# -------------------------------------------------------------------------------------------- key file


def test_demo_key_path_default_and_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QWEN_SERVE_CACHE", raising=False)
    assert demo.demo_key_path() == tmp_path / "home" / ".cache" / "qwen-serve" / "demo-key"
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    assert demo.demo_key_path() == tmp_path / "cache" / "demo-key"


def test_write_demo_key_is_0600_even_over_a_readable_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "new" / "dir"))
    old = os.umask(0)
    try:
        path = demo.write_demo_key("qs-first")
        assert path == tmp_path / "new" / "dir" / "demo-key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "qs-first\n"
        path.chmod(0o644)
        demo.write_demo_key("qs-second")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "qs-second\n"
    assert [p.name for p in path.parent.iterdir()] == ["demo-key"]  # no temporary file left behind


# ---------------------------------------------------------------------------------- --keep / --no-keep


class _Stdin(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize(("argv", "tty", "keep"), [
    ([], True, True), ([], False, False),
    (["--keep"], False, True), (["--no-keep"], True, False),
])
def test_keep_flag_defaults_to_stdin_being_a_terminal(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                      tty: bool, keep: bool) -> None:
    seen: dict[str, Any] = {}

    def fake_run_demo(**kw: Any) -> int:
        seen.update(kw)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr("sys.stdin", _Stdin(tty))
    assert cli.main(["demo", "--model", "random", "--port", "8099", *argv]) == 0
    assert seen == {"model": "random", "port": 8099, "keep": keep}


# ------------------------------------------------------------------------------------ the demo itself


class FakeStack:
    """Stands in for the ``qwen-serve up`` child: runs until signalled (or until ``exit_code`` is set)."""

    instances: list[FakeStack] = []

    def __init__(self, argv: list[str], **kw: Any) -> None:
        self.argv = argv
        self.signals: list[int] = []
        self.returncode: int | None = None
        self.exit_code: int | None = None
        self.killed = False
        FakeStack.instances.append(self)

    def poll(self) -> int | None:
        if self.returncode is None and self.exit_code is not None:
            self.returncode = self.exit_code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.returncode is None:
            self.returncode = 0  # drains at once

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None, "waited for a stack that was never stopped"
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.returncode = -9


@pytest.fixture
def fake_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """``run_demo`` with no model build, no child process and canned answers; returns the cache dir."""
    import qwen_serve.demo_models as demo_models

    FakeStack.instances.clear()
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(cache))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(demo_models, "ensure_demo_model", lambda kind: tmp_path / "model")
    monkeypatch.setattr(subprocess, "Popen", FakeStack)
    monkeypatch.setattr(demo, "_wait_ready", lambda base, proc, timeout: True)
    monkeypatch.setattr(demo, "_streamed", lambda client, model: None)
    monkeypatch.setattr(demo, "_guided", lambda client, model: True)
    return cache


def _secret_in_keys_file(key: str, tmp_path: Path) -> bool:
    (work,) = tmp_path.glob("qwen-serve-demo-*")
    entries = keys.load_keys_file(work / "keys.yaml").keys
    return [e.sha256 for e in entries] == [keys.hash_secret(key)]


def test_no_keep_answers_then_drains(fake_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.run_demo(model="smollm2", keep=False) == 0
    (stack,) = FakeStack.instances
    assert stack.signals == [signal.SIGTERM] and not stack.killed
    out = capsys.readouterr().out
    assert "serving on" not in out and "draining (SIGTERM)" in out
    key = (fake_demo / "demo-key").read_text().strip()
    assert key.startswith("qs-") and _secret_in_keys_file(key, tmp_path)
    assert key not in out
    assert stat.S_IMODE((fake_demo / "demo-key").stat().st_mode) == 0o600


def _signal_when_serving(monkeypatch: pytest.MonkeyPatch, sig: int) -> threading.Timer:
    """Send ``sig`` to this process shortly after the demo says it is serving (never earlier: before the
    demo's handlers are installed the signal's default action would end the test run)."""
    timer = threading.Timer(0.3, os.kill, (os.getpid(), sig))
    say = demo._say

    def spy(msg: str) -> None:
        say(msg)
        if "serving on" in msg:
            timer.start()

    monkeypatch.setattr(demo, "_say", spy)
    return timer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_keep_serves_until_a_signal_then_drains(fake_demo: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    timer = _signal_when_serving(monkeypatch, sig)
    t0 = time.monotonic()
    try:
        assert demo.run_demo(model="smollm2", keep=True) == 0
    finally:
        timer.cancel()
    assert time.monotonic() - t0 >= 0.25 and timer.finished.is_set()  # it did wait for the signal
    (stack,) = FakeStack.instances
    assert stack.signals == [signal.SIGTERM] and not stack.killed
    out = capsys.readouterr().out
    key_file = fake_demo / "demo-key"
    assert (f"serving on http://127.0.0.1:8080 (model smollm2-135m-instruct) until Ctrl-C; API key in {key_file}"
            in out)
    assert "bench run --scenario benchmarks/scenarios/demo.yaml" in out
    assert key_file.read_text().strip() not in out
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_keep_hint_names_the_model_and_port_when_not_the_defaults(
        fake_demo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    timer = _signal_when_serving(monkeypatch, signal.SIGTERM)
    try:
        assert demo.run_demo(model="random", port=8123, keep=True) == 0
    finally:
        timer.cancel()
    out = capsys.readouterr().out
    assert "serving on http://127.0.0.1:8123 (model qwen2-random)" in out
    assert "--scenario benchmarks/scenarios/demo.yaml --url http://127.0.0.1:8123 --model qwen2-random" in out


def test_keep_reports_a_stack_that_dies(fake_demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def die_soon() -> None:
        time.sleep(0.3)
        FakeStack.instances[0].exit_code = 1

    threading.Thread(target=die_soon, daemon=True).start()
    assert demo.run_demo(model="smollm2", keep=True) == 1
    out = capsys.readouterr().out
    assert "the stack exited by itself (code 1)" in out
    assert FakeStack.instances[0].signals == []  # nothing left to drain


def test_failed_answer_does_not_keep(fake_demo: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "_guided", lambda client, model: False)
    assert demo.run_demo(model="smollm2", keep=True) == 1
    assert "serving on" not in capsys.readouterr().out
    assert FakeStack.instances[0].signals == [signal.SIGTERM]

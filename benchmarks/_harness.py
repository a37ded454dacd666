"""Plumbing shared by the benchmark scripts: processes, CPU time, a fake upstream, the gateway, reports.

The scripts import it as ``from _harness import ...``: they run as ``python benchmarks/X.py``, so this
folder is first on ``sys.path``. Each script spawns itself for its subprocesses (``X.py _fake ...``,
``X.py _gateway ...``) and calls the matching server function of this module there.

Contracts:

* :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago (the caller binds it soon).
* :func:`cpu_seconds`: user + system CPU seconds of one live process so far, from ``/proc/<pid>/stat``
  (resolution ``1 / SC_CLK_TCK``); raises ``OSError`` when the process is gone.
* :func:`process_tree`: ``{pid: CPU seconds}`` of a process and all its live descendants, from one pass
  over ``/proc``; processes that exit during the pass are left out. :func:`tree_cpu_s` sums it (0.0 for
  ``None``).
* :class:`Proc`, :func:`spawn`, :func:`wait_ready`, :func:`stop`: ``spawn`` starts ``python <script>
  <args>`` (optionally behind a ``prefix`` command such as valgrind) with stdout discarded, stderr piped
  unless told otherwise, cwd the repository root; the :class:`Proc` holds the ``Popen`` and the URL
  ``http://127.0.0.1:<port>`` it will serve.
  ``wait_ready`` polls ``GET url+path`` until 200 and raises ``SystemExit`` (with the tail of stderr) if
  the process exits first or the timeout passes. ``stop`` sends SIGTERM to every live process, then
  waits up to 10 s for each and kills (and reaps) the ones still running.
* :func:`pct`: the nearest-rank percentile ``q`` (0-100) of ``values``; NaN when empty.
* :func:`reject_constant`: a ``json.loads(parse_constant=...)`` hook that raises ``ValueError`` for
  ``NaN``, ``Infinity`` and ``-Infinity`` (strict JSON).
* :func:`markdown_table`: the lines of a Markdown table (header, ``|---|`` rule, one line per row; each
  cell rendered with ``str``). :func:`write_section` replaces the section of ``RESULTS.md`` that
  starts with the line ``heading`` (up to the next ``## `` heading) with ``text``, or appends it; a
  hand-written ``### Reading these figures`` block at the end of the old section is kept after it.
  The other sections are kept as they are; a missing file starts as ``# qwen-serve benchmark results``.
* :func:`gateway_app`, :func:`uvicorn_config`, :func:`serve_app`: ``build_app`` for a config of model
  :data:`MODEL` with the given ``auth`` section and ``gateway`` fields (UI off, 127.0.0.1, ``port``) in
  front of ``upstream``; served by uvicorn with the settings of ``qwen_serve/serve.py``
  (``_uvicorn_config``: uvloop, httptools, lifespan on, keep-alive 75 s, no server header) but quiet
  logs (warnings only, no access log). ``serve_app`` blocks until SIGINT/SIGTERM.
* :func:`serve_fake`: a fast fake OpenAI upstream (raw asyncio + uvloop + httptools) on 127.0.0.1:port
  until SIGTERM; see its docstring for what it answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

if TYPE_CHECKING:
    import aiohttp
    import uvicorn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
NOTES = "### Reading these figures"
MODEL = "qwen2-random"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ============================================================================ processes and CPU time
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(root: int) -> dict[int, float]:
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent pid, CPU s)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = _stat(d.name)
            except OSError:
                continue
            stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        grew = bool(more)
        tree |= more
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def tree_cpu_s(root: int | None) -> float:
    return 0.0 if root is None else sum(process_tree(root).values())


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn(script: str | Path, name: str, args: Sequence[str], port: int, prefix: Sequence[str] = (),
          stderr: Any = subprocess.PIPE) -> Proc:
    popen = subprocess.Popen([*prefix, sys.executable, str(Path(script).resolve()), *args],
                             stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
    return Proc(name, f"http://127.0.0.1:{port}", popen)


async def wait_ready(session: aiohttp.ClientSession, proc: Proc, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            err = proc.popen.stderr.read().decode() if proc.popen.stderr else ""
            raise SystemExit(f"{proc.name} exited early:\n{err[-2000:]}")
        try:
            async with session.get(proc.url + path) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{proc.name} not ready at {proc.url}{path} after {timeout}s")


def stop(procs: Sequence[Proc]) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.popen.wait(10)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


# ============================================================================ figures and reports
def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    current = path.read_text() if path.exists() else "# qwen-serve benchmark results\n"
    start = current.find(heading + "\n")
    if start < 0:
        new = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = current.find("\n## ", start + len(heading))
        old = current[start:end if end >= 0 else len(current)]
        notes = old[old.find(NOTES):].rstrip("\n") if NOTES in old else ""
        tail = current[end + 1:] if end >= 0 else ""
        body = text.rstrip("\n") + ("\n\n" + notes if notes else "")
        new = current[:start] + body + "\n" + ("\n" + tail if tail else "")
    path.write_text(new)


# ============================================================================ gateway (subprocess side)
def gateway_app(port: int, upstream: str, auth: dict[str, Any], **gateway: Any) -> Any:
    sys.path.insert(0, str(ROOT))
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app

    config = parse_config({
        "model": {"source": MODEL},
        "auth": auth,
        "gateway": {**gateway, "ui": False, "host": "127.0.0.1", "port": port},
    })
    return build_app(config, upstream_url=upstream)


def uvicorn_config(app: Any, port: int) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="on",
                          access_log=False, log_level="warning", timeout_keep_alive=75, server_header=False)


def serve_app(app: Any, port: int, *, tune_gc: bool = True) -> None:
    """Serve ``app`` as ``qwen-serve`` does: uvicorn with uvloop and httptools, the collector tuned
    (:func:`qwen_serve.gc_tuning.tune_for_serving`) unless ``tune_gc`` is false."""
    import uvicorn

    from qwen_serve.gc_tuning import tune_for_serving

    server = uvicorn.Server(uvicorn_config(app, port))
    if tune_gc:
        tune_for_serving()
    server.run()


# ============================================================================ fake upstream (subprocess side)
FakeStyle = Literal["vllm", "minimal"]
_FINGERPRINT = "vllm-0.32.0-fake"
_WORDS = (" the", " cat", " sat", " on", " a", " mat", "t", " over", " study", " where")
_USAGE = {"prompt_tokens": 46, "total_tokens": 50, "completion_tokens": 4}
_COMPLETIONS: dict[str, dict[str, Any]] = {
    "vllm": {
        "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1795931646, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " plcat\",ty", "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "reasoning": None},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}],
        "service_tier": None, "system_fingerprint": _FINGERPRINT, "usage": _USAGE,
    },
    "minimal": {
        "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1795931646, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " the cat sat"},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "usage": _USAGE,
    },
}
_MODELS = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]}
_HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (ctype, len(body), body)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse_events(style: FakeStyle, n: int, usage: bool) -> list[bytes]:
    """The HTTP chunks of one streamed chat completion: role chunk, ``n`` content chunks (the last with
    ``finish_reason: length``), the usage chunk when ``usage``, ``data: [DONE]`` (no terminating chunk)."""
    vllm = style == "vllm"
    base = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1795931645,
            "model": MODEL}
    logprobs: dict[str, Any] = {"logprobs": None} if vllm else {}
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, **logprobs, "finish_reason": None}
    events = [{**base, "choices": [role], **({"prompt_token_ids": None, "prompt_text": None} if vllm else {})}]
    for i in range(n):
        last = i == n - 1
        choice = {"index": 0, "delta": {"content": _WORDS[i % len(_WORDS)] if vllm else " tok"}, **logprobs,
                  "finish_reason": "length" if last else None}
        if vllm:
            choice["token_ids"] = None
            if last:
                choice["stop_reason"] = None
        events.append({**base, "choices": [choice]})
    if usage:
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 46, "total_tokens": 46 + n,
                                                         "completion_tokens": n},
                       **({"system_fingerprint": _FINGERPRINT} if vllm else {})})
    return [_http_chunk(b"data: " + _compact(e) + b"\n\n") for e in events] + [_http_chunk(b"data: [DONE]\n\n")]


def serve_fake(port: int, style: FakeStyle) -> None:
    """Serve a fake OpenAI upstream (vLLM's routes) on 127.0.0.1:``port`` until SIGTERM.

    * ``GET /health``: 200, empty. ``GET /v1/models``: the one model :data:`MODEL`. ``GET /metrics``: a
      one-gauge Prometheus text. Anything else: 404.
    * ``POST /v1/chat/completions`` (and ``/v1/completions``): without ``stream``, a fixed chat completion
      with ``usage`` (sent after ``fake_delay_ms`` ms when the request has that field). With
      ``"stream": true``: a chunked SSE stream (:func:`sse_events`), ``max_tokens`` (default 16) content
      events, the usage chunk only with ``stream_options.include_usage``, then ``[DONE]``.
    * ``style="vllm"``: vLLM's exact JSON shapes (the fields it sends as ``null`` included); every request
      body is parsed, as an engine would; a stream goes out one event per HTTP chunk and per loop turn
      (an engine step), or one every ``fake_interval_ms`` ms when the request has that field, and waits
      when the client's socket buffer is full.
    * ``style="minimal"``: the smallest OpenAI shapes; the body is parsed only when it streams or has a
      ``fake_*`` field; a stream without ``fake_interval_ms`` goes out in one write. Never the bottleneck.
    """
    import httptools
    import uvloop

    vllm = style == "vllm"
    completion = _response(_compact(_COMPLETIONS[style]))
    models = _response(json.dumps(_MODELS).encode())
    metrics = _response(b"# HELP vllm:up fake\n# TYPE vllm:up gauge\nvllm:up 1\n", b"text/plain")
    streams: dict[tuple[int, bool], tuple[list[bytes], bytes]] = {}  # (events, the whole response)

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.p = httptools.HttpRequestParser(self)
            self.url = b""
            self.body: list[bytes] = []
            self.writable = asyncio.Event()
            self.writable.set()
            self.task: asyncio.Task[None] | None = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.task is not None:
                self.task.cancel()
            self.writable.set()

        def pause_writing(self) -> None:
            self.writable.clear()

        def resume_writing(self) -> None:
            self.writable.set()

        def data_received(self, data: bytes) -> None:
            try:
                self.p.feed_data(data)
            except httptools.HttpParserError:
                self.t.close()

        def on_message_begin(self) -> None:
            self.url, self.body = b"", []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            url = self.url
            if url.startswith(b"/v1/chat/completions") or url.startswith(b"/v1/completions"):
                body = b"".join(self.body)
                parse = vllm or b'"stream": true' in body or b'"stream":true' in body or b'"fake_' in body
                self.generate(json.loads(body or b"{}") if parse else {})
            elif url.startswith(b"/health"):
                self.t.write(_HEALTH)
            elif url.startswith(b"/v1/models"):
                self.t.write(models)
            elif url.startswith(b"/metrics"):
                self.t.write(metrics)
            else:
                self.t.write(_NOT_FOUND)

        def generate(self, req: dict[str, Any]) -> None:
            if req.get("stream"):
                key = (int(req.get("max_tokens") or 16), bool((req.get("stream_options") or {}).get("include_usage")))
                if key not in streams:
                    events = sse_events(style, *key)
                    streams[key] = events, _SSE_HEAD + b"".join(events) + _LAST_CHUNK
                events, whole = streams[key]
                interval = float(req.get("fake_interval_ms") or 0) / 1000
                if vllm or interval:
                    self.task = asyncio.get_running_loop().create_task(self.stream(events, interval))
                else:
                    self.t.write(whole)
                return
            delay = float(req.get("fake_delay_ms") or 0) / 1000
            if delay:
                asyncio.get_running_loop().call_later(delay, self.reply, completion)
            else:
                self.t.write(completion)

        def reply(self, data: bytes) -> None:
            if not self.t.is_closing():
                self.t.write(data)

        async def stream(self, events: list[bytes], interval: float) -> None:
            t = self.t
            t.write(_SSE_HEAD)
            t0 = time.monotonic()
            for i, ev in enumerate(events):
                if interval:
                    delay = t0 + i * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)  # one event per stream per loop turn (like an engine step)
                if not self.writable.is_set():
                    await self.writable.wait()
                if t.is_closing():
                    return
                t.write(ev)
            t.write(_LAST_CHUNK)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, backlog=1024)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        server.close()

    uvloop.run(main())

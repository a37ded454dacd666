"""The built-in trivial upstream: a fast fake vLLM/OpenAI server that ``qwen-serve bench ceiling`` (and the
tests and benchmark scripts) measure a client against.

Raw asyncio + uvloop + httptools, one process, one thread: it costs the machine as little as a server
can, so the client under test, not the stub, is what saturates. It speaks HTTP/1.1 with keep-alive on
127.0.0.1 (or ``host``) and answers:

* ``GET /health``: 200, empty body. ``GET /v1/models``: a vLLM-shaped list with the one model
  :data:`LISTED_MODEL` (``"stub"``). Any other unknown route: 404, empty body.
* ``POST /v1/chat/completions`` and ``POST /v1/completions``: any ``model`` is accepted and echoed
  (:data:`LISTED_MODEL` when the body has none). The answer has ``n`` generated tokens, ``n`` =
  ``max_completion_tokens`` or ``max_tokens`` or, when neither is given, ``chunks_default`` (16); one
  token per streamed event. ``usage.prompt_tokens`` is :func:`count_prompt_tokens` of the body (the
  same count ``/tokenize`` gives), ``usage.completion_tokens`` is ``n``.

  - With ``"stream": true``: a chunked ``text/event-stream``. Chat: the role event (``delta``
    ``{"role": "assistant", "content": ""}``), ``n`` content events (the last with
    ``finish_reason: "length"``), the usage event when ``stream_options.include_usage``, then
    ``data: [DONE]``. Completions: ``n`` ``text_completion`` events, usage event, ``[DONE]``. With
    ``stream_options.continuous_usage_stats`` (and ``include_usage``, as vLLM requires), every event
    carries ``usage`` with the cumulative ``completion_tokens`` (0 on the chat role event), in vLLM
    0.32's exact JSON shape (chat: ``{"prompt_tokens", "total_tokens", "completion_tokens",
    "completion_tokens_details": null}``).
  - Without ``stream``: one JSON completion with ``usage``, after ``fake_delay_ms`` ms when the body
    has that field.
* ``POST /tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` → ``{"count": n, "tokens": [...],
  "max_model_len": 2048}``. A token is one whitespace-separated word (the word ``w<k>`` is token
  ``k``, any other word a CRC32 of it); each chat message adds 5 template tokens (ChatML:
  ``<|im_start|>``, role, ``\\n`` ... ``<|im_end|>``, ``\\n``). ``POST /detokenize``: ``{"tokens":
  [...]}`` → ``{"prompt": "w<t0> w<t1> ..."}``, so ``tokenize(detokenize(ts))`` counts ``len(ts)``:
  workloads with exact input lengths work against the stub.
* ``GET /metrics``: a small vLLM-shaped Prometheus text, one series per model name seen (and
  ``"stub"``), labels ``engine="0"`` and ``model_name``: gauges ``vllm:num_requests_running`` (streams
  and delayed answers in flight), ``vllm:num_requests_waiting`` (0), ``vllm:kv_cache_usage_perc``
  (0.01 per running request, at most 1); counters ``vllm:num_preemptions_total`` (0),
  ``vllm:prefix_cache_queries_total`` (prompt tokens), ``vllm:prefix_cache_hits_total`` (the prompt
  tokens of the longest leading run of chat messages seen before, whole prompt minus one token for an
  exact repeat), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total``.

Control fields in a request body (not part of the OpenAI API):

* ``"stub_freeze_s": s``: the stub stops answering **all** requests (it neither reads nor writes) for
  ``s`` seconds, by blocking its event loop with ``time.sleep``, which is what a stalled server looks
  like to a client, then answers this request normally. For tests of coordinated omission.
* ``"fake_interval_ms": ms``: stream pacing, event ``i`` leaves at ``i * ms`` after the first.
* ``"fake_delay_ms": ms``: non-streaming answers after ``ms``.

Styles:

* ``"vllm"`` (default): vLLM 0.32's exact JSON shapes (the fields it sends as ``null`` included); every
  body is parsed, as an engine would; a stream goes out one event per HTTP chunk and per event-loop
  turn (an engine step), or paced by ``fake_interval_ms``, and waits while the client's socket buffer
  is full.
* ``"minimal"``: the smallest OpenAI shapes; a non-streaming body is parsed only when it has a
  ``fake_*``/``stub_*`` field (else the model is found with a regular expression and the answer is the
  fixed 4-token completion); a stream without ``fake_interval_ms`` goes out in one write.

Entry points: :func:`serve` (blocks until SIGTERM/SIGINT), :func:`start_stub` (a subprocess
``python -m qwen_serve.bench.stub --port P --style S [--chunks N] [--cpu K]``, returned once
``/health`` answers), :func:`sse_events` (the bytes of one stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

__all__ = [
    "LISTED_MODEL",
    "MAX_MODEL_LEN",
    "StubProcess",
    "StubStyle",
    "count_prompt_tokens",
    "main",
    "serve",
    "sse_events",
    "start_stub",
    "tokenize",
]

StubStyle = Literal["vllm", "minimal"]
LISTED_MODEL = "stub"
MAX_MODEL_LEN = 2048
TEMPLATE_TOKENS = 5  # per chat message: <|im_start|> role \n ... <|im_end|> \n
_FINGERPRINT = "vllm-0.32.0-stub"
_CHAT_ID = "chatcmpl-0123456789abcdef0123456789abcdef"
_CMPL_ID = "cmpl-0123456789abcdef0123456789abcdef"
_CREATED = 1795931645
_WORDS = (" the", " cat", " sat", " on", " a", " mat", "t", " over", " study", " where")
_ROLE_IDS = {"system": 8948, "user": 872, "assistant": 77091, "tool": 14172}
_IM_START, _IM_END, _NEWLINE = 151644, 151645, 198
_VOCAB = 151643
_WORD_TOKEN = re.compile(r"w(\d+)")
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_FIXED_USAGE = {"prompt_tokens": 46, "total_tokens": 50, "completion_tokens": 4}

_HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CACHE_MAX = 4096


# ============================================================================ wire helpers
def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (ctype, len(body), body)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ============================================================================ tokens
def _text(content: Any) -> str:
    """The text of a chat message's ``content``: a string, or the ``text`` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


def _word_id(word: str) -> int:
    m = _WORD_TOKEN.fullmatch(word)
    return int(m.group(1)) if m else zlib.crc32(word.encode()) % _VOCAB


def tokenize(body: dict[str, Any]) -> list[int]:
    """The stub's tokens of a ``/tokenize`` (or completion) body: ``messages`` or ``prompt``."""
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens: list[int] = []
        for m in messages:
            m = m if isinstance(m, dict) else {}
            role = _ROLE_IDS.get(str(m.get("role")), zlib.crc32(str(m.get("role")).encode()) % _VOCAB)
            tokens += [_IM_START, role, _NEWLINE, *map(_word_id, _text(m.get("content")).split()), _IM_END, _NEWLINE]
        return tokens
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [_word_id(w) for w in prompt.split()]
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        return [t for p in prompt for t in tokenize({"prompt": p})]
    return []


def count_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a request as the stub counts them: whitespace words, + 5 per chat message."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(TEMPLATE_TOKENS + len(_text(m.get("content") if isinstance(m, dict) else None).split())
                   for m in messages)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(count_prompt_tokens({"prompt": p}) for p in prompt)
    return 0


# ============================================================================ answers
def _usage(prompt: int, completion: int, details: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                             "completion_tokens": completion}
    if details:  # vLLM's chat continuous usage: completion_tokens_details is set (to None), so it is sent
        usage["completion_tokens_details"] = None
    return usage


def sse_events(style: StubStyle, n: int, usage: bool, *, continuous: bool = False, model: str = LISTED_MODEL,
               prompt_tokens: int = 46, chat: bool = True) -> list[bytes]:
    """The HTTP chunks of one streamed completion (no terminating zero-length chunk).

    Chat: role event, ``n`` content events (the last with ``finish_reason: "length"``), the usage event
    when ``usage``, ``data: [DONE]``. Completions (``chat=False``): ``n`` text events, usage, ``[DONE]``.
    ``continuous`` (only with ``usage``, as in vLLM) puts the cumulative usage on every event.
    """
    vllm = style == "vllm"
    continuous = continuous and usage
    events: list[dict[str, Any]] = []
    if chat:
        base: dict[str, Any] = {"id": _CHAT_ID, "object": "chat.completion.chunk", "created": _CREATED,
                                "model": model}
        logprobs: dict[str, Any] = {"logprobs": None} if vllm else {}
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, **logprobs, "finish_reason": None}
        first: dict[str, Any] = {**base, "choices": [role]}
        if continuous:
            first["usage"] = _usage(prompt_tokens, 0, vllm)
        if vllm:
            first.update(prompt_token_ids=None, prompt_text=None)
        events.append(first)
    else:
        base = {"id": _CMPL_ID, "object": "text_completion", "created": _CREATED, "model": model}
    for i in range(n):
        last = i == n - 1
        text = _WORDS[i % len(_WORDS)] if vllm else " tok"
        choice: dict[str, Any]
        if chat:
            choice = {"index": 0, "delta": {"content": text}, **logprobs, "finish_reason": "length" if last else None}
            if vllm:
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length" if last else None,
                      "stop_reason": None}
            if vllm:
                choice.update(prompt_token_ids=None, token_ids=None)
        event: dict[str, Any] = {**base, "choices": [choice]}
        if continuous:
            event["usage"] = _usage(prompt_tokens, i + 1, vllm and chat)
        if vllm and last and not usage:
            event["system_fingerprint"] = _FINGERPRINT
        events.append(event)
    if usage:
        events.append({**base, "choices": [], "usage": _usage(prompt_tokens, n, False),
                       **({"system_fingerprint": _FINGERPRINT} if vllm else {})})
    return [_http_chunk(b"data: " + _compact(e) + b"\n\n") for e in events] + [_http_chunk(b"data: [DONE]\n\n")]


def _completion(style: StubStyle, n: int, model: str, prompt_tokens: int, chat: bool) -> bytes:
    """A whole non-streaming answer (HTTP response bytes)."""
    text = "".join(_WORDS[i % len(_WORDS)] for i in range(n))
    usage = _usage(prompt_tokens, n, False)
    body: dict[str, Any]
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if style == "vllm":
            message.update(refusal=None, annotations=None, audio=None, function_call=None, reasoning=None)
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length",
                                  "stop_reason": None}
        if style == "vllm":
            choice["token_ids"] = None
        body = {"id": _CHAT_ID, "object": "chat.completion", "created": _CREATED, "model": model,
                "choices": [choice]}
    else:
        body = {"id": _CMPL_ID, "object": "text_completion", "created": _CREATED, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None}]}
    if style == "vllm":
        body.update(service_tier=None, system_fingerprint=_FINGERPRINT)
    body["usage"] = usage
    return _response(_compact(body))


def _models() -> bytes:
    card = {"id": LISTED_MODEL, "object": "model", "created": _CREATED, "owned_by": "vllm", "root": LISTED_MODEL,
            "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": []}
    return _response(_compact({"object": "list", "data": [card]}))


@dataclass
class _ModelStats:
    running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    hits: int = 0
    finished: int = 0


_METRICS: tuple[tuple[str, str, str, str], ...] = (
    # (name, type, help, _ModelStats field or a constant)
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "0"),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", "kv"),
    ("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.", "0"),
    ("vllm:prefix_cache_queries", "counter", "Prefix cache queries, in terms of number of queried tokens.",
     "prompt_tokens"),
    ("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.", "hits"),
    ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens", "counter", "Number of generation tokens processed.", "generation_tokens"),
    ("vllm:request_success", "counter", "Count of successfully processed requests.", "finished"),
)


def _metrics_text(stats: dict[str, _ModelStats]) -> bytes:
    lines: list[str] = []
    for name, kind, doc, source in _METRICS:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        sample = name + ("_total" if kind == "counter" else "")
        for model, s in stats.items():
            if source == "0":
                value = 0.0
            elif source == "kv":
                value = min(1.0, 0.01 * s.running)
            else:
                value = float(getattr(s, source))
            label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{sample}{{engine="0",model_name="{label}"}} {value!r}')
    return ("\n".join(lines) + "\n").encode()


# ============================================================================ the server
def serve(port: int, style: StubStyle = "vllm", *, chunks_default: int = 16, host: str = "127.0.0.1",
          sock: socket.socket | None = None) -> None:
    """Serve the stub (see the module docstring) on ``host:port`` (or the listening ``sock``) until
    SIGTERM or SIGINT."""
    import httptools
    import uvloop

    vllm = style == "vllm"
    minimal_fixed: dict[bytes, bytes] = {}  # minimal, unparsed: model → the fixed 4-token answer
    streams: dict[tuple[Any, ...], tuple[list[bytes], bytes]] = {}  # key → (events, the whole response)
    answers: dict[tuple[Any, ...], bytes] = {}
    stats: dict[str, _ModelStats] = {LISTED_MODEL: _ModelStats()}
    prefixes: set[int] = set()
    models = _models()

    def model_stats(model: str) -> _ModelStats:
        s = stats.get(model)
        if s is None:
            if len(stats) > 64:  # a client inventing names must not grow /metrics without bound
                return stats[LISTED_MODEL]
            s = stats[model] = _ModelStats()
        return s

    def prefix_hits(req: dict[str, Any], prompt_tokens: int) -> int:
        """Tokens of the longest leading run of messages seen before (an exact repeat: all but one)."""
        messages = req.get("messages")
        if not isinstance(messages, list):
            return 0
        if len(prefixes) > 1_000_000:
            prefixes.clear()
        h, hits, tokens = 0, 0, 0
        for i, m in enumerate(messages):
            m = m if isinstance(m, dict) else {}
            text = _text(m.get("content"))
            h = hash((h, str(m.get("role")), text))
            tokens += TEMPLATE_TOKENS + len(text.split())
            if h in prefixes:
                hits = tokens - 1 if i == len(messages) - 1 else tokens
            else:
                prefixes.add(h)
        return max(0, min(hits, prompt_tokens))

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.loop = asyncio.get_running_loop()
            self.p = httptools.HttpRequestParser(self)
            self.url = b""
            self.body: list[bytes] = []
            self.writable = True
            self.waiting = False  # a stream waits for resume_writing
            self.handle: asyncio.Handle | None = None
            self.events: list[bytes] = []
            self.i = 0
            self.t0 = 0.0
            self.interval = 0.0
            self.current: _ModelStats | None = None  # the stats of the stream or delayed answer in flight

        def connection_lost(self, exc: Exception | None) -> None:
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
            self.done(False)

        def pause_writing(self) -> None:
            self.writable = False

        def resume_writing(self) -> None:
            self.writable = True
            if self.waiting:
                self.waiting = False
                self.step()

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
            path = self.url.split(b"?", 1)[0]
            if path in (b"/v1/chat/completions", b"/v1/completions"):
                self.generate(b"".join(self.body), path == b"/v1/chat/completions")
            elif path == b"/health":
                self.t.write(_HEALTH)
            elif path == b"/v1/models":
                self.t.write(models)
            elif path == b"/metrics":
                self.t.write(_response(_metrics_text(stats), b"text/plain; version=0.0.4; charset=utf-8"))
            elif path in (b"/tokenize", b"/detokenize"):
                self.tokens(b"".join(self.body), path == b"/tokenize")
            else:
                self.t.write(_NOT_FOUND)

        def tokens(self, raw: bytes, encode: bool) -> None:
            try:
                req = json.loads(raw or b"{}")
                if encode:
                    tokens = tokenize(req)
                    out: dict[str, Any] = {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}
                else:
                    out = {"prompt": " ".join("w%d" % int(t) for t in req.get("tokens") or [])}
            except (ValueError, TypeError, AttributeError):
                self.t.write(_BAD_REQUEST)
                return
            self.t.write(_response(_compact(out)))

        def generate(self, raw: bytes, chat: bool) -> None:
            stream_hint = b'"stream": true' in raw or b'"stream":true' in raw
            if not vllm and not (stream_hint or b'"fake_' in raw or b'"stub_' in raw):
                m = _MODEL_FIELD.search(raw)
                name = m.group(1) if m else LISTED_MODEL.encode()
                answer = minimal_fixed.get(name)
                if answer is None:
                    body = {"id": _CHAT_ID, "object": "chat.completion", "created": _CREATED,
                            "model": json.loads(b'"' + name + b'"'),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": " the cat sat"},
                                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
                            "usage": _FIXED_USAGE}
                    answer = minimal_fixed[name] = _response(_compact(body))
                    if len(minimal_fixed) > _CACHE_MAX:
                        minimal_fixed.clear()
                self.t.write(answer)
                return
            try:
                req = json.loads(raw or b"{}")
                if not isinstance(req, dict):
                    raise ValueError
            except ValueError:
                self.t.write(_BAD_REQUEST)
                return
            freeze = req.get("stub_freeze_s")
            if freeze:
                time.sleep(float(freeze))  # blocks the loop: no request is read or answered meanwhile
            model = str(req.get("model") or LISTED_MODEL)
            n = int(req.get("max_completion_tokens") or req.get("max_tokens") or chunks_default)
            prompt_tokens = count_prompt_tokens(req)
            s = model_stats(model)
            s.prompt_tokens += prompt_tokens
            s.hits += prefix_hits(req, prompt_tokens) if chat else 0
            if req.get("stream"):
                options = req.get("stream_options") or {}
                usage = bool(options.get("include_usage"))
                key = (chat, model, n, usage, usage and bool(options.get("continuous_usage_stats")), prompt_tokens)
                cached = streams.get(key)
                if cached is None:
                    if len(streams) > _CACHE_MAX:
                        streams.clear()
                    events = sse_events(style, n, usage, continuous=key[4], model=model, prompt_tokens=prompt_tokens,
                                        chat=chat)
                    cached = streams[key] = events, _SSE_HEAD + b"".join(events) + _LAST_CHUNK
                events, whole = cached
                interval = float(req.get("fake_interval_ms") or 0) / 1000
                s.generation_tokens += n
                if vllm or interval:
                    self.current = s
                    s.running += 1
                    self.events, self.i, self.interval = events, 0, interval
                    self.t.write(_SSE_HEAD)
                    self.t0 = self.loop.time()
                    self.step()
                else:
                    self.t.write(whole)
                    s.finished += 1
                return
            akey = (chat, model, n, prompt_tokens)
            answer = answers.get(akey)
            if answer is None:
                if len(answers) > _CACHE_MAX:
                    answers.clear()
                answer = answers[akey] = _completion(style, n, model, prompt_tokens, chat)
            s.generation_tokens += n
            delay = float(req.get("fake_delay_ms") or 0) / 1000
            if delay:
                self.current = s
                s.running += 1
                self.handle = self.loop.call_later(delay, self.reply, answer)
            else:
                self.t.write(answer)
                s.finished += 1

        def done(self, ok: bool) -> None:
            if self.current is not None:
                self.current.running -= 1
                self.current.finished += ok
                self.current = None

        def reply(self, data: bytes) -> None:
            self.handle = None
            if not self.t.is_closing():
                self.t.write(data)
            self.done(True)

        def step(self) -> None:
            """Send the next event of the stream: one per loop turn (like an engine step) or on the pace."""
            self.handle = None
            t = self.t
            if t.is_closing():
                self.done(False)
                return
            if not self.writable:
                self.waiting = True
                return
            if self.interval:
                due = self.t0 + self.i * self.interval
                if due > self.loop.time():
                    self.handle = self.loop.call_at(due, self.step)
                    return
            t.write(self.events[self.i])
            self.i += 1
            if self.i == len(self.events):
                t.write(_LAST_CHUNK)
                self.events = []
                self.done(True)
            else:
                self.handle = self.loop.call_soon(self.step)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(Conn, sock=sock, backlog=1024)
        else:
            server = await loop.create_server(Conn, host, port, backlog=1024)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        loop.add_signal_handler(signal.SIGINT, stopped.set)
        await stopped.wait()
        server.close()

    uvloop.run(main())


# ============================================================================ as a subprocess
@dataclass
class StubProcess:
    """A stub running in a subprocess (from :func:`start_stub`); ``close()`` or ``with`` stops it."""

    popen: subprocess.Popen[bytes]
    url: str
    port: int
    _stderr: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def close(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL; reaps the child. Idempotent."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> StubProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stub(*, chunks_default: int = 16, style: StubStyle = "vllm", cpu: int | None = None,
               port: int | None = None, timeout: float = 30.0) -> StubProcess:
    """Start ``python -m qwen_serve.bench.stub`` (pinned to CPU ``cpu`` when given) and return once its
    ``/health`` answers 200. Raises ``RuntimeError`` with the child's stderr if it exits or is not
    ready within ``timeout`` seconds (the child is then stopped)."""
    port = port or _free_port()
    args = [sys.executable, "-m", "qwen_serve.bench.stub", "--port", str(port), "--style", style,
            "--chunks", str(chunks_default)]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    stderr = tempfile.TemporaryFile()
    popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    stub = StubProcess(popen, f"http://127.0.0.1:{port}", port, stderr)
    deadline = time.monotonic() + timeout
    problem = f"not ready after {timeout:g} s"
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            problem = f"exited with status {popen.returncode}"
            break
        try:
            with urllib.request.urlopen(stub.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return stub
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    if popen.poll() is None:
        popen.kill()
        popen.wait()
    stderr.seek(0)
    tail = stderr.read().decode(errors="replace")[-3000:]
    stub.close()
    raise RuntimeError(f"the bench stub ({' '.join(args[1:])}) {problem}; its stderr:\n{tail or '(empty)'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_serve.bench.stub", description=__doc__.split("\n\n")[0]
                                if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--style", choices=("vllm", "minimal"), default="vllm")
    p.add_argument("--chunks", type=int, default=16, help="generated tokens when a request sets no max_tokens")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    serve(args.port, args.style, chunks_default=args.chunks, host=args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

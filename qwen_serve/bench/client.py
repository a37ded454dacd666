"""One async HTTP client that sends a request when it is due and timestamps every SSE event.

:class:`Client` owns one ``aiohttp.ClientSession`` (unbounded connector: the run, not the pool, decides
concurrency) for its ``async with`` block. :meth:`Client.send` posts one streamed request (a chat completion,
or with ``api="responses"`` a Responses API call: :mod:`qwen_serve.bench.apis`) and fills a
:class:`~qwen_serve.bench.records.RequestRecord`; it never raises for a failed request (the failure is
recorded as ``status``/``error``), only for cancellation.

The hot path is kept to what timing needs: per network read one ``perf_counter()`` and one list append.
SSE framing and JSON decoding happen when the response has ended, all events of a response in one
``json.loads`` call. An event is stamped with the time of the read that completed it.

Token accounting: the client asks for ``stream_options: {include_usage, continuous_usage_stats}``
(vLLM reports cumulative ``completion_tokens`` on every event, so each event's token count is known);
``output_tokens``/``input_tokens`` come from the final ``usage``. A server that ignores
``continuous_usage_stats`` gets its ``usage`` tokens spread evenly over the events that carried text.
``client_output_tokens`` (events with text, one token each) is what a client without ``usage`` would
report; the run shows the mismatch. Responses API streams: :func:`qwen_serve.bench.apis.fill_responses`.
"""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from qwen_serve.bench.apis import API_PATHS, Api, fill_responses, responses_body
from qwen_serve.bench.events import decode_events, int_field, raw_json, str_field, stream_error
from qwen_serve.bench.exporter import Exporter, NullExporter
from qwen_serve.bench.records import RequestRecord, RequestSpec

__all__ = ["Client", "encode_body", "parse_stream"]


def encode_body(spec: RequestSpec, model: str, *, continuous_usage: bool = True, api: Api = "chat") -> bytes:
    """The JSON bytes sent for ``spec`` (encoded once, before the run): the chat body with streamed usage, or
    for ``api="responses"`` its Responses API translation (streamed, ``store: false``)."""
    body: dict[str, Any]
    if api == "responses":
        body = {"model": model, **responses_body(spec.body), "stream": True, "store": False}
    else:
        body = {"model": model, **spec.body, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": continuous_usage}}
    return json.dumps(body, separators=(",", ":")).encode()


class Client:
    """Streams chat completions (or Responses API calls, ``api="responses"``) to ``url`` (a server or
    gateway: ``/v1/chat/completions`` or ``/v1/responses`` is appended)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 exporter: Exporter | None = None, api: Api = "chat") -> None:
        self.api: Api = api
        self.url = url.rstrip("/") + API_PATHS[api]
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30)
        self.exporter = exporter or NullExporter()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                              skip_auto_headers=("User-Agent",), auto_decompress=False)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, body: bytes, rec: RequestRecord, t0: float) -> None:
        """Post ``body`` now and fill ``rec`` (``sent``, ``end``, ``status``, events, usage, ``error``)."""
        session = self._session
        assert session is not None, "Client used outside 'async with'"
        reads: list[bytes] = []
        times: list[float] = []
        rec.sent = time.perf_counter() - t0
        self.exporter.request_sent(rec.sent - rec.scheduled)
        try:
            async with session.post(self.url, data=body, headers=self.headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    _record_http_error(rec, resp.status, await resp.read())
                else:
                    async for data in resp.content.iter_any():
                        times.append(time.perf_counter())
                        reads.append(data)
        except asyncio.TimeoutError:
            rec.error, rec.error_message = "timeout", f"no complete answer within {self.timeout.total} s"
        except aiohttp.ClientError as exc:
            rec.error, rec.error_message = "connection_error", f"{type(exc).__name__}: {exc}"
        rec.end = time.perf_counter() - t0
        if rec.error is None and rec.status == 200:
            parse_stream(rec, times, reads, t0, api=self.api)
        self.exporter.request_done(rec)


def _record_http_error(rec: RequestRecord, status: int, raw: bytes) -> None:
    code: str | None = None
    message = raw[:300].decode(errors="replace")
    try:
        err = json.loads(raw)
        if isinstance(err, dict):
            e = err.get("error", err)
            if isinstance(e, dict):
                c = e.get("code") or e.get("type")
                code = str(c) if c is not None else None
                message = str(e.get("message", message))[:300]
    except ValueError:
        pass
    rec.error = code or f"http_{status}"
    rec.error_message = message


def parse_stream(rec: RequestRecord, times: Sequence[float], reads: Sequence[bytes], t0: float,
                 *, api: Api = "chat") -> None:
    """Frame the SSE ``reads`` (stamped ``times``) into events and fill ``rec``'s tokens and event times
    (chat chunks, or Responses API events with ``api="responses"``).

    An event is stamped with the time of the read that holds the last byte of its blank-line separator.
    Each ``data:`` line is one payload; all payloads are decoded in one ``json.loads`` call.
    """
    raw = reads[0] if len(reads) == 1 else b"".join(reads)
    if b"\r" in raw:  # CRLF framing: normalise read by read so the stamps stay with their reads
        reads = [r.replace(b"\r\n", b"\n") for r in reads]
        raw = b"".join(reads)
    ends = list(accumulate(map(len, reads)))  # cumulative byte offsets: read i holds [ends[i-1], ends[i])
    blocks = raw.split(b"\n\n")
    blocks.pop()  # the text after the last separator is not a complete event
    ev_times: list[float] = []
    payloads: list[bytes] = []
    offset = -1  # the offset of each block's separator's last byte
    for block in blocks:
        offset += len(block) + 2
        if block[:5] == b"data:" and b"\n" not in block:
            payload = block[5:].strip()
            if payload and payload != b"[DONE]":
                payloads.append(payload)
                ev_times.append(times[bisect_right(ends, offset)])
            continue
        for line in block.split(b"\n"):  # several lines (event:, id:, comments, multi-line data)
            if line[:5] == b"data:":
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    payloads.append(payload)
                    ev_times.append(times[bisect_right(ends, offset)])
    if api == "responses":
        fill_responses(rec, ev_times, payloads, t0, _tokens_per_event)
        return
    if not payloads:
        _fill(rec, ev_times, [], t0)
        return
    events = decode_events(payloads, _DECODER, _lenient)
    if events is None:
        rec.error, rec.error_message = "stream_error", "an SSE event was not valid JSON"
        return
    _fill(rec, ev_times, events, t0)


# The fields of an OpenAI chat-completion chunk the client reads; the decoder skips the rest.
class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: msgspec.Raw | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: msgspec.Raw | None = None


_DECODER = msgspec.json.Decoder(list[_Event])


def _lenient(ev: Any) -> _Event:
    """An event decoded without a schema, its fields kept only where they have the expected type."""
    if not isinstance(ev, dict):
        return _Event()
    choices = []
    for ch in ev.get("choices") or ():
        if isinstance(ch, dict):
            d = ch.get("delta")
            delta = _Delta(str_field(d, "content"), str_field(d, "reasoning_content"), str_field(d, "reasoning"),
                           raw_json(d.get("tool_calls") or None)) if isinstance(d, dict) else None
            choices.append(_Choice(delta, str_field(ch, "text"), str_field(ch, "finish_reason")))
    u = ev.get("usage")
    usage = _Usage(int_field(u, "prompt_tokens"), int_field(u, "completion_tokens")) if isinstance(u, dict) else None
    return _Event(choices, usage, raw_json(ev.get("error")))


def _fill(rec: RequestRecord, ev_times: Sequence[float], events: Sequence[_Event], t0: float) -> None:
    texts: list[str] = []
    chunk_times: list[float] = []
    cumulative: list[int | None] = []
    usage: _Usage | None = None
    last_cum = 0
    for t, ev in zip(ev_times, events):
        if (error := stream_error(ev.error)) is not None:
            rec.error, rec.error_message = error
        u = ev.usage
        cum = None
        if u is not None:
            usage = u
            cum = u.completion_tokens
        choices = ev.choices
        carried = False
        if choices:
            for ch in choices:
                delta = ch.delta
                piece = ch.text
                if delta is not None:
                    piece = delta.content or delta.reasoning_content or delta.reasoning or piece
                    if delta.tool_calls is not None and bytes(delta.tool_calls) not in (b"null", b"[]"):
                        texts.append(bytes(delta.tool_calls).decode())
                        carried = True
                if piece:
                    texts.append(piece)
                    carried = True
                if ch.finish_reason:
                    rec.finish_reason = ch.finish_reason
        # A token-bearing event: text arrived, or (continuous usage) the token count rose.
        if carried or (cum is not None and cum > last_cum and choices):
            chunk_times.append(t - t0)
            cumulative.append(cum)
        if cum is not None:
            last_cum = max(last_cum, cum)
    rec.text = "".join(texts)
    rec.chunk_times = chunk_times
    rec.client_output_tokens = len(chunk_times)
    if usage is not None:
        rec.input_tokens = usage.prompt_tokens
        rec.output_tokens = usage.completion_tokens
    rec.chunk_tokens = _tokens_per_event(cumulative, rec.output_tokens)


def _tokens_per_event(cumulative: Sequence[int | None], total: int | None) -> list[int]:
    n = len(cumulative)
    if n == 0:
        return []
    if all(c is not None for c in cumulative):
        out, prev = [], 0
        for c in cumulative:
            assert c is not None
            out.append(max(0, c - prev))
            prev = max(prev, c)
        return out
    if total is None or total <= 0:
        return [1] * n
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]

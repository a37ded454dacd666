"""One async HTTP client that sends a request when it is due and timestamps every SSE event.

:class:`Client` owns one ``aiohttp.ClientSession`` (unbounded connector: the run, not the pool, decides
concurrency) for its ``async with`` block. :meth:`Client.send` posts one streamed chat completion and
fills a :class:`~qwen_serve.bench.records.RequestRecord`; it never raises for a failed request (the
failure is recorded as ``status``/``error``), only for cancellation.

The hot path is kept to what timing needs: per network read one ``perf_counter()`` and one list append.
SSE framing and JSON decoding happen when the response has ended, all events of a response in one
``json.loads`` call. An event is stamped with the time of the read that completed it.

Token accounting: the client asks for ``stream_options: {include_usage, continuous_usage_stats}``
(vLLM reports cumulative ``completion_tokens`` on every event, so each event's token count is known);
``output_tokens``/``input_tokens`` come from the final ``usage``. A server that ignores
``continuous_usage_stats`` gets its ``usage`` tokens spread evenly over the events that carried text.
``client_output_tokens`` (events with text, one token each) is what a client without ``usage`` would
report; the run shows the mismatch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp

from qwen_serve.bench.exporter import Exporter, NullExporter
from qwen_serve.bench.records import RequestRecord, RequestSpec

__all__ = ["Client", "encode_body", "parse_stream"]

_perf = time.perf_counter


def encode_body(spec: RequestSpec, model: str, *, continuous_usage: bool = True) -> bytes:
    """The JSON bytes sent for ``spec`` (encoded once, before the run)."""
    body = {"model": model, **spec.body, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": continuous_usage}}
    return json.dumps(body, separators=(",", ":")).encode()


class Client:
    """Streams chat completions to ``url`` (``/v1/chat/completions`` of a server or gateway)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 exporter: Exporter | None = None) -> None:
        self.url = url.rstrip("/") + "/v1/chat/completions"
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
        rec.sent = _perf() - t0
        self.exporter.request_sent(rec.sent - rec.scheduled)
        try:
            async with session.post(self.url, data=body, headers=self.headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    _record_http_error(rec, resp.status, await resp.read())
                else:
                    append_t, append_r = times.append, reads.append
                    async for data in resp.content.iter_any():
                        append_t(_perf())
                        append_r(data)
        except asyncio.TimeoutError:
            rec.error, rec.error_message = "timeout", f"no complete answer within {self.timeout.total} s"
        except aiohttp.ClientError as exc:
            rec.error, rec.error_message = "connection_error", f"{type(exc).__name__}: {exc}"
        rec.end = _perf() - t0
        if rec.error is None and rec.status == 200:
            parse_stream(rec, times, reads, t0)
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


def parse_stream(rec: RequestRecord, times: Sequence[float], reads: Sequence[bytes], t0: float) -> None:
    """Frame the SSE ``reads`` (stamped ``times``) into events and fill ``rec``'s tokens and event times."""
    ev_times: list[float] = []
    payloads: list[bytes] = []
    buf = b""
    for t, data in zip(times, reads):
        buf = buf + data if buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            for line in buf[start:end].split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload and payload != b"[DONE]":
                        ev_times.append(t)
                        payloads.append(payload)
            start = end + 2
        buf = buf[start:]
    try:
        events = json.loads(b"[" + b",".join(payloads) + b"]") if payloads else []
    except ValueError:
        rec.error, rec.error_message = "stream_error", "an SSE event was not valid JSON"
        return
    _fill(rec, ev_times, events, t0)


def _fill(rec: RequestRecord, ev_times: Sequence[float], events: Sequence[Any], t0: float) -> None:
    texts: list[str] = []
    chunk_times: list[float] = []
    cumulative: list[int | None] = []
    usage: dict[str, Any] | None = None
    last_cum = 0
    for t, ev in zip(ev_times, events):
        if not isinstance(ev, dict):
            continue
        if "error" in ev:
            err = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
            rec.error = str(err.get("code") or err.get("type") or "stream_error")
            rec.error_message = str(err.get("message", ""))[:300]
        u = ev.get("usage")
        if isinstance(u, dict):
            usage = u
        cum = usage.get("completion_tokens") if usage is not None and u is not None else None
        choices = ev.get("choices") or ()
        carried = False
        for ch in choices:
            delta = ch.get("delta") or {}
            piece = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") \
                or ch.get("text")
            if piece:
                texts.append(piece)
                carried = True
            if delta.get("tool_calls"):
                texts.append(json.dumps(delta["tool_calls"]))
                carried = True
            if ch.get("finish_reason"):
                rec.finish_reason = ch["finish_reason"]
        # A token-bearing event: text arrived, or (continuous usage) the token count rose.
        if carried or (isinstance(cum, int) and cum > last_cum and choices):
            chunk_times.append(t - t0)
            cumulative.append(cum if isinstance(cum, int) else None)
        if isinstance(cum, int):
            last_cum = max(last_cum, cum)
    rec.text = "".join(texts)
    rec.chunk_times = chunk_times
    rec.client_output_tokens = sum(1 for _ in chunk_times)
    if usage is not None:
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        rec.input_tokens = pt if isinstance(pt, int) else None
        rec.output_tokens = ct if isinstance(ct, int) else None
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

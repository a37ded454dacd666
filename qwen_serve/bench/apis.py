"""The two OpenAI APIs a bench run can target (``--api chat|responses``): request bodies and stream events.

Pure functions, no I/O; :mod:`qwen_serve.bench.client` calls them. Workloads always build chat bodies
(:class:`~qwen_serve.bench.records.RequestSpec`); for ``responses`` :func:`responses_body` translates one
into a Responses API body before the run:

=====================================  ==============================================================
chat (workloads)                       Responses API (``POST /v1/responses``)
=====================================  ==============================================================
``messages`` (role + content)          ``input`` (the same messages, as input items)
``max_tokens``                         ``max_output_tokens``
``response_format`` json_schema        ``text.format`` ``{"type": "json_schema", "name", "schema", "strict"}``
``tools`` ``{"type", "function": {}}``  ``tools`` ``{"type": "function", "name", "description", "parameters"}``
``tool_choice`` named function         ``{"type": "function", "name"}``
``temperature``, ``seed``, ``ignore_eos``  passed as they are (vLLM reads them on both routes)
=====================================  ==============================================================

plus ``stream: true`` and ``store: false``. :func:`fill_responses` reads a Responses stream: each ``*.delta``
event (``response.output_text.delta``, ``response.function_call_arguments.delta``, reasoning deltas) is one
generated-token event, so TTFT is the first of them (not ``response.created``, which comes before any
token); tokens and the finish come from the final ``response.completed`` event's ``response`` (``usage``
``input_tokens``/``output_tokens``; ``status`` ``completed`` → ``stop``, or ``tool_calls`` when the output
holds function calls, ``incomplete`` for ``max_output_tokens`` → ``length``). The API has no per-event token
counts, so each delta event gets an even share of ``output_tokens``. An ``error`` event (or a chat-shaped
``{"error": {...}}``) fails the request with its ``code``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import msgspec

from qwen_serve.bench.events import decode_events, int_field, raw_json, str_field, stream_error
from qwen_serve.bench.records import RequestRecord

__all__ = ["API_PATHS", "APIS", "Api", "fill_responses", "responses_body"]

Api = Literal["chat", "responses"]
APIS: Final = ("chat", "responses")
API_PATHS: Final[dict[str, str]] = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}

_PASSED: Final = ("temperature", "top_p", "seed", "ignore_eos", "min_tokens", "stop")


def responses_body(chat: dict[str, Any]) -> dict[str, Any]:
    """The Responses API body for a workload's chat body (see the module docstring); without ``model``."""
    body: dict[str, Any] = {"input": [_input_item(m) for m in chat.get("messages") or ()]}
    if "max_tokens" in chat:
        body["max_output_tokens"] = chat["max_tokens"]
    for name in _PASSED:
        if name in chat:
            body[name] = chat[name]
    rf = chat.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        body["text"] = {"format": {"type": "json_schema", "name": js.get("name", "answer"),
                                   "schema": js.get("schema"), "strict": js.get("strict", True)}}
    elif isinstance(rf, dict) and rf.get("type") == "json_object":
        body["text"] = {"format": {"type": "json_object"}}
    if chat.get("tools"):
        body["tools"] = [_tool(t) for t in chat["tools"]]
    choice = chat.get("tool_choice")
    if isinstance(choice, dict):
        body["tool_choice"] = {"type": "function", "name": (choice.get("function") or {}).get("name")}
    elif choice is not None:
        body["tool_choice"] = choice
    return body


def _input_item(message: dict[str, Any]) -> dict[str, Any]:
    return {"role": message.get("role", "user"), "content": message.get("content") or ""}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") or {}
    out = {"type": "function", "name": fn.get("name")}
    for key in ("description", "parameters", "strict"):
        if key in fn:
            out[key] = fn[key]
    return out


# The fields of a Responses stream event the client reads; the decoder skips the rest.
class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Details(msgspec.Struct):
    reason: str | None = None


class _Item(msgspec.Struct):
    type: str | None = None


class _Response(msgspec.Struct):
    status: str | None = None
    usage: _Usage | None = None
    incomplete_details: _Details | None = None
    output: list[_Item] | None = None


class _Event(msgspec.Struct):
    type: str | None = None
    delta: str | None = None
    response: _Response | None = None
    code: str | None = None
    message: str | None = None
    error: msgspec.Raw | None = None


_DECODER: Final = msgspec.json.Decoder(list[_Event])
_TEXT_DELTAS: Final = ("response.output_text.delta", "response.function_call_arguments.delta")
_FINAL: Final = ("response.completed", "response.incomplete", "response.failed")


def fill_responses(rec: RequestRecord, ev_times: Sequence[float], payloads: Sequence[bytes], t0: float,
                   spread: Callable[[Sequence[int | None], int | None], list[int]]) -> None:
    """Fill ``rec`` from a Responses stream's data ``payloads`` (stamped ``ev_times``); ``spread`` gives each
    token event its share of the output tokens (the client's even split)."""
    events = decode_events(payloads, _DECODER, _lenient)
    if events is None:
        rec.error, rec.error_message = "stream_error", "an SSE event was not valid JSON"
        return
    texts: list[str] = []
    chunk_times: list[float] = []
    final: _Response | None = None
    for t, ev in zip(ev_times, events):
        kind = ev.type or ""
        if kind == "error":
            rec.error = ev.code or "stream_error"
            rec.error_message = (ev.message or "")[:300]
        elif (error := stream_error(ev.error)) is not None:
            rec.error, rec.error_message = error
        elif kind.endswith(".delta"):
            chunk_times.append(t - t0)
            if kind in _TEXT_DELTAS and ev.delta:
                texts.append(ev.delta)
        elif kind in _FINAL:
            final = ev.response
    rec.text = "".join(texts)
    rec.chunk_times = chunk_times
    rec.client_output_tokens = len(chunk_times)
    if final is not None:
        if final.usage is not None:
            rec.input_tokens = final.usage.input_tokens
            rec.output_tokens = final.usage.output_tokens
        rec.finish_reason = _finish(final)
    elif rec.error is None:
        rec.error, rec.error_message = "stream_error", "the stream ended without response.completed"
    rec.chunk_tokens = spread([None] * len(chunk_times), rec.output_tokens)


def _finish(response: _Response) -> str | None:
    if response.status == "completed":
        calls = any(item.type == "function_call" for item in response.output or ())
        return "tool_calls" if calls else "stop"
    if response.status == "incomplete":
        reason = response.incomplete_details.reason if response.incomplete_details else None
        return "length" if reason in (None, "max_output_tokens") else reason
    return response.status


def _lenient(ev: Any) -> _Event:
    """An event decoded without a schema, its fields kept only where they have the expected type."""
    if not isinstance(ev, dict):
        return _Event()
    r = ev.get("response")
    response = None
    if isinstance(r, dict):
        u, det, out = r.get("usage"), r.get("incomplete_details"), r.get("output")
        usage = _Usage(int_field(u, "input_tokens"), int_field(u, "output_tokens")) if isinstance(u, dict) else None
        details = _Details(str_field(det, "reason")) if isinstance(det, dict) else None
        items = [_Item(str_field(o, "type")) for o in out] if isinstance(out, list) else None
        response = _Response(str_field(r, "status"), usage, details, items)
    return _Event(str_field(ev, "type"), str_field(ev, "delta"), response, str_field(ev, "code"),
                  str_field(ev, "message"), raw_json(ev.get("error")))

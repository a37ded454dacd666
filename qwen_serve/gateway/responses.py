"""The Responses API (``POST /v1/responses``) as the gateway sees it: request fields, stream events, usage.

Protocol only: pure functions over request bodies and SSE bytes, no I/O. The pipeline (the serving side,
:meth:`~qwen_serve.gateway.pipeline.Pipeline.responses`) calls them; the guided stage handles ``text.format``
(:mod:`qwen_serve.gateway.guided`).

Request (:func:`check_request`, which rewrites the body in place and raises
:class:`~qwen_serve.errors.InvalidRequest`, 400 with ``param``):

* JSON types of the fields the gateway branches on: ``stream``, ``store``, ``background`` booleans,
  ``max_output_tokens`` an integer, ``previous_response_id`` a string, ``text`` an object (``null``: the
  default, as in the OpenAI API);
* ``store``: vLLM keeps stored responses in one engine's memory, which breaks behind several replicas, so
  unless ``gateway.responses_store: true`` (one replica) the forwarded body always says ``store: false``
  (vLLM itself ignores ``store: true`` unless its store is enabled); with it, an absent ``store`` becomes
  ``true``, the OpenAI default;
* ``previous_response_id`` is refused (param ``previous_response_id``) unless ``gateway.responses_store``.

Stream: vLLM sends ``event: <type>\\ndata: <json>\\n\\n`` per event, numbered by ``sequence_number`` from 0,
with no ``data: [DONE]``; the last event is ``response.completed`` (also for an answer cut by
``max_output_tokens``: its ``response.status`` is then ``incomplete``), whose ``response.usage`` holds
``input_tokens`` and ``output_tokens``. A failure after the first byte ends the stream with one Responses API
``error`` event (:func:`error_event`), not chat's ``data: {"error": ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from qwen_serve.constants import SSE_DATA_PREFIX, SSE_EVENT_SEPARATOR
from qwen_serve.errors import InvalidRequest, QwenServeError, invalid_type
from qwen_serve.gateway.limits import estimate_prompt_tokens

__all__ = [
    "FINAL_EVENTS",
    "RESPONSES_ROUTE",
    "check_request",
    "count_token_events",
    "ends_stream",
    "error_event",
    "estimate_input_tokens",
    "event_bytes",
    "rename_error_param",
    "usage_tokens",
]

RESPONSES_ROUTE: Final = "/v1/responses"
# The events that end a response stream (vLLM 0.32 sends response.completed; the others are OpenAI's).
FINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})

_BOOLEAN_FIELDS: Final = ("stream", "store", "background")
_EVENT_PREFIX: Final = b"event: "
# A delta event's name line runs straight into its data line; data is one JSON line (no raw newline), so
# model text cannot fake this pattern.
_DELTA_EVENT: Final = b".delta\n" + SSE_DATA_PREFIX
_FINAL_PREFIXES: Final = tuple(_EVENT_PREFIX + name.encode() + b"\n" for name in FINAL_EVENTS)
# vLLM checks a Responses request as sampling parameters and names those in its errors.
_ENGINE_PARAMS: Final = {"max_tokens": "max_output_tokens"}


def check_request(body: dict[str, Any], *, store_enabled: bool) -> bool:
    """Check and complete a ``/v1/responses`` body in place (see the module docstring); returns ``stream``.

    Raises :class:`InvalidRequest` (400, ``param`` the field) for a field of the wrong JSON type, and for
    ``previous_response_id`` when ``store_enabled`` (``gateway.responses_store``) is off."""
    flags = {}
    for name in _BOOLEAN_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise invalid_type(name, "a boolean", value)
        flags[name] = bool(value)
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise invalid_type("max_output_tokens", "an integer", limit)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise invalid_type("text", "an object", text)
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise invalid_type("previous_response_id", "a string", previous)
        if not store_enabled:
            raise InvalidRequest(
                "previous_response_id needs stored responses, which this gateway does not keep "
                "(gateway.responses_store: false): send the whole conversation in 'input' instead",
                param="previous_response_id")
    if not store_enabled:
        body["store"] = False
    elif body.get("store") is None:
        body["store"] = True
    return flags["stream"]


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """The prompt-token estimate of a Responses body (as :func:`~qwen_serve.gateway.limits.estimate_prompt_tokens`
    for chat): ``instructions`` and each ``input`` item read as a chat message, plus the tool definitions.
    Never raises on odd shapes."""
    messages: list[Any] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, Mapping):
                continue
            if "content" in item:
                messages.append({"content": item.get("content")})
            elif isinstance(item.get("output"), str):  # function_call_output
                messages.append({"content": item["output"]})
            else:  # function_call and other items: their JSON
                messages.append({"content": "", "tool_calls": [item]})
    return estimate_prompt_tokens({"messages": messages, "tools": body.get("tools")})


def count_token_events(data: bytes) -> int:
    """Generated-token events in SSE bytes relayed from vLLM's Responses stream: ``*.delta`` events
    (``response.output_text.delta``, ``response.function_call_arguments.delta``, reasoning deltas). One per
    decoding step, so, as for chat, a lower bound of the tokens sent."""
    return data.count(_DELTA_EVENT)


def ends_stream(data: bytes) -> bool:
    """Whether the last whole event in ``data`` (SSE bytes ending in an event separator) is a final one
    (:data:`FINAL_EVENTS`): the client then has the whole response."""
    if not data.endswith(SSE_EVENT_SEPARATOR):
        return False
    start = data.rfind(SSE_EVENT_SEPARATOR, 0, len(data) - len(SSE_EVENT_SEPARATOR))
    last = data[start + len(SSE_EVENT_SEPARATOR):] if start >= 0 else data
    return last.startswith(_FINAL_PREFIXES)


def rename_error_param(body: bytes) -> bytes:
    """An engine error body (already in the contract's shape) with ``param`` named as the Responses API
    calls it (vLLM says ``max_tokens`` for ``max_output_tokens``); other bodies unchanged."""
    try:
        obj = json.loads(body)
        err = obj["error"]
        renamed = _ENGINE_PARAMS.get(err["param"])
    except (ValueError, RecursionError, TypeError, KeyError):
        return body
    if renamed is None:
        return body
    err["param"] = renamed
    return json.dumps(obj).encode()


def usage_tokens(usage: object) -> tuple[int, int] | None:
    """``(input_tokens, output_tokens)`` of a Responses ``usage`` object; None when it is not one."""
    if not isinstance(usage, Mapping):
        return None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def event_bytes(event: Mapping[str, Any]) -> bytes:
    """One whole SSE event (without the separator) for a Responses stream event object: its ``type`` as the
    event name, the object as compact JSON data."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    return _EVENT_PREFIX + str(event.get("type", "message")).encode() + b"\n" + SSE_DATA_PREFIX + data


def error_event(exc: QwenServeError, sequence_number: int) -> bytes:
    """The Responses API's ``error`` event for a failure after the stream started (with its separator):
    ``{"type": "error", "code", "message", "param", "sequence_number"}``, the shape the OpenAI SDK parses
    as ``ResponseErrorEvent``."""
    event = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
             "sequence_number": sequence_number}
    return event_bytes(event) + SSE_EVENT_SEPARATOR

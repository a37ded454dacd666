"""Decoding a finished stream's SSE ``data:`` payloads, shared by both APIs' readers.

:func:`decode_events` decodes all payloads of a response in one call with a typed ``msgspec`` decoder and,
when a payload is valid JSON of unexpected types, falls back to a field-by-field reading (``lenient``,
built with :func:`str_field` and :func:`int_field`, which keep a field only when it has the expected type).
It returns None when a payload is not JSON at all. :func:`stream_error` reads an event's ``error`` object
(OpenAI's ``{"error": {"message", "type", "code"}}``) into ``(code, message)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

__all__ = ["decode_events", "int_field", "raw_json", "str_field", "stream_error"]

E = TypeVar("E")
_MESSAGE_CHARS = 300  # an error message is kept to this length in the record


def decode_events(payloads: Sequence[bytes], decoder: msgspec.json.Decoder[list[E]],
                  lenient: Callable[[Any], E]) -> list[E] | None:
    """The events of ``payloads`` (one JSON document each), or None when one is not valid JSON."""
    joined = b"[" + b",".join(payloads) + b"]"
    try:
        return decoder.decode(joined)
    except msgspec.ValidationError:  # valid JSON of unexpected types: read it field by field
        return [lenient(ev) for ev in msgspec.json.decode(joined)]
    except msgspec.DecodeError:
        return None


def str_field(d: Any, key: str) -> str | None:
    """``d[key]`` when ``d`` is an object and the value a string, else None."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) else None


def int_field(d: Any, key: str) -> int | None:
    """``d[key]`` when ``d`` is an object and the value an integer (not a boolean), else None."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def raw_json(value: Any) -> msgspec.Raw | None:
    """``value`` re-encoded as raw JSON (as the typed decoder keeps it), None for a missing value."""
    return msgspec.Raw(json.dumps(value).encode()) if value is not None else None


def stream_error(raw: msgspec.Raw | None) -> tuple[str, str] | None:
    """``(code, message)`` of an event's ``error`` value; None when there is none (missing or ``null``).
    The code is the error's ``code``, else its ``type``, else ``stream_error``."""
    if raw is None or bytes(raw) == b"null":
        return None
    err = json.loads(bytes(raw))
    err = err if isinstance(err, dict) else {"message": str(err)}
    return str(err.get("code") or err.get("type") or "stream_error"), str(err.get("message", ""))[:_MESSAGE_CHARS]

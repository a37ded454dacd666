"""Guided-decoding stage: normalise, pre-check and validate structured output (CONTRACTS.md §4).

Called by the gateway pipeline, never by other stages. For each ``/v1/chat/completions`` or
``/v1/completions`` body the pipeline calls :func:`prepare` *before* forwarding; it

* returns ``None`` (after a few dict lookups) when the request asks for no guidance;
* rewrites the body **in place** into what vLLM 0.32 enforces, and returns a :class:`GuidedRequest`;
* raises :class:`~qwen_serve.errors.InvalidRequest` / :class:`~qwen_serve.errors.GuidedSchemaError`
  (400, ``param`` names the offending part) for anything vLLM would ignore, reject or fail on.

What vLLM 0.32 does with each field, and what :func:`prepare` does about it:

=============================================  ==============================================
vLLM 0.32                                      here
=============================================  ==============================================
``response_format`` json_schema / json_object  kept as is (both routes enforce it)
/ structural_tag / text
``structured_outputs`` {json, regex, choice,   kept; shape checked (exactly one constraint,
grammar, json_object, structural_tag} + opts   known keys only: vLLM drops unknown keys silently)
``guided_json|regex|choice|grammar``           silently ignored upstream (HTTP 200, unconstrained)
                                               → moved to ``structured_outputs`` or 400 (reject)
``guided_whitespace_pattern``                  ignored → ``structured_outputs.whitespace_pattern``
                                               (accepted there, but no 0.32 backend reads it)
``guided_decoding_backend``                    ignored; per-request backend choice is not
                                               supported (the engine's backend is used) → dropped
``structured_outputs.disable_additional_``     ignored per request (only the engine-wide setting
``properties``                                 is read) → applied to the schema here:
                                               ``additionalProperties: false`` on every object
                                               schema with properties that does not set it
``structured_outputs.disable_any_whitespace``  ignored per request (engine-wide setting only);
                                               kept, it only affects formatting
=============================================  ==============================================

Two constraints in one request (e.g. ``response_format`` + ``guided_json``) are a 400 naming both.
JSON Schemas are checked against their metaschema (``$schema``, else Draft 2020-12) and their
``$ref`` must be local (``#...``); regexes are pre-checked with Python's :mod:`re`, whose syntax is
close to but not the same as the engine's (an engine-only construct such as ``\\p{L}`` is refused
here; one Python accepts but the backend cannot handle still reaches vLLM, which answers 400).

After the answer, :meth:`GuidedRequest.check_response` (non-streaming) or a
:class:`StreamChecker` (streaming; fed each parsed chunk as it is relayed) gives the outcome, a
``qwen_serve_guided_requests_total`` label and the verdict sent to the client: the ``X-Guided-Output``
header of a whole answer, or the top-level ``"guided_output"`` field the gateway adds to the stream's chunk
that carries the last choice's ``finish_reason`` (that one chunk waits for the check): ``valid`` |
``invalid`` | ``truncated`` (``finish_reason: "length"``) | ``incomplete`` (the stream ended without a ``finish_reason``) | ``unchecked`` (``validate_output`` off, ``echo`` on
completions, or a grammar/structural-tag constraint). With ``n > 1`` the worst choice wins:
invalid > incomplete > truncated > unchecked > valid. JSON is parsed strictly (raw control characters
inside strings, ``NaN`` and ``Infinity`` are invalid) and then validated with the validator
:func:`prepare` compiled (memoised per schema text, since the metaschema check costs ~2 ms; at most
:data:`SCHEMA_CACHE_ENTRIES` schemas and :data:`SCHEMA_CACHE_BYTES` of schema text, least recently used
evicted first). Nothing
here does I/O; remote ``$ref`` are never fetched.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

import referencing
import referencing.exceptions
import regex
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import GuidedSchemaError, InvalidRequest

__all__ = [
    "CHAT_ROUTE",
    "COMPLETIONS_ROUTE",
    "GuidedRequest",
    "KINDS",
    "OUTCOMES",
    "StreamChecker",
    "prepare",
]

CHAT_ROUTE: Final = "/v1/chat/completions"
COMPLETIONS_ROUTE: Final = "/v1/completions"

KINDS: Final = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
VALID, INVALID, TRUNCATED, INCOMPLETE, UNCHECKED = "valid", "invalid", "truncated", "incomplete", "unchecked"
OUTCOMES: Final = (VALID, INVALID, TRUNCATED, INCOMPLETE, UNCHECKED)
_RANK: Final = {VALID: 0, UNCHECKED: 1, TRUNCATED: 2, INCOMPLETE: 3, INVALID: 4}

# structured_outputs constraint key → metric kind
_SO_KIND: Final = {
    "json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
    "json_object": "json_object", "structural_tag": "structural_tag",
}
_SO_OPTIONS: Final[dict[str, type]] = {
    "disable_any_whitespace": bool, "disable_additional_properties": bool, "whitespace_pattern": str,
}
_LEGACY_CONSTRAINTS: Final = {  # legacy field → structured_outputs key
    "guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
}
_LEGACY: Final = (*_LEGACY_CONSTRAINTS, "guided_whitespace_pattern", "guided_decoding_backend")
_TRIGGERS: Final = ("response_format", "structured_outputs", *_LEGACY)
_RF_TYPES: Final = ("text", "json_object", "json_schema", "structural_tag")
_NOT_SCHEMAS: Final = frozenset({"const", "enum", "default", "examples"})  # values here are data
_RE_NOTE: Final = "checked with Python's re syntax, which is close to but not identical to the engine's"


def _fullmatch(pattern: re.Pattern[str], text: str) -> bool:
    """``pattern.fullmatch(text)``, with the current Unicode tables where ``re``'s are older.

    ``re`` uses the Unicode version of the running Python (14.0 on 3.11); the engine's grammar uses a
    newer one, so e.g. a Garay digit (U+10D40..U+10D49, Unicode 16) satisfies ``\\d`` in the engine but
    not in ``re``. A text ``re`` rejects is checked again with the ``regex`` package (same syntax for
    what ``re`` accepts, current Unicode) before it is called invalid.
    """
    if pattern.fullmatch(text):
        return True
    try:  # regex caches compiled patterns; this path runs only for a text re rejected
        return regex.fullmatch(pattern.pattern, text, flags=regex.VERSION0) is not None
    except regex.error:
        return False


@dataclass(eq=False)
class GuidedRequest:
    """What one request asked for, ready to check the answer against.

    ``kind`` is the metric label; ``param`` says where the constraint came from (``response_format``,
    ``structured_outputs.json``, ``guided_json``...). Exactly one of ``schema``/``pattern``/``choices``
    is set for the kinds that can be checked.
    """

    kind: str
    param: str
    schema: dict[str, Any] | None = None
    pattern: re.Pattern[str] | None = None
    choices: tuple[str, ...] | None = None
    validate: bool = True
    _validator: Validator | None = field(default=None, repr=False)

    def check_response(self, response: Mapping[str, Any]) -> str:
        """Outcome for a non-streaming chat or completions response body."""
        if not self.validate:
            return UNCHECKED
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices:
            return INCOMPLETE
        outcomes = [
            self.check_text(_choice_text(c), c.get("finish_reason")) if isinstance(c, Mapping) else INVALID
            for c in choices
        ]
        return max(outcomes, key=_RANK.__getitem__)

    def stream_checker(self) -> StreamChecker:
        """A fresh accumulator for one streamed response."""
        return StreamChecker(self)

    def check_text(self, text: str, finish_reason: object) -> str:
        """Outcome for one finished choice's text."""
        if not self.validate:
            return UNCHECKED
        if finish_reason == "length":
            return TRUNCATED
        if finish_reason is None:
            return INCOMPLETE
        if self.kind in ("json_schema", "json_object"):
            try:
                instance = json.loads(text, parse_constant=_reject_constant)
            except (ValueError, RecursionError):
                return INVALID
            if self.kind == "json_object":
                return VALID if isinstance(instance, dict) else INVALID
            assert self._validator is not None
            try:
                return VALID if self._validator.is_valid(instance) else INVALID
            except RecursionError:
                return INVALID
            except referencing.exceptions.Unresolvable:  # pre-checked in prepare; belt and braces
                return UNCHECKED
        if self.pattern is not None:
            return VALID if _fullmatch(self.pattern, text) else INVALID
        if self.choices is not None:
            return VALID if text in self.choices else INVALID
        return UNCHECKED  # grammar, structural_tag


class StreamChecker:
    """Accumulates a streamed answer: call :meth:`feed` with each parsed SSE ``data`` object, then
    :meth:`outcome` once every choice finished (:meth:`finished`) or the stream ended. Chunks without
    ``choices`` (usage, error frames) are ignored. Finish reasons are tracked even when the request is not
    validated (the outcome is then ``unchecked``), so the end of the answer is always known."""

    __slots__ = ("_guided", "_parts", "_finish")

    def __init__(self, guided: GuidedRequest) -> None:
        self._guided = guided
        self._parts: dict[int, list[str]] = {}
        self._finish: dict[int, object] = {}

    def feed(self, chunk: Mapping[str, Any]) -> None:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        validate = self._guided.validate
        for c in choices:
            if not isinstance(c, Mapping):
                continue
            index = c.get("index", 0)
            if not isinstance(index, int):
                index = 0
            if validate:
                delta = c.get("delta")
                piece = delta.get("content") if isinstance(delta, Mapping) else c.get("text")
                if isinstance(piece, str) and piece:
                    self._parts.setdefault(index, []).append(piece)
                else:
                    self._parts.setdefault(index, [])
            if (reason := c.get("finish_reason")) is not None:
                self._finish[index] = reason

    def finished(self, choices: int) -> bool:
        """Whether ``choices`` choices (the request's ``n``) have each sent their ``finish_reason``."""
        return len(self._finish) >= choices

    def outcome(self) -> str:
        if not self._guided.validate:
            return UNCHECKED
        if not self._parts:
            return INCOMPLETE
        return max(
            (self._guided.check_text("".join(p), self._finish.get(i)) for i, p in self._parts.items()),
            key=_RANK.__getitem__,
        )


def prepare(body: dict[str, Any], *, route: str, config: GuidedConfig) -> GuidedRequest | None:
    """Normalise ``body``'s guided-decoding fields in place for vLLM 0.32; see the module docstring.

    Returns ``None`` when no constraint was requested. Raises ``InvalidRequest`` (bad shape, conflicting
    constraints, legacy field with ``legacy_fields: reject``) or ``GuidedSchemaError`` (bad schema).
    """
    if not any(k in body for k in _TRIGGERS):
        return None
    legacy = [k for k in _LEGACY if k in body]
    if legacy and config.legacy_fields == "reject":
        raise InvalidRequest(_reject_message(legacy[0]), param=legacy[0])

    found: list[tuple[str, str, Any]] = []  # (param, structured_outputs key, value)
    rf = body.get("response_format")
    if rf is not None:
        found.extend(_from_response_format(rf))
    so = body.get("structured_outputs")
    so_found = [] if so is None else _from_structured_outputs(so)
    found.extend(so_found)
    found.extend(
        (k, _LEGACY_CONSTRAINTS[k], body[k]) for k in legacy if k in _LEGACY_CONSTRAINTS and body[k] is not None
    )
    if len(found) > 1:
        names = ", ".join(p for p, _, _ in found)
        raise InvalidRequest(f"conflicting guided-decoding constraints: {names}; send exactly one", param=found[1][0])
    if so is not None and not so_found and not (found and found[0][0].startswith("guided_")):
        # vLLM 0.32 refuses a structured_outputs without a constraint, even next to response_format
        raise InvalidRequest(
            f"structured_outputs needs exactly one of {', '.join(_SO_KIND)}", param="structured_outputs"
        )
    options = {k: body.pop(k) for k in legacy}
    if not found:
        return None

    param, key, value = found[0]
    if key == "json" and isinstance(so, dict) and so.get("disable_additional_properties") is True:
        value = _close_objects(_load_schema(param, value))  # vLLM 0.32 ignores the per-request flag
    value, guided = _check(param, key, value)
    guided.validate = config.validate_output and not (route == COMPLETIONS_ROUTE and body.get("echo"))
    if param.startswith("guided_"):
        merged = dict(so) if isinstance(so, dict) else {}
        merged[key] = value
        if isinstance(ws := options.get("guided_whitespace_pattern"), str):
            merged.setdefault("whitespace_pattern", ws)
        body["structured_outputs"] = merged
    elif key == "json" and param.startswith("structured_outputs"):
        body["structured_outputs"][key] = value  # a JSON string becomes the parsed schema
    return guided


# -- request side --------------------------------------------------------------------------------


def _from_response_format(rf: object) -> list[tuple[str, str, Any]]:
    if not isinstance(rf, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    rf_type = rf.get("type")
    if rf_type not in _RF_TYPES:
        raise InvalidRequest(
            f"response_format.type must be one of {', '.join(_RF_TYPES)}", param="response_format.type"
        )
    if rf_type == "text":
        return []
    if rf_type == "json_object":
        return [("response_format", "json_object", True)]
    if rf_type == "structural_tag":
        return [("response_format", "structural_tag", rf)]
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise InvalidRequest(
            'response_format.json_schema must be an object {"name", "schema", "strict"}',
            param="response_format.json_schema",
        )
    if not isinstance(js.get("name"), str):
        param = "response_format.json_schema.name"
        raise InvalidRequest(f"{param} must be a string", param=param)
    return [("response_format.json_schema.schema", "json", js.get("schema"))]


def _from_structured_outputs(so: object) -> list[tuple[str, str, Any]]:
    if not isinstance(so, dict):
        raise InvalidRequest("structured_outputs must be an object", param="structured_outputs")
    found = []
    for k, v in so.items():
        param = f"structured_outputs.{k}"
        if k in _SO_KIND:
            if v is not None:
                found.append((param, k, v))
        elif k in _SO_OPTIONS:
            if v is not None and not isinstance(v, _SO_OPTIONS[k]):
                raise InvalidRequest(f"{param} must be a {_SO_OPTIONS[k].__name__}", param=param)
        else:
            known = ", ".join([*_SO_KIND, *_SO_OPTIONS])
            raise InvalidRequest(f"unknown key {param} (vLLM would ignore it); known keys: {known}", param=param)
    return found


def _check(param: str, key: str, value: Any) -> tuple[Any, GuidedRequest]:
    """Validate one constraint; returns the value to forward and the request to check answers with."""
    kind = _SO_KIND[key]
    if key == "json":
        schema = _load_schema(param, value)
        try:
            compiled = _compile_cached(param, json.dumps(schema, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError):  # NaN/Infinity (the body parser may let them in)
            raise GuidedSchemaError(f"{param} is not JSON", param=param) from None
        if isinstance(compiled, GuidedSchemaError):
            raise GuidedSchemaError(compiled.message, param=compiled.param)
        return schema, GuidedRequest(kind, param, schema=schema, _validator=compiled)
    if key == "json_object":
        if value is not True:
            raise InvalidRequest(f"{param} must be true", param=param)
        return value, GuidedRequest(kind, param)
    if key == "regex":
        if not isinstance(value, str):
            raise InvalidRequest(f"{param} must be a string", param=param)
        try:
            pattern = re.compile(value)
        except re.error as exc:
            message = f"{param} is not a valid regular expression: {exc} ({_RE_NOTE})"
            raise InvalidRequest(message, param=param) from None
        return value, GuidedRequest(kind, param, pattern=pattern)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(f"{param} must be a non-empty list of strings", param=param)
        return value, GuidedRequest(kind, param, choices=tuple(value))
    if key == "grammar" and (not isinstance(value, str) or not value.strip()):
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    return value, GuidedRequest(kind, param)  # grammar, structural_tag: vLLM checks them


# schema keywords holding a map of subschemas / a subschema or a list of them (as vLLM's guidance backend)
_MAP_KEYWORDS: Final = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_SUB_KEYWORDS: Final = (
    "additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "additionalItems",
    "unevaluatedItems", "not", "if", "then", "else", "contentSchema", "items", "prefixItems", "allOf", "anyOf", "oneOf",
)


def _close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object schema that has
    ``properties``/``patternProperties`` and does not set it: what ``disable_additional_properties`` means
    in vLLM (whose 0.32 backends only read the engine-wide flag, never the per-request one)."""

    def walk(node: object) -> object:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for k in _MAP_KEYWORDS:
            if isinstance(out.get(k), dict):
                out[k] = {name: walk(sub) for name, sub in out[k].items()}
        for k in _SUB_KEYWORDS:
            if isinstance(out.get(k), (dict, list)):
                out[k] = walk(out[k])
        if "additionalProperties" not in out and (
            isinstance(out.get("properties"), dict) or isinstance(out.get("patternProperties"), dict)
        ):
            out["additionalProperties"] = False
        return out

    result = walk(schema)
    assert isinstance(result, dict)
    return result


def _load_schema(param: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GuidedSchemaError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise GuidedSchemaError(f"{param} must be a JSON Schema object", param=param)
    return value


_META: dict[type[Validator], Validator] = {}


SCHEMA_CACHE_ENTRIES: Final = 256  # compiled schemas kept at most
SCHEMA_CACHE_BYTES: Final = 64 << 20  # total canonical schema text (characters) the kept schemas may sum to


class _SchemaCache:
    """Compiled validators (or the schema's error) by canonical schema text, least recently used evicted
    first once more than ``max_entries`` are held or their texts sum to more than ``max_bytes``. A text
    larger than ``max_bytes`` is compiled but never kept. Used from the event loop; a lock keeps it
    consistent if it is ever called from threads."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # sum of len(key) of the entries held
        self._entries: OrderedDict[tuple[str, str], Validator | GuidedSchemaError] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, param: str, schema_json: str) -> Validator | GuidedSchemaError:
        key = (param, schema_json)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        try:
            compiled: Validator | GuidedSchemaError = _compile(param, json.loads(schema_json))
        except GuidedSchemaError as exc:
            compiled = exc
        size = len(schema_json)
        if size > self.max_bytes:
            return compiled
        with self._lock:
            if key not in self._entries:
                self.bytes += size
            self._entries[key] = compiled
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                (_, old), _ = self._entries.popitem(last=False)
                self.bytes -= len(old)
        return compiled

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


_SCHEMAS = _SchemaCache(SCHEMA_CACHE_ENTRIES, SCHEMA_CACHE_BYTES)


def _compile_cached(param: str, schema_json: str) -> Validator | GuidedSchemaError:
    """:func:`_compile` memoised on the canonical schema text (:data:`_SCHEMAS`, bounded by entries and
    bytes): the metaschema check costs ~2 ms, and clients tend to send the same few schemas. Errors are
    returned (and re-raised fresh by the caller) so that they are cached too. Validators are read-only,
    so sharing them is safe."""
    return _SCHEMAS.get(param, schema_json)


def _compile(param: str, schema: dict[str, Any]) -> Validator:
    """Metaschema-check ``schema`` and its ``$ref``; return a validator that never fetches anything."""
    dialect = schema.get("$schema")
    cls: type[Validator] = (
        validators.validator_for(schema, default=Draft202012Validator) if isinstance(dialect, str)
        else Draft202012Validator
    )
    meta = _META.get(cls)
    if meta is None:
        meta = _META[cls] = cls(cls.META_SCHEMA)
    error = best_match(meta.iter_errors(schema))
    if error is not None:
        where = ".".join([param, *map(str, error.absolute_path)])
        raise GuidedSchemaError(f"invalid JSON Schema at {where}: {error.message}", param=where)
    for path, ref in _refs(schema, ()):
        where = ".".join([param, *path, "$ref"])
        if not ref.startswith("#"):
            raise GuidedSchemaError(
                f"{where}: only local references ('#/...') are supported, not {ref!r}", param=where
            )
        if ref[1:2] in ("", "/") and not _pointer_resolves(schema, ref[1:]):
            raise GuidedSchemaError(f"{where}: {ref!r} does not resolve inside the schema", param=where)
    return cls(schema, registry=referencing.Registry())


def _refs(node: object, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """``$ref`` strings in schema positions, skipping embedded resources (nested ``$id``)."""
    if isinstance(node, dict):
        if path and isinstance(node.get("$id"), str):
            return
        if isinstance(ref := node.get("$ref"), str):
            yield path, ref
        for k, v in node.items():
            if k not in _NOT_SCHEMAS:
                yield from _refs(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _refs(v, (*path, str(i)))


def _pointer_resolves(doc: object, pointer: str) -> bool:
    for token in unquote(pointer).split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return False
    return True


def _reject_message(field_name: str) -> str:
    if field_name == "guided_json":
        instead = 'use response_format {"type": "json_schema", ...} or structured_outputs.json'
    elif field_name in _LEGACY_CONSTRAINTS:
        instead = f"use structured_outputs.{_LEGACY_CONSTRAINTS[field_name]}"
    elif field_name == "guided_whitespace_pattern":
        instead = "use structured_outputs.whitespace_pattern"
    else:
        instead = "vLLM has no per-request backend choice; the engine uses engine.structured_outputs_backend"
    return (
        f"{field_name} was removed from vLLM (0.12) and would be silently ignored; "
        f"this gateway rejects it (guided.legacy_fields: reject): {instead}"
    )


# -- response side -------------------------------------------------------------------------------


def _choice_text(choice: Mapping[str, Any]) -> str:
    message = choice.get("message")
    text = message.get("content") if isinstance(message, Mapping) else choice.get("text")
    return text if isinstance(text, str) else ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

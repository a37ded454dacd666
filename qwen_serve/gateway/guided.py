"""Guided-decoding stage: normalise, pre-check and validate structured output.

Called by the gateway pipeline, never by other stages. For each ``/v1/chat/completions``,
``/v1/completions`` or ``/v1/responses`` body the pipeline awaits :func:`prepare_async` (:func:`prepare` is the
same, all on the calling thread) *before* forwarding; it

* returns ``None`` (after a few dict lookups) when the request asks for no guidance;
* enforces the request-time bounds (:mod:`qwen_serve.gateway.guided_bounds`: ``guided.max_*``) before any
  other work on the constraint;
* rewrites the body **in place** into what vLLM 0.32 enforces, and returns a :class:`GuidedRequest`;
* raises :class:`~qwen_serve.errors.InvalidRequest` / :class:`~qwen_serve.errors.GuidedSchemaError`
  (400, ``param`` names the offending part; code ``guided_constraint_too_large`` past a bound) for anything
  vLLM would ignore, reject or fail on.

What vLLM 0.32 does with each field, and what :func:`prepare` does about it:

=============================================  ==============================================
vLLM 0.32                                      here
=============================================  ==============================================
``response_format`` json_schema / json_object  kept as is (both routes enforce it)
/ structural_tag / text
``text.format`` json_schema / json_object /    (``/v1/responses``) kept as is; checked as
text                                           ``response_format`` (``param`` ``text.format.schema``,
                                               ``text.format.name``...). ``response_format`` there is
                                               ignored upstream → 400 naming it
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
JSON Schemas are checked against their metaschema (``$schema``, else Draft 2020-12) and their ``$ref`` must
be local (``#...``): :mod:`qwen_serve.gateway.guided_schema`, compiled once per schema text (cached by a hash
of its canonical JSON) and, through :func:`prepare_async`, in a worker thread. A guided regex must compile
with RE2 (:mod:`qwen_serve.gateway.regex_check`; the syntax family of the engine's grammar backends: no
look-around, no backreferences, repetition counts up to 1000), else 400; one RE2 can parse but not hold
within the checker's memory budget is forwarded and its answers are ``unverified``.

After the answer, :meth:`GuidedRequest.check_response` (non-streaming) or a :class:`StreamChecker`
(streaming; fed each parsed chunk as it is relayed) gives the outcome, a ``qwen_serve_guided_requests_total``
label and the verdict sent to the client: the ``X-Guided-Output`` header of a whole answer, or the top-level
``"guided_output"`` field the gateway adds to the stream's chunk that carries the last choice's
``finish_reason`` (that one chunk waits for the check). A Responses API answer (``"object": "response"``,
whole or the ``response`` of the stream's final ``response.completed`` event) is checked by
:meth:`GuidedRequest.check_response` too: the text of its ``output_text`` parts, ``status`` ``completed`` as
a finished answer, ``incomplete`` for ``max_output_tokens`` as ``truncated``. Outcomes: ``valid`` |
``invalid`` | ``truncated`` (``finish_reason: "length"``) | ``incomplete`` (the stream ended without a
``finish_reason``) |
``unverified`` (the answer could not be checked within bounds: longer than
:data:`~qwen_serve.gateway.guided_budget.MAX_ANSWER_CHARS`, more work than the check's
:class:`~qwen_serve.gateway.guided_budget.Budget`, nested too deeply to parse, or reaching a regex RE2
cannot evaluate) | ``unchecked`` (``validate_output`` off, ``echo`` on completions, a
grammar/structural-tag constraint, or a Responses answer that is only function calls). With ``n > 1`` the worst choice wins: invalid > incomplete > truncated >
unverified > unchecked > valid. JSON is parsed strictly (raw control characters inside strings, ``NaN`` and
``Infinity`` are invalid). Checks that need schema or regex work run in a worker thread when awaited
(:meth:`GuidedRequest.check_response_async`, :meth:`StreamChecker.outcome_async`) with the worker budget; the
synchronous methods use the small inline budget. Regexes (guided ``regex``, schema ``pattern`` and
``patternProperties``) are only ever matched with RE2, in linear time. Nothing here does I/O; remote ``$ref``
are never fetched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import referencing.exceptions

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import GuidedSchemaError, InvalidRequest
from qwen_serve.gateway import guided_bounds as bounds
from qwen_serve.gateway import regex_check
from qwen_serve.gateway.guided_budget import MAX_ANSWER_CHARS, Budget, OverBudget
from qwen_serve.gateway.guided_schema import SCHEMAS, SchemaCheck, Unverifiable, canonical_json, close_objects
from qwen_serve.gateway.regex_check import Regex

__all__ = [
    "CHAT_ROUTE",
    "COMPLETIONS_ROUTE",
    "RESPONSES_ROUTE",
    "GuidedRequest",
    "KINDS",
    "OUTCOMES",
    "VERDICTS",
    "StreamChecker",
    "prepare",
    "prepare_async",
]

CHAT_ROUTE: Final = "/v1/chat/completions"
COMPLETIONS_ROUTE: Final = "/v1/completions"
RESPONSES_ROUTE: Final = "/v1/responses"

KINDS: Final = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
VALID, INVALID, TRUNCATED, INCOMPLETE, UNCHECKED, UNVERIFIED = (
    "valid", "invalid", "truncated", "incomplete", "unchecked", "unverified")
VERDICTS: Final = (VALID, INVALID, TRUNCATED, INCOMPLETE, UNCHECKED, UNVERIFIED)  # what a check can say
# No answer to check: the engine refused the request (4xx), failed (5xx, unreachable), or the client left.
REJECTED, ERROR, ABORTED = "rejected", "error", "aborted"
# Every ``outcome`` label of ``qwen_serve_guided_requests_total``: a verdict, or why there is none.
OUTCOMES: Final = (*VERDICTS, REJECTED, ERROR, ABORTED)
_RANK: Final = {VALID: 0, UNCHECKED: 1, UNVERIFIED: 2, TRUNCATED: 3, INCOMPLETE: 4, INVALID: 5}

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
_TEXT_FORMAT_TYPES: Final = ("text", "json_object", "json_schema")  # the Responses API's text.format
_RE_NOTE: Final = "RE2 syntax, the engine's grammar backends' family: no look-around, no backreferences"
_UNVERIFIABLE: Final = (OverBudget, Unverifiable, RecursionError, referencing.exceptions.Unresolvable)

# Worker threads: schema compiles and answer checks (pure Python, or RE2 which releases the GIL). Two each, so
# that a burst of expensive constraints queues instead of taking every core from the event loop.
_COMPILE_POOL: Final = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen-guided-compile")
_CHECK_POOL: Final = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen-guided-check")


@dataclass(frozen=True)
class _Compile:
    """What is left to do after the cheap checks: compile the schema (``schema_json`` set) or the regex."""

    param: str
    schema_json: str | None = None
    schema: dict[str, Any] | None = None
    pattern: str | None = None


@dataclass(eq=False)
class GuidedRequest:
    """What one request asked for, ready to check the answer against.

    ``kind`` is the metric label; ``param`` says where the constraint came from (``response_format``,
    ``structured_outputs.json``, ``guided_json``...). ``schema``/``pattern``/``choices`` hold the constraint
    of the kinds that can be checked (``pattern`` is None for a regex too large for the checker: its answers
    are ``unverified``).
    """

    kind: str
    param: str
    schema: dict[str, Any] | None = None
    pattern: Regex | None = None
    choices: tuple[str, ...] | None = None
    validate: bool = True
    _schema_check: SchemaCheck | None = field(default=None, repr=False)
    _compile: _Compile | None = field(default=None, repr=False)

    # -- answers ---------------------------------------------------------------------------------

    @property
    def offloaded(self) -> bool:
        """Whether an awaited check runs in a worker thread (it needs schema or regex work)."""
        return self.validate and (self._schema_check is not None or self.pattern is not None)

    def check_response(self, response: Mapping[str, Any], budget: Budget | None = None) -> str:
        """Outcome for a non-streaming chat, completions or Responses API response body, within ``budget``
        (shared by its choices; default: :meth:`Budget.inline`)."""
        if not self.validate:
            return UNCHECKED
        budget = budget or Budget.inline()
        if response.get("object") == "response":
            return self._check_responses_answer(response, budget)
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices:
            return INCOMPLETE
        outcomes = [
            self.check_text(_choice_text(c), c.get("finish_reason"), budget) if isinstance(c, Mapping) else INVALID
            for c in choices
        ]
        return max(outcomes, key=_RANK.__getitem__)

    def _check_responses_answer(self, response: Mapping[str, Any], budget: Budget) -> str:
        """Outcome for a Responses API ``response`` object: the text of its messages' ``output_text`` parts;
        ``status`` ``completed`` is a finished answer, ``incomplete`` for ``max_output_tokens`` a truncated one,
        anything else (failed, cancelled, in progress) incomplete. Only function calls: unchecked."""
        texts: list[str] = []
        messages = calls = 0
        output = response.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "message":
                messages += 1
                content = item.get("content")
                for part in content if isinstance(content, list) else ():
                    if isinstance(part, Mapping) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                        texts.append(part["text"])
            elif item.get("type") == "function_call":
                calls += 1
        status = response.get("status")
        finish: str | None = None
        if status == "completed":
            finish = "stop"
        elif status == "incomplete":
            details = response.get("incomplete_details")
            if isinstance(details, Mapping) and details.get("reason") == "max_output_tokens":
                finish = "length"
        if calls and not messages and finish == "stop":
            return UNCHECKED
        return self.check_text("".join(texts), finish, budget)

    async def check_response_async(self, response: Mapping[str, Any]) -> str:
        """:meth:`check_response`, in a worker thread with :meth:`Budget.worker` when it needs schema or
        regex work; the event loop only waits."""
        if not self.offloaded:
            return self.check_response(response)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_CHECK_POOL, _check_in_worker, self, response)

    def stream_checker(self) -> StreamChecker:
        """A fresh accumulator for one streamed response."""
        return StreamChecker(self)

    def check_text(self, text: str, finish_reason: object, budget: Budget | None = None) -> str:
        """Outcome for one finished choice's text."""
        if not self.validate:
            return UNCHECKED
        if finish_reason == "length":
            return TRUNCATED
        if finish_reason is None:
            return INCOMPLETE
        if self.choices is not None:
            return VALID if text in self.choices else INVALID
        if self.kind not in ("json_schema", "json_object", "regex"):
            return UNCHECKED  # grammar, structural_tag
        if len(text) > MAX_ANSWER_CHARS or (self.kind == "regex" and self.pattern is None):
            return UNVERIFIED
        try:
            return self._verdict(text, budget or Budget.inline())
        except _UNVERIFIABLE:
            return UNVERIFIED

    def _verdict(self, text: str, budget: Budget) -> str:
        if self.pattern is not None:
            data = text.encode("utf-8", "surrogatepass")
            budget.spend_match(self.pattern.cost(data))
            return VALID if self.pattern.fullmatch(data) else INVALID
        try:
            instance = json.loads(text, parse_constant=_reject_constant)
        except ValueError:
            return INVALID
        if self.kind == "json_object":
            return VALID if isinstance(instance, dict) else INVALID
        assert self._schema_check is not None
        return VALID if self._schema_check.is_valid(instance, budget) else INVALID

    # -- compiling -------------------------------------------------------------------------------

    def _compile_from_cache(self) -> bool:
        """Finish compiling from the caches; False when real work is left (see :meth:`_compile_now`)."""
        job = self._compile
        if job is None:
            return True
        if job.schema_json is not None:
            found = SCHEMAS.peek(job.param, job.schema_json)
            if found is None:
                return False
            self._attach_schema(found)
        elif job.pattern is not None and not regex_check.cached(job.pattern):
            return False
        self._compile_now()
        return True

    def _compile_now(self) -> None:
        """Compile what :func:`prepare` left (a schema, a regex); raises the client's 400."""
        job, self._compile = self._compile, None
        if job is None:
            return
        if job.schema_json is not None:
            self._attach_schema(SCHEMAS.get(job.param, job.schema_json, job.schema))
        elif job.pattern is not None:
            self.pattern = _compile_regex(job.param, job.pattern)

    def _attach_schema(self, compiled: SchemaCheck | GuidedSchemaError) -> None:
        self._compile = None
        if isinstance(compiled, GuidedSchemaError):
            raise GuidedSchemaError(compiled.message, param=compiled.param)
        self._schema_check = compiled


def _check_in_worker(guided: GuidedRequest, response: Mapping[str, Any]) -> str:
    return guided.check_response(response, Budget.worker())


def _compile_regex(param: str, pattern: str) -> Regex | None:
    """The checker for a guided regex; None when it is valid but too large to hold (answers: unverified)."""
    try:
        return regex_check.compile_regex(pattern)
    except regex_check.RegexSyntaxError as exc:
        if exc.too_large:
            raise bounds.too_large(param, f"{param}: {exc}") from None
        raise InvalidRequest(f"{param} is not a valid regular expression: {exc} ({_RE_NOTE})", param=param) from None
    except regex_check.RegexTooComplex:
        return None


class StreamChecker:
    """Accumulates a streamed answer: call :meth:`feed` with each parsed SSE ``data`` object, then
    :meth:`outcome` (or :meth:`outcome_async`) once every choice finished (:meth:`finished`) or the stream
    ended. Chunks without ``choices`` (usage, error frames) are ignored. Finish reasons are tracked even when
    the request is not validated (the outcome is then ``unchecked``), so the end of the answer is always
    known."""

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

    def outcome(self, budget: Budget | None = None) -> str:
        """The verdict so far, within ``budget`` (shared by the choices; default: :meth:`Budget.inline`)."""
        if not self._guided.validate:
            return UNCHECKED
        if not self._parts:
            return INCOMPLETE
        budget = budget or Budget.inline()
        return max(
            (self._guided.check_text("".join(p), self._finish.get(i), budget) for i, p in self._parts.items()),
            key=_RANK.__getitem__,
        )

    async def outcome_async(self) -> str:
        """:meth:`outcome`, in a worker thread with :meth:`Budget.worker` when it needs schema or regex work."""
        if not self._guided.offloaded:
            return self.outcome()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_CHECK_POOL, self.outcome, Budget.worker())


def prepare(body: dict[str, Any], *, route: str, config: GuidedConfig) -> GuidedRequest | None:
    """Normalise ``body``'s guided-decoding fields in place for vLLM 0.32; see the module docstring. Compiles
    on the calling thread (see :func:`prepare_async`).

    Returns ``None`` when no constraint was requested. Raises ``InvalidRequest`` (bad shape, conflicting
    constraints, legacy field with ``legacy_fields: reject``, a bound passed, a regex RE2 refuses) or
    ``GuidedSchemaError`` (bad schema).
    """
    guided = _prepare(body, route=route, config=config)
    if guided is not None:
        guided._compile_now()
    return guided


async def prepare_async(body: dict[str, Any], *, route: str, config: GuidedConfig) -> GuidedRequest | None:
    """:func:`prepare`, with the schema or regex compiled in a worker thread unless it is cached: the bounds
    and shape checks (cheap, bounded) run on the event loop, the compile (up to the bounds' worth of work)
    never does."""
    guided = _prepare(body, route=route, config=config)
    if guided is not None and not guided._compile_from_cache():
        await asyncio.get_running_loop().run_in_executor(_COMPILE_POOL, guided._compile_now)
    return guided


def _prepare(body: dict[str, Any], *, route: str, config: GuidedConfig) -> GuidedRequest | None:
    responses = route == RESPONSES_ROUTE
    if not any(k in body for k in _TRIGGERS) and not (responses and body.get("text") is not None):
        return None
    legacy = [k for k in _LEGACY if k in body]
    if legacy and config.legacy_fields == "reject":
        raise InvalidRequest(_reject_message(legacy[0]), param=legacy[0])

    found: list[tuple[str, str, Any]] = []  # (param, structured_outputs key, value)
    rf = body.get("response_format")
    if responses:
        if rf is not None:  # not a Responses API field: vLLM would ignore it and answer unconstrained
            raise InvalidRequest("response_format is not a field of the Responses API (it would be ignored); "
                                 'send text: {"format": {"type": "json_schema", "name", "schema"}} instead',
                                 param="response_format")
        found.extend(_from_text_format(body.get("text")))
    elif rf is not None:
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
    close = key == "json" and isinstance(so, dict) and so.get("disable_additional_properties") is True
    value, guided = _check(param, key, value, config, close=close)
    guided.validate = config.validate_output and not (route == COMPLETIONS_ROUTE and body.get("echo"))
    if param.startswith("guided_"):
        merged = dict(so) if isinstance(so, dict) else {}
        merged[key] = value
        if isinstance(ws := options.get("guided_whitespace_pattern"), str):
            merged.setdefault("whitespace_pattern", ws)
        body["structured_outputs"] = merged
    elif key == "json" and param.startswith("structured_outputs"):
        body["structured_outputs"][key] = value  # a JSON string becomes the parsed schema
    elif param == "text.format.schema":
        body["text"]["format"]["schema"] = value  # likewise
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


def _from_text_format(text: object) -> list[tuple[str, str, Any]]:
    """The constraint of a Responses API ``text`` object (``text.format``); its JSON type was checked."""
    if not isinstance(text, dict):
        return []
    fmt = text.get("format")
    if fmt is None:
        return []
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object", param="text.format")
    fmt_type = fmt.get("type")
    if fmt_type not in _TEXT_FORMAT_TYPES:
        raise InvalidRequest(f"text.format.type must be one of {', '.join(_TEXT_FORMAT_TYPES)}",
                             param="text.format.type")
    if fmt_type == "text":
        return []
    if fmt_type == "json_object":
        return [("text.format", "json_object", True)]
    if not isinstance(fmt.get("name"), str):
        raise InvalidRequest("text.format.name must be a string", param="text.format.name")
    if fmt.get("schema") is None:  # vLLM 0.32 would answer unconstrained
        raise GuidedSchemaError("text.format.schema is required with type json_schema", param="text.format.schema")
    return [("text.format.schema", "json", fmt["schema"])]


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


def _check(param: str, key: str, value: Any, config: GuidedConfig, *, close: bool) -> tuple[Any, GuidedRequest]:
    """Validate one constraint's shape and bounds; returns the value to forward and the request to check
    answers with (compiling is left to :meth:`GuidedRequest._compile_now`). ``close``: apply
    ``disable_additional_properties`` to the schema (vLLM 0.32 ignores the per-request flag)."""
    kind = _SO_KIND[key]
    if key == "json":
        schema = _load_schema(param, value, config)
        bounds.check_schema(param, schema, config)
        if close:
            schema = close_objects(schema)
        try:
            schema_json = canonical_json(schema)
        except (TypeError, ValueError):  # NaN/Infinity (the body parser may let them in)
            raise GuidedSchemaError(f"{param} is not JSON", param=param) from None
        bounds.check_schema_json(param, schema_json, config)
        return schema, GuidedRequest(kind, param, schema=schema,
                                     _compile=_Compile(param, schema_json=schema_json, schema=schema))
    if key == "json_object":
        if value is not True:
            raise InvalidRequest(f"{param} must be true", param=param)
        return value, GuidedRequest(kind, param)
    if key == "regex":
        if not isinstance(value, str):
            raise InvalidRequest(f"{param} must be a string", param=param)
        bounds.check_pattern(param, value, config)
        return value, GuidedRequest(kind, param, _compile=_Compile(param, pattern=value))
    if key == "choice":
        if not isinstance(value, list) or not value:
            raise InvalidRequest(f"{param} must be a non-empty list of strings", param=param)
        bounds.check_choices(param, value, config)
        if not all(isinstance(c, str) for c in value):
            raise InvalidRequest(f"{param} must be a non-empty list of strings", param=param)
        return value, GuidedRequest(kind, param, choices=tuple(value))
    if key == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"{param} must be a non-empty string", param=param)
        bounds.check_grammar(param, value, config)
    return value, GuidedRequest(kind, param)  # grammar, structural_tag: vLLM checks them


def _load_schema(param: str, value: Any, config: GuidedConfig) -> dict[str, Any]:
    if isinstance(value, str):
        bounds.check_schema_text(param, value, config)
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GuidedSchemaError(f"{param} is not valid JSON: {exc}", param=param) from None
        except RecursionError:
            raise bounds.too_large(param, f"{param} is nested deeper than {config.max_schema_depth} levels "
                                          "(guided.max_schema_depth)") from None
    if not isinstance(value, dict):
        raise GuidedSchemaError(f"{param} must be a JSON Schema object", param=param)
    return value


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

"""JSON Schema side of guided decoding: compile a request's schema once, check answers against it safely.

Contract:

* :func:`canonical_json` is the schema's cache key text (sorted keys, compact; ``ValueError`` for NaN or
  Infinity). :data:`SCHEMAS` (:class:`SchemaCache`) maps ``(param, sha256 of that text)`` to the compiled
  :class:`SchemaCheck` or the schema's :class:`~qwen_serve.errors.GuidedSchemaError`, least recently used
  evicted first past :data:`SCHEMA_CACHE_ENTRIES` entries or :data:`SCHEMA_CACHE_BYTES` of canonical text.
  Compiling (the metaschema check, ~2 ms for a small schema, far more for a large one) is meant to run off the
  event loop; the cache is thread-safe.
* :func:`compile_schema` checks the schema against its metaschema (``$schema``, else Draft 2020-12) and its
  ``$ref`` (local only, must resolve) and returns a :class:`SchemaCheck`; nothing is ever fetched.
* :meth:`SchemaCheck.is_valid` validates an answer within a :class:`~qwen_serve.gateway.guided_budget.Budget`.
  It raises :class:`~qwen_serve.gateway.guided_budget.OverBudget` when the budget runs out, and
  :class:`Unverifiable` when the answer reaches a keyword the checker cannot evaluate in linear time (a
  ``pattern``/``patternProperties`` regex RE2 cannot compile, e.g. with look-around; ``unevaluatedProperties``
  in a schema that has ``patternProperties``); ``RecursionError`` too, for an answer nested too deeply.
  ``pattern``, ``patternProperties`` and ``additionalProperties`` are evaluated with RE2 search semantics
  (:mod:`qwen_serve.gateway.regex_check`, which lists where that differs from ECMA-262): never with Python's
  backtracking :mod:`re`. ``format`` is not checked (no format checker), as before.
* :func:`close_objects` applies ``disable_additional_properties`` to a schema whose depth is bounded
  (:mod:`qwen_serve.gateway.guided_bounds` runs first).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import referencing
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from qwen_serve.errors import GuidedSchemaError
from qwen_serve.gateway import regex_check
from qwen_serve.gateway.guided_budget import Budget

__all__ = [
    "SCHEMAS",
    "SCHEMA_CACHE_BYTES",
    "SCHEMA_CACHE_ENTRIES",
    "SchemaCache",
    "SchemaCheck",
    "Unverifiable",
    "canonical_json",
    "close_objects",
    "compile_schema",
]

SCHEMA_CACHE_ENTRIES: Final = 256  # compiled schemas kept at most
SCHEMA_CACHE_BYTES: Final = 64 << 20  # total canonical schema text (characters) the kept schemas may sum to

NOT_SCHEMAS: Final = frozenset({"const", "enum", "default", "examples"})  # values here are data
# keywords holding a map of subschemas / a subschema or a list of them (as vLLM's guidance backend reads them)
MAP_KEYWORDS: Final = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
SUB_KEYWORDS: Final = (
    "additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "additionalItems",
    "unevaluatedItems", "not", "if", "then", "else", "contentSchema", "items", "prefixItems", "allOf", "anyOf", "oneOf",
)


class Unverifiable(Exception):
    """The answer reached a keyword that cannot be evaluated in linear time."""


def canonical_json(schema: Any) -> str:
    """The schema as sorted, compact JSON (the cache key's text); ``ValueError`` for NaN/Infinity."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# -- checking answers ----------------------------------------------------------------------------


class _Context(threading.local):
    """What the keyword functions of the check running on this thread need."""

    budget: Budget | None = None
    pattern_properties: bool = True  # outside a check, assume the worst


_CONTEXT: Final = _Context()


@dataclass(frozen=True, eq=False)
class SchemaCheck:
    """A compiled schema: read-only, shared by requests and threads."""

    validator: Validator
    pattern_properties: bool  # the schema has patternProperties somewhere

    def is_valid(self, instance: object, budget: Budget) -> bool:
        """Whether ``instance`` is valid; see the module docstring for what it raises."""
        saved = (_CONTEXT.budget, _CONTEXT.pattern_properties)
        _CONTEXT.budget, _CONTEXT.pattern_properties = budget, self.pattern_properties
        try:
            return bool(self.validator.is_valid(instance))
        finally:
            _CONTEXT.budget, _CONTEXT.pattern_properties = saved


def _search(pattern: str, text: str) -> bool:
    """RE2 search of ``pattern`` in ``text``, charged to the running check's budget."""
    try:
        compiled = regex_check.compile_regex(pattern)
    except regex_check.RegexError:
        raise Unverifiable(pattern) from None
    data = text.encode("utf-8", "surrogatepass")
    budget = _CONTEXT.budget
    if budget is not None:
        budget.spend_match(2 * compiled.cost(data))  # a search may also run the reverse program
    return compiled.search(data)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError("the string does not match the schema's pattern")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties and not any(_search(p, k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for key in extras:
            yield from validator.descend(instance[key], additional, path=key)
    elif not additional and extras:
        yield ValidationError(f"{len(extras)} additional properties are not allowed")


def _no_pattern_properties(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """``unevaluatedProperties``: jsonschema evaluates ``patternProperties`` there with Python's ``re``."""

    def checked(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if _CONTEXT.pattern_properties:
            raise Unverifiable("unevaluatedProperties with patternProperties")
        return keyword(validator, value, instance, schema)

    return checked


def _size(value: object) -> int:
    return len(value) if isinstance(value, (dict, list)) else 0


def _metered(name: str, keyword: Callable[..., Any]) -> Callable[..., Any]:
    """``keyword`` charging the running check's budget: one step, plus the sizes it iterates over."""
    quadratic = name == "uniqueItems"  # jsonschema compares unsortable items pairwise

    def metered(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        budget = _CONTEXT.budget
        if budget is not None:
            n = _size(instance)
            budget.spend_steps(1 + (_size(value) + n) // 16 + (n * n // 1024 if quadratic and value else 0))
        return keyword(validator, value, instance, schema)

    return metered


_LINEAR: Final[dict[str, Callable[..., Any]]] = {
    "pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties,
}
_CHECKERS: dict[type[Validator], type[Validator]] = {}
_CHECKERS_LOCK: Final = threading.Lock()


def _checker_class(cls: type[Validator]) -> type[Validator]:
    """``cls`` with RE2-based regex keywords and every keyword metered (one class per dialect)."""
    with _CHECKERS_LOCK:
        found = _CHECKERS.get(cls)
        if found is None:
            keywords = dict(cls.VALIDATORS)
            keywords.update({k: f for k, f in _LINEAR.items() if k in keywords})
            if "unevaluatedProperties" in keywords:
                keywords["unevaluatedProperties"] = _no_pattern_properties(keywords["unevaluatedProperties"])
            metered = {k: _metered(k, f) for k, f in keywords.items()}
            found = _CHECKERS[cls] = validators.extend(cls, validators=metered)
        return found


# -- compiling -----------------------------------------------------------------------------------

_META: dict[type[Validator], Validator] = {}


def compile_schema(param: str, schema: dict[str, Any]) -> SchemaCheck:
    """Metaschema-check ``schema`` and its ``$ref``; raises :class:`GuidedSchemaError` naming the part."""
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
    for path, ref in _refs(schema):
        where = ".".join([param, *path, "$ref"])
        if not ref.startswith("#"):
            raise GuidedSchemaError(
                f"{where}: only local references ('#/...') are supported, not {ref!r}", param=where
            )
        if ref[1:2] in ("", "/") and not _pointer_resolves(schema, ref[1:]):
            raise GuidedSchemaError(f"{where}: {ref!r} does not resolve inside the schema", param=where)
    has_pattern_properties = False
    patterns: list[str] = []
    for node in _schema_nodes(schema):
        if isinstance(keys := node.get("patternProperties"), dict):
            has_pattern_properties = True
            patterns.extend(keys)
        if isinstance(pattern := node.get("pattern"), str):
            patterns.append(pattern)
    _warm(dict.fromkeys(patterns))
    validator = _checker_class(cls)(schema, registry=referencing.Registry())
    return SchemaCheck(validator, has_pattern_properties)


def _warm(patterns: Iterable[str]) -> None:
    """Compile the schema's patterns now (off the event loop), so checks find them in the cache (only as
    many as the cache holds)."""
    for pattern in itertools.islice(patterns, regex_check.CACHE_ENTRIES):
        try:
            regex_check.compile_regex(pattern)
        except regex_check.RegexError:
            pass  # answers that reach it are unverified


def _schema_nodes(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every object in a schema position (not under ``const``/``enum``/``default``/``examples``)."""
    stack: list[object] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(v for k, v in node.items() if k not in NOT_SCHEMAS)


def _refs(schema: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """``$ref`` strings in schema positions with their paths, skipping embedded resources (nested ``$id``)."""
    stack: list[tuple[object, tuple[str, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if path and isinstance(node.get("$id"), str):
                continue
            if isinstance(ref := node.get("$ref"), str):
                yield path, ref
            stack.extend(((v, (*path, str(k))) for k, v in reversed(node.items()) if k not in NOT_SCHEMAS))
        elif isinstance(node, list):
            stack.extend(((v, (*path, str(i))) for i, v in reversed(list(enumerate(node)))))


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


def close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object schema that has
    ``properties``/``patternProperties`` and does not set it: what ``disable_additional_properties`` means
    in vLLM (whose 0.32 backends only read the engine-wide flag, never the per-request one). Recursive: call
    it only on a schema whose depth was bounded."""

    def walk(node: object) -> object:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for k in MAP_KEYWORDS:
            if isinstance(out.get(k), dict):
                out[k] = {name: walk(sub) for name, sub in out[k].items()}
        for k in SUB_KEYWORDS:
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


# -- the cache -----------------------------------------------------------------------------------


class SchemaCache:
    """Compiled schemas (or the schema's error) by ``(param, sha256 of the canonical text)``, least recently
    used evicted first once more than ``max_entries`` are held or their texts sum to more than ``max_bytes``
    characters. A text larger than ``max_bytes`` is compiled but never kept. Thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # sum of the canonical text lengths of the entries held
        self._entries: OrderedDict[tuple[str, bytes], tuple[int, SchemaCheck | GuidedSchemaError]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(param: str, schema_json: str) -> tuple[str, bytes]:
        return param, hashlib.sha256(schema_json.encode("utf-8", "surrogatepass")).digest()

    def peek(self, param: str, schema_json: str) -> SchemaCheck | GuidedSchemaError | None:
        """The cached result, or None (nothing is compiled)."""
        key = self.key(param, schema_json)
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def get(self, param: str, schema_json: str, schema: dict[str, Any] | None = None) -> SchemaCheck | GuidedSchemaError:
        """The cached result, else compile ``schema`` (parsed from ``schema_json`` when not given) and keep it."""
        found = self.peek(param, schema_json)
        if found is not None:
            return found
        try:
            compiled: SchemaCheck | GuidedSchemaError = compile_schema(
                param, schema if schema is not None else json.loads(schema_json))
        except GuidedSchemaError as exc:
            compiled = exc.with_traceback(None)  # kept: its frames would keep the schema alive
        size = len(schema_json)
        if size > self.max_bytes:
            return compiled
        key = self.key(param, schema_json)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[0]
            self._entries[key] = (size, compiled)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (old_size, _) = self._entries.popitem(last=False)
                self.bytes -= old_size
        return compiled

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


SCHEMAS: Final = SchemaCache(SCHEMA_CACHE_ENTRIES, SCHEMA_CACHE_BYTES)

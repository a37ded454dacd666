"""Request-time bounds of a guided-decoding constraint (the ``guided.max_*`` settings).

Checked before any other work on the constraint (parsing a schema sent as a string, compiling, forwarding).
Every check is cheap and bounded by the limit it enforces: sizes are added up from the start and counting
stops as soon as a bound is passed, and the schema walk is iterative, so no nesting can exhaust the stack.
Past a bound: :class:`~qwen_serve.errors.InvalidRequest` (400 ``invalid_request_error``, code
:data:`TOO_LARGE`), ``param`` the field as the client sent it (``structured_outputs.choice``,
``guided_choice``...) or, for a pattern inside a schema, that pattern's path. Messages name the setting
and never quote the constraint's content.

=====================================  ==============================  ===========================================
bound                                  setting (default)               applies to
=====================================  ==============================  ===========================================
schema size, as compact UTF-8 JSON     ``max_schema_bytes`` (256 KiB)  ``response_format.json_schema.schema``,
                                                                       ``text.format.schema`` (Responses API),
                                                                       ``structured_outputs.json``, ``guided_json``
schema nesting (objects and arrays)    ``max_schema_depth`` (64)       the same
property names in the schema           ``max_schema_properties``       keys of every ``properties`` and
                                       (4096)                          ``patternProperties`` map
choices / their total UTF-8 bytes      ``max_choices`` (1024) /        ``structured_outputs.choice``,
                                       ``max_choice_bytes`` (64 KiB)   ``guided_choice``
one regular expression                 ``max_pattern_bytes`` (8 KiB)   ``structured_outputs.regex``,
                                                                       ``guided_regex``, a schema's ``pattern`` and
                                                                       ``patternProperties`` keys
repetition count in an expression      1000 (RE2's limit)              the same
a grammar                              ``max_grammar_bytes`` (64 KiB)  ``structured_outputs.grammar``,
                                                                       ``guided_grammar``
=====================================  ==============================  ===========================================
"""

from __future__ import annotations

from typing import Any, Final

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import InvalidRequest
from qwen_serve.gateway.regex_check import repetition_problem

__all__ = [
    "TOO_LARGE",
    "check_choices",
    "check_grammar",
    "check_pattern",
    "check_schema",
    "check_schema_json",
    "check_schema_text",
    "too_large",
]

TOO_LARGE: Final = "guided_constraint_too_large"

_DATA: Final = frozenset({"const", "enum", "default", "examples"})  # values here are data, not schemas
_MAPS: Final = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                          "dependencies"})  # maps of name -> schema
_COUNTED: Final = ("properties", "patternProperties")


def too_large(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=TOO_LARGE)


def _utf8_over(text: str, limit: int) -> int | None:
    """``len(text)`` in UTF-8 bytes when it is over ``limit``, else None (a character is 1 to 4 bytes, so
    most texts are decided without encoding them)."""
    if len(text) > limit:
        return len(text)  # at least
    if 4 * len(text) <= limit:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def check_pattern(param: str, pattern: str, config: GuidedConfig) -> None:
    """A regular expression's size (``max_pattern_bytes``) and repetition counts (at most 1000)."""
    if (size := _utf8_over(pattern, config.max_pattern_bytes)) is not None:
        raise too_large(param, f"{param} is {size} bytes or more; at most {config.max_pattern_bytes} are "
                               "accepted (guided.max_pattern_bytes)")
    if (problem := repetition_problem(pattern)) is not None:
        raise too_large(param, f"{param}: {problem}")


def check_grammar(param: str, grammar: str, config: GuidedConfig) -> None:
    if (size := _utf8_over(grammar, config.max_grammar_bytes)) is not None:
        raise too_large(param, f"{param} is {size} bytes or more; at most {config.max_grammar_bytes} are "
                               "accepted (guided.max_grammar_bytes)")


def check_choices(param: str, choices: list[Any], config: GuidedConfig) -> None:
    """The number of choices, then their total UTF-8 bytes (non-strings are left to the type check)."""
    if len(choices) > config.max_choices:
        raise too_large(param, f"{param} has {len(choices)} choices; at most {config.max_choices} are "
                               "accepted (guided.max_choices)")
    total, limit = 0, config.max_choice_bytes
    for choice in choices:
        if isinstance(choice, str):
            total += len(choice) if choice.isascii() else len(choice.encode("utf-8", "surrogatepass"))
            if total > limit:
                raise too_large(param, f"{param} adds up to more than {limit} bytes "
                                       "(guided.max_choice_bytes)")


def check_schema_text(param: str, text: str, config: GuidedConfig) -> None:
    """A schema sent as a JSON string, before it is parsed: its size."""
    if (size := _utf8_over(text, config.max_schema_bytes)) is not None:
        _schema_too_big(param, size, config)


def check_schema_json(param: str, canonical: str, config: GuidedConfig) -> None:
    """The exact size of the schema's compact JSON (after :func:`check_schema` passed, so it is bounded)."""
    if (size := _utf8_over(canonical, config.max_schema_bytes)) is not None:
        _schema_too_big(param, size, config)


def _schema_too_big(param: str, size: int, config: GuidedConfig) -> None:
    raise too_large(param, f"{param} is {size} bytes or more as compact JSON; at most {config.max_schema_bytes} "
                           "are accepted (guided.max_schema_bytes)")


_Path = tuple[Any, str | int] | None  # (parent's path, key): joined only for an error message


def _dotted(param: str, path: _Path) -> str:
    keys: list[str] = []
    while path is not None:
        path, key = path
        keys.append(str(key))
    return ".".join([param, *reversed(keys)])


# a node's role: what its keys and values are
_SCHEMA, _MAP, _DATA_ROLE = 0, 1, 2


def check_schema(param: str, schema: object, config: GuidedConfig) -> None:
    """Nesting (``max_schema_depth``), property names (``max_schema_properties``), a lower bound of the
    compact JSON size (``max_schema_bytes``; :func:`check_schema_json` measures it exactly afterwards) and
    every ``pattern`` / ``patternProperties`` key (:func:`check_pattern`), in one iterative walk that stops at
    the first bound passed. Every value visited adds at least one byte to the estimate, so the walk's work is
    proportional to ``max_schema_bytes`` at most, whatever the schema's real size."""
    max_bytes, max_depth, max_props = config.max_schema_bytes, config.max_schema_depth, config.max_schema_properties
    size, properties = 1, 0  # the root's opening bracket: each node counts its other bytes (a lower bound)
    stack: list[tuple[Any, int, int, _Path]] = [(schema, 1, _SCHEMA, None)]
    push, pop = stack.append, stack.pop
    while stack:
        node, depth, role, path = pop()
        if depth > max_depth:
            raise too_large(param, f"{param} is nested deeper than {max_depth} levels (guided.max_schema_depth)")
        is_dict = type(node) is dict
        # per element at least a separator (or the closing bracket) and one byte (+ quotes and colon of a key)
        size += (5 if is_dict else 2) * len(node)
        if size > max_bytes:
            _schema_too_big(param, size, config)
        if role == _DATA_ROLE:  # const/enum/default/examples: only size and depth matter
            if is_dict:
                for key in node:
                    size += len(key)
            for value in node.values() if is_dict else node:
                kind = type(value)
                if kind is str:
                    size += len(value) + 1
                elif kind is dict or kind is list:
                    push((value, depth + 1, _DATA_ROLE, None))
                if size > max_bytes:
                    _schema_too_big(param, size, config)
            continue
        if not is_dict:  # a list of subschemas (allOf...) or of names (required)
            for index, value in enumerate(node):
                kind = type(value)
                if kind is str:
                    size += len(value) + 1
                elif kind is dict or kind is list:
                    push((value, depth + 1, _SCHEMA, (path, index)))
                if size > max_bytes:
                    _schema_too_big(param, size, config)
            continue
        if role == _SCHEMA:
            properties += _property_names(node)
            if properties > max_props:
                raise too_large(param, f"{param} has more than {max_props} property names "
                                       "(guided.max_schema_properties)")
            _check_patterns(param, node, path, config)
        for key, value in node.items():
            size += len(key)
            kind = type(value)
            if kind is str:
                size += len(value) + 1
            elif kind is dict or kind is list:
                if role == _SCHEMA and key in _DATA:
                    child = _DATA_ROLE
                elif role == _SCHEMA and key in _MAPS and kind is dict:
                    child = _MAP
                else:
                    child = _SCHEMA
                push((value, depth + 1, child, (path, key)))
            if size > max_bytes:
                _schema_too_big(param, size, config)


def _property_names(node: dict[str, Any]) -> int:
    count = 0
    for key in _COUNTED:
        names = node.get(key)
        if type(names) is dict:
            count += len(names)
    return count


def _check_patterns(param: str, node: dict[str, Any], path: _Path, config: GuidedConfig) -> None:
    pattern = node.get("pattern")
    if type(pattern) is str:
        check_pattern(_dotted(param, (path, "pattern")), pattern, config)
    keys = node.get("patternProperties")
    if type(keys) is dict:
        for key in keys:
            check_pattern(_dotted(param, (path, "patternProperties")), key, config)

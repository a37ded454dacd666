"""One wording for the problems of a YAML settings file: the config, the API keys file, a bench scenario.

* :func:`format_yaml_error`: ``<source>: line 4, column 1: invalid YAML (<problem>)``. Only the problem and
  its position: PyYAML's own ``str()`` quotes the offending line, which may hold a secret or a hash.
* :func:`format_validation_error`: a pydantic :class:`~pydantic.ValidationError` as one ``path: problem``
  per key path, joined by ``; `` (``engine.gpus: must be a positive integer``; ``keys[2].rpm: ...``).
  List positions are ``[i]``; the extra path elements pydantic adds for union members are dropped and
  the members' problems merged into one line. A problem of the whole object (a model validator) is its
  message alone, as is a validator's message that already starts with its path. Offending values are
  never echoed.

Callers add the file name and raise their own error type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

__all__ = ["format_validation_error", "format_yaml_error"]

_TYPE_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}
# Problems worded the same whatever field they are about (``field_messages`` does not replace them).
_GENERIC = frozenset({"extra_forbidden", "missing", "dict_type", "model_type", "model_attributes_type"})
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def format_yaml_error(exc: yaml.YAMLError, source: str) -> str:
    """``<source>: line L, column C: invalid YAML (<problem>)`` (no position when PyYAML gives none)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
    return f"{source}:{where} invalid YAML ({getattr(exc, 'problem', None) or 'parse error'})"


def format_validation_error(exc: ValidationError, field_messages: Mapping[str, str] | None = None) -> str:
    """One ``path: problem`` per key path (see the module docstring).

    ``field_messages``: the problem of a field by its name, whatever pydantic's error type was (an unknown
    or missing key, a value that is not a mapping, and a validator's own message keep their wording).
    """
    lines: dict[str, str] = {}
    for err in exc.errors():
        path = _path(err["loc"])
        msg = _message(err, field_messages or {})
        if path in lines and "one of" in lines[path]:
            lines[path] = f"{lines[path]} or {msg.removeprefix('must be ')}"
        elif path in lines and "auto" not in lines[path] and err["type"] != "literal_error":
            continue
        else:
            lines.setdefault(path, msg)
    return "; ".join(m if not p or m.startswith(f"{p}:") else f"{p}: {m}" for p, m in lines.items())


def _is_union_member(p: object) -> bool:
    return isinstance(p, str) and ("[" in p or p in ("int", "str", "float") or p.startswith("constrained-"))


def _path(loc: Sequence[int | str]) -> str:
    """``keys[2].rpm``; ``""`` for the whole object."""
    parts = [p for p in loc if not _is_union_member(p)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _message(err: Mapping[str, Any], field_messages: Mapping[str, str]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])  # a validator's own message
    if kind not in _GENERIC:
        field = next((p for p in reversed(err["loc"]) if isinstance(p, str) and p in field_messages), None)
        if field is not None:
            return field_messages[field]
    if kind == "greater_than" and ctx.get("gt") == 0:
        return "must be a positive integer" if isinstance(err.get("input"), int) else "must be positive"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()), '?')}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    return _TYPE_MESSAGES.get(kind, str(err.get("msg", kind)).lower())

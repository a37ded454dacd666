"""Deterministic JSON Schemas for the guided-decoding tests, with instances that prove them satisfiable.

Used by ``tests/unit/test_guided.py`` and the engine-backed guided-JSON integration test.
:func:`generate_schemas` returns the same list on every run. Each schema is a root object with
``additionalProperties: false`` and covers one focus feature: flat objects, nested objects, arrays
with ``minItems``/``maxItems``, enums, bounded integers, strings with ``maxLength``, all-required or
all-optional properties, and ``anyOf``.

Everything is bounded so that a random-weight model under constrained decoding finishes an answer in
about 200 tokens: strings have a ``maxLength`` of 6 or less, arrays a ``maxItems`` of 3 or less,
integers lie within ±999, objects nest at most two levels deep, and there is no unbounded ``number``.
:func:`maximal_instance` builds the longest compact answer, and the unit tests keep its length under
:data:`MAX_COMPACT_CHARS` characters. Whitespace that a backend allows between tokens does not count
towards that limit.
"""

from __future__ import annotations

import json
import random
from typing import Any

__all__ = [
    "DRAFT_2020_12",
    "FOCUSES",
    "MAX_COMPACT_CHARS",
    "generate_schemas",
    "maximal_instance",
    "minimal_instance",
]

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
MAX_COMPACT_CHARS = 150
FOCUSES = (
    "flat", "nested", "array", "enum", "integer", "string",
    "all_required", "all_optional", "any_of", "array_of_objects", "mixed", "nested_any_of",
)
_NAMES = (
    "id", "name", "age", "tags", "kind", "ok", "score", "city", "code", "unit",
    "note", "level", "color", "size", "x", "y", "mode", "rank",
)
_WORDS = ("red", "green", "blue", "cat", "dog", "yes", "no", "low", "high", "on", "off", "a", "b", "c")
Schema = dict[str, Any]


def generate_schemas(count: int = 36, seed: int = 2025) -> list[Schema]:
    """``count`` schemas, cycling through :data:`FOCUSES`; the same list for the same arguments."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        schema = _BUILDERS[FOCUSES[i % len(FOCUSES)]](rng)
        schema["title"] = f"s{i:02d}_{FOCUSES[i % len(FOCUSES)]}"
        if i % 3 == 0:
            schema["$schema"] = DRAFT_2020_12
        out.append(schema)
    return out


# -- leaves ---------------------------------------------------------------------------------------


def _string(rng: random.Random) -> Schema:
    s: Schema = {"type": "string", "maxLength": rng.randint(1, 6)}
    if rng.random() < 0.4:
        s["minLength"] = 1
    return s


def _integer(rng: random.Random) -> Schema:
    lo = rng.randint(-50, 50)
    return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}


def _enum(rng: random.Random) -> Schema:
    return {"type": "string", "enum": rng.sample(_WORDS, rng.randint(2, 4))}


def _scalar(rng: random.Random) -> Schema:
    pick = rng.randrange(4)
    if pick == 3:
        return {"type": "boolean"}
    return (_string, _integer, _enum)[pick](rng)


def _array(rng: random.Random, items: Schema | None = None, *, max_items: int = 3) -> Schema:
    lo = rng.randint(0, 2)
    return {
        "type": "array",
        "items": items if items is not None else rng.choice((_string, _integer, _enum))(rng),
        "minItems": min(lo, max_items),
        "maxItems": min(lo + rng.randint(0, 1), max_items),
    }


def _any_of(rng: random.Random) -> Schema:
    pick = rng.randrange(3)
    if pick == 0:
        return {"anyOf": [_string(rng), _integer(rng)]}
    if pick == 1:
        return {"anyOf": [_enum(rng), {"type": "null"}]}
    return {"anyOf": [_object(rng, _scalar, 1), _object(rng, _scalar, 1)]}


def _object(rng: random.Random, leaf: Any, n: int, required: str = "some") -> Schema:
    names = rng.sample(_NAMES, n)
    props = {name: leaf(rng) for name in names}
    if required == "all":
        req = list(names)
    elif required == "none":
        req = []
    else:
        req = [name for name in names if rng.random() < 0.6] or [names[0]]
    schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if req:
        schema["required"] = req
    return schema


# -- one builder per focus ------------------------------------------------------------------------


def _small_object(rng: random.Random) -> Schema:
    return _object(rng, _scalar, rng.randint(1, 2))


def _nested_child(rng: random.Random) -> Schema:
    return _object(rng, _nested_leaf, 2) if rng.random() < 0.6 else _scalar(rng)


def _nested_leaf(rng: random.Random) -> Schema:
    return _small_object(rng) if rng.random() < 0.3 else _scalar(rng)


_BUILDERS: dict[str, Any] = {
    "flat": lambda rng: _object(rng, _scalar, rng.randint(2, 4)),
    "nested": lambda rng: _object(rng, _nested_child, 3, "all"),
    "array": lambda rng: _object(rng, lambda r: _array(r) if r.random() < 0.6 else _scalar(r), 2),
    "enum": lambda rng: _object(rng, _enum, rng.randint(1, 3)),
    "integer": lambda rng: _object(rng, _integer, rng.randint(1, 4)),
    "string": lambda rng: _object(rng, _string, rng.randint(1, 3)),
    "all_required": lambda rng: _object(rng, _scalar, 3, "all"),
    "all_optional": lambda rng: _object(rng, _scalar, 3, "none"),
    "any_of": lambda rng: _object(rng, lambda r: _any_of(r) if r.random() < 0.6 else _scalar(r), 2, "all"),
    "array_of_objects": lambda rng: _object(rng, lambda r: _array(r, _object(r, _scalar, 1, "all"), max_items=2), 1),
    "mixed": lambda rng: _object(rng, lambda r: rng.choice((_scalar, _array, _any_of))(r), 3),
    "nested_any_of": lambda rng: _object(rng, lambda r: _object(r, _any_of, 1, "all"), 1, "all"),
}


# -- instances ------------------------------------------------------------------------------------


def minimal_instance(schema: Schema) -> Any:
    """The shortest valid instance of a schema built by :func:`generate_schemas`."""
    return _instance(schema, smallest=True)


def maximal_instance(schema: Schema) -> Any:
    """A longest valid instance: every property, ``maxItems`` items, ``maxLength`` strings."""
    return _instance(schema, smallest=False)


def _instance(s: Schema, *, smallest: bool) -> Any:
    if "anyOf" in s:
        options = [_instance(sub, smallest=smallest) for sub in s["anyOf"]]
        return min(options, key=_size) if smallest else max(options, key=_size)
    if "enum" in s:
        return (min if smallest else max)(s["enum"], key=len)
    kind = s["type"]
    if kind == "object":
        keep = set(s.get("required", ())) if smallest else set(s["properties"])
        return {k: _instance(v, smallest=smallest) for k, v in s["properties"].items() if k in keep}
    if kind == "array":
        n = s.get("minItems", 0) if smallest else s["maxItems"]
        return [_instance(s["items"], smallest=smallest) for _ in range(n)]
    if kind == "string":
        return "a" * (s.get("minLength", 0) if smallest else s["maxLength"])
    if kind == "integer":
        lo, hi = s["minimum"], s["maximum"]
        return (lo if lo >= 0 else min(0, hi)) if smallest else (lo if len(str(lo)) > len(str(hi)) else hi)
    if kind == "boolean":
        return smallest  # True is shorter than False
    if kind == "null":
        return None
    raise ValueError(f"unsupported schema: {s}")


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))

"""Unit tests for ``qwen_serve.gateway.guided_bounds``: the request-time bounds of a guided constraint
(``guided.max_*``), cheap, iterative and stopping at the first bound passed."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import pytest

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import InvalidRequest
from qwen_serve.gateway import guided_bounds as bounds

DEFAULTS = GuidedConfig()
SMALL = GuidedConfig(max_schema_bytes=1000, max_schema_depth=5, max_schema_properties=10, max_choices=3,
                     max_choice_bytes=10, max_pattern_bytes=8, max_grammar_bytes=16)


def refused(call: Any, *args: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call(*args)
    err = info.value
    assert err.status == 400 and err.code == bounds.TOO_LARGE == "guided_constraint_too_large"
    assert err.to_dict()["error"]["type"] == "invalid_request_error"
    return err


def test_the_defaults_are_the_documented_ones() -> None:
    assert (DEFAULTS.max_schema_bytes, DEFAULTS.max_schema_depth, DEFAULTS.max_schema_properties) == (256 << 10, 64, 4096)
    assert (DEFAULTS.max_choices, DEFAULTS.max_choice_bytes) == (1024, 64 << 10)
    assert (DEFAULTS.max_pattern_bytes, DEFAULTS.max_grammar_bytes) == (8 << 10, 64 << 10)


# -- choices, patterns, grammars -------------------------------------------------------------------


def test_choices_count_and_bytes() -> None:
    bounds.check_choices("guided_choice", ["ab", "cd", "ef"], SMALL)  # 3 choices, 6 bytes: at the bounds
    bounds.check_choices("guided_choice", ["a" * 10], SMALL)
    err = refused(bounds.check_choices, "structured_outputs.choice", ["a"] * 4, SMALL)
    assert err.param == "structured_outputs.choice" and "guided.max_choices" in err.message
    err = refused(bounds.check_choices, "guided_choice", ["é" * 6], SMALL)  # 6 characters, 12 UTF-8 bytes
    assert err.param == "guided_choice" and "guided.max_choice_bytes" in err.message


def test_two_hundred_thousand_choices_are_refused_before_looking_at_them() -> None:
    class Unwalkable(list[str]):
        def __iter__(self) -> Any:
            raise AssertionError("the choices were walked")

    many = Unwalkable(f"choice-{i}" for i in range(200_000))
    err = refused(bounds.check_choices, "guided_choice", many, DEFAULTS)  # a len(), not a walk
    assert "200000" in err.message and "choice-" not in err.message


def test_choice_bytes_stop_counting_at_the_bound() -> None:
    class Counting(str):
        seen = 0

        def isascii(self) -> bool:
            Counting.seen += 1
            return True

    choices = [Counting("x" * 100) for _ in range(1000)]
    refused(bounds.check_choices, "guided_choice", choices, GuidedConfig(max_choice_bytes=1000))
    assert Counting.seen == 11  # stopped at the eleventh choice


def test_pattern_bytes_and_repetitions() -> None:
    bounds.check_pattern("guided_regex", "[a-z]{8}", GuidedConfig(max_pattern_bytes=8))
    err = refused(bounds.check_pattern, "guided_regex", "ééééé", SMALL)  # 10 bytes
    assert err.param == "guided_regex" and "guided.max_pattern_bytes" in err.message
    err = refused(bounds.check_pattern, "structured_outputs.regex", "a{4294967296}", DEFAULTS)
    assert err.param == "structured_outputs.regex" and "1000" in err.message


def test_grammar_bytes() -> None:
    bounds.check_grammar("guided_grammar", 'root ::= "a"', SMALL)
    err = refused(bounds.check_grammar, "structured_outputs.grammar", 'root ::= "' + "a" * 20 + '"', SMALL)
    assert err.param == "structured_outputs.grammar" and "guided.max_grammar_bytes" in err.message


# -- schemas ---------------------------------------------------------------------------------------


def nested(depth: int, key: str = "items") -> dict[str, Any]:
    """A schema ``depth`` objects deep, built without recursion."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth - 1):
        node[key] = {}
        node = node[key]
    return root


def test_depth() -> None:
    bounds.check_schema("guided_json", nested(64), DEFAULTS)
    err = refused(bounds.check_schema, "guided_json", nested(65), DEFAULTS)
    assert err.param == "guided_json" and "guided.max_schema_depth" in err.message
    refused(bounds.check_schema, "response_format.json_schema.schema", nested(400), DEFAULTS)
    arrays: Any = [[[[[[]]]]]]  # lists count as levels too
    refused(bounds.check_schema, "guided_json", {"enum": arrays}, SMALL)


def test_depth_far_beyond_the_recursion_limit_is_a_400_not_a_recursion_error() -> None:
    deep = nested(50 * sys.getrecursionlimit())
    refused(bounds.check_schema, "guided_json", deep, DEFAULTS)


def test_property_names_are_counted_across_the_schema() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "object", "properties": {"x": {}}} for i in range(5)}}
    bounds.check_schema("guided_json", schema, SMALL)  # 5 + 5 names: at the bound
    schema["patternProperties"] = {"^a": {}}
    err = refused(bounds.check_schema, "guided_json", schema, SMALL)
    assert "guided.max_schema_properties" in err.message


def test_data_is_not_counted_as_properties_but_a_property_named_like_a_keyword_is_a_schema() -> None:
    data = {"const": {"properties": {f"p{i}": 1 for i in range(50)}}}
    bounds.check_schema("guided_json", data, SMALL)  # a value, not a schema
    named = {"properties": {"enum": {"properties": {f"p{i}": {} for i in range(20)}}}}
    refused(bounds.check_schema, "guided_json", named, SMALL)  # "enum" is a property name here


def test_the_probe_schema_is_refused_at_once() -> None:
    """3.5 MB and 60 000 properties: compiling it blocked the event loop for 11 s."""
    schema = {"type": "object", "properties": {f"property_{i:05d}": {"type": "string", "description": "x" * 30}
                                               for i in range(60_000)}}
    assert len(json.dumps(schema)) > 3_500_000
    t0 = time.perf_counter()
    err = refused(bounds.check_schema, "guided_json", schema, DEFAULTS)
    assert time.perf_counter() - t0 < 0.2  # one node looked at; compiling it took 11 s
    assert "4096" in err.message and "property_" not in err.message


def test_size_stops_counting_at_the_bound() -> None:
    big = {"enum": list(range(5_000_000))}  # ~39 MB as JSON
    t0 = time.perf_counter()
    err = refused(bounds.check_schema, "guided_json", big, DEFAULTS)
    assert time.perf_counter() - t0 < 0.2 and "guided.max_schema_bytes" in err.message  # one node looked at
    many_small = {"enum": [[0]] * 1_000_000}  # elements cheap to count one by one, but a million of them
    t0 = time.perf_counter()
    refused(bounds.check_schema, "guided_json", many_small, DEFAULTS)
    assert time.perf_counter() - t0 < 1.0  # stops after ~64 000 of them (~40 ms here)


def test_size_estimate_never_exceeds_the_real_compact_size() -> None:
    rng = random.Random(7)

    def value(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 4 or r < 0.3:
            return rng.choice([0, -12.5, "", "é" * rng.randint(0, 3), "x\n", True, False, None])
        if r < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {"k" * rng.randint(0, 2) + str(i): value(depth + 1) for i in range(rng.randint(0, 3))}

    for _ in range(500):
        schema = {"enum": [value()], "allOf": [value()], "properties": {"a": value()}, "title": value()}
        real = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
        bounds.check_schema("guided_json", schema, GuidedConfig(max_schema_bytes=real))
        bounds.check_schema_json("guided_json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False),
                                 GuidedConfig(max_schema_bytes=real))
        refused(bounds.check_schema_json, "guided_json",
                json.dumps(schema, separators=(",", ":"), ensure_ascii=False), GuidedConfig(max_schema_bytes=real - 1))


def test_schema_text_is_measured_before_parsing() -> None:
    err = refused(bounds.check_schema_text, "structured_outputs.json", "{" * 2000, SMALL)
    assert err.param == "structured_outputs.json"
    bounds.check_schema_text("structured_outputs.json", '{"type": "string"}', SMALL)


def test_patterns_inside_a_schema_are_bounded_and_named_by_path() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "x{5000}"},
                                               "pattern": {"type": "string"}}}  # a property named "pattern"
    err = refused(bounds.check_schema, "guided_json", schema, DEFAULTS)
    assert err.param == "guided_json.properties.a.pattern" and "1000" in err.message
    keys = {"type": "object", "patternProperties": {"^" + "a" * 20 + "$": {}}}
    err = refused(bounds.check_schema, "response_format.json_schema.schema", keys, SMALL)
    assert err.param == "response_format.json_schema.schema.patternProperties"
    listed = {"anyOf": [{"type": "string"}, {"type": "string", "pattern": "a{1001}"}]}
    assert refused(bounds.check_schema, "guided_json", listed, DEFAULTS).param == "guided_json.anyOf.1.pattern"
    in_data = {"const": {"pattern": "a{5000}"}}  # a value: not a pattern
    bounds.check_schema("guided_json", in_data, DEFAULTS)

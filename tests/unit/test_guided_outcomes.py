"""Every ``outcome`` label the pipeline puts on ``qwen_serve_guided_requests_total`` is in ``guided.OUTCOMES``.

Found by driving the pipeline's hooks (:class:`~qwen_serve.gateway.pipeline.Exchange` and
:class:`~qwen_serve.gateway.pipeline.ResponsesExchange`) through every way a guided request can end, and
reading the labels back from the metrics registry.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_serve.config import GuidedConfig
from qwen_serve.errors import QwenServeError, UpstreamError
from qwen_serve.gateway.guided import CHAT_ROUTE, OUTCOMES, RESPONSES_ROUTE, GuidedRequest, prepare
from qwen_serve.gateway.metrics import GatewayMetrics
from qwen_serve.gateway.pipeline import Exchange, ResponsesExchange

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
          "additionalProperties": False}
CHAT_SCHEMA = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}


class _Lease:
    def release(self, actual_tokens: int | None = None) -> None:
        pass


def _guided(body: dict[str, Any], route: str = CHAT_ROUTE) -> GuidedRequest:
    g = prepare(json.loads(json.dumps(body)), route=route, config=GuidedConfig())
    assert g is not None
    return g


def _answer(content: str, finish_reason: str = "stop") -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": finish_reason}]}).encode()


def _chunk(content: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish_reason}]}


def _exchange(m: GatewayMetrics, check: GuidedRequest, *, validate: bool = True) -> Exchange:
    return Exchange(m, "m", "k", 0.0, _Lease(), 10, check, validate, client_wants_usage=False)


async def _whole(m: GatewayMetrics, check: GuidedRequest, body: bytes) -> None:
    hooks = _exchange(m, check)
    await hooks.on_response(200, body)
    hooks.on_finish(status=200, disconnected=False, error=None)


async def _stream(m: GatewayMetrics, check: GuidedRequest, events: list[dict[str, Any]], *, validate: bool = True,
                  status: int = 200, disconnected: bool = False, error: QwenServeError | None = None) -> None:
    hooks = _exchange(m, check, validate=validate)
    for event in events:
        await hooks.on_event(event)
    hooks.on_finish(status=status, disconnected=disconnected, error=error)


def _emitted(m: GatewayMetrics) -> set[str]:
    return {sample.labels["outcome"] for family in m.registry.collect() for sample in family.samples
            if sample.name == "qwen_serve_guided_requests_total" and sample.value > 0}


async def test_every_emitted_outcome_is_in_outcomes() -> None:
    m = GatewayMetrics()
    person = _guided(CHAT_SCHEMA)
    await _whole(m, person, _answer('{"name": "a"}'))  # valid
    await _whole(m, person, _answer('{"age": 1}'))  # invalid
    await _whole(m, person, _answer('{"name": "a', "length"))  # truncated
    await _whole(m, _guided({**CHAT_SCHEMA, "response_format": None,
                             "structured_outputs": {"regex": r"\p{L}{1000}"}}), _answer("x"))  # unverified
    await _stream(m, person, [_chunk('{"name"')])  # ended without a finish_reason: incomplete
    await _stream(m, person, [_chunk('{"name": "a"}', "stop")], validate=False)  # unchecked
    await _stream(m, person, [_chunk('{"na')], disconnected=True)  # aborted
    await _stream(m, person, [], status=400)  # rejected by the engine
    await _stream(m, person, [], status=502, error=UpstreamError("engine gone"))  # error
    responses = ResponsesExchange(m, "m", "k", 0.0, _Lease(), 10,  # a /v1/responses stream cut short
                                  _guided({"model": "m", "input": "hi", "text": {"format": {
                                      "type": "json_schema", "name": "p", "schema": PERSON}}}, RESPONSES_ROUTE),
                                  validate=True, stream=True)
    responses.on_finish(status=200, disconnected=False, error=None)

    emitted = _emitted(m)
    assert emitted <= set(OUTCOMES), emitted - set(OUTCOMES)
    assert emitted == set(OUTCOMES)  # every path above was taken: each label of OUTCOMES is reachable

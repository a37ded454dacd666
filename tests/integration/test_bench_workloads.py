"""Bench workloads against the real stack: ``/tokenize`` counts match what the engine charges."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import pytest

from qwen_serve.bench.tokenizer import ServerTokenizer, TokenizerUnavailable
from qwen_serve.bench.workloads import build_workload
from tests.conftest import Endpoint, auth_headers, free_port


class CountingTokenizer(ServerTokenizer):
    calls = 0

    async def count_chat(self, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        self.calls += 1
        return await super().count_chat(messages, tools)

    async def encode(self, text: str) -> list[int]:
        self.calls += 1
        return await super().encode(text)

    async def decode(self, ids: Sequence[int]) -> str:
        self.calls += 1
        return await super().decode(ids)


@pytest.mark.engine
async def test_random_prompts_are_exactly_input_len_on_the_server(gateway: Endpoint) -> None:
    async with aiohttp.ClientSession() as session:
        tok = CountingTokenizer(session, gateway.url, gateway.model, api_key=gateway.api_key)
        specs = await build_workload("random", tokenizer=tok, n=5, input_len=100, output_len=8, seed=1)
        assert len(specs) == 5
        for s in specs:
            assert s.input_tokens == 100
            assert await tok.count_chat(s.body["messages"]) == 100
        assert len({s.body["messages"][0]["content"] for s in specs}) == 5

        body = {**specs[0].body, "model": gateway.model, "max_tokens": 8, "stream": False}
        async with session.post(gateway.url + "/v1/chat/completions", json=body,
                                headers=auth_headers(gateway.api_key),
                                timeout=aiohttp.ClientTimeout(total=120)) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        assert answer["usage"]["prompt_tokens"] == 100
        assert answer["usage"]["completion_tokens"] == 8

        tok.calls = 0
        t0 = time.perf_counter()
        pool = await build_workload("random", tokenizer=tok, n=100, input_len=300, output_len=8, seed=2)
        elapsed = time.perf_counter() - t0
        exact = sum(1 for s in pool if s.input_tokens == 300)
        overhead = await tok.count_chat([{"role": "user", "content": ""}])
        print(f"\n[bench workloads] template overhead {overhead} tokens; 100 x 300-token prompts in "
              f"{elapsed:.2f} s, {tok.calls} tokenizer calls, {exact}/100 exact")
        assert exact == 100
        assert elapsed < 60


@pytest.mark.engine
async def test_server_tokenizer_errors(gateway: Endpoint) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenizerUnavailable, match="HTTP 401"):
            await ServerTokenizer(session, gateway.url, gateway.model, api_key="wrong").encode("hello")
        with pytest.raises(TokenizerUnavailable, match="HTTP 404"):
            await ServerTokenizer(session, gateway.url + "/nothing", gateway.model,
                                  api_key=gateway.api_key).encode("hello")


async def test_server_tokenizer_connection_refused() -> None:
    async with aiohttp.ClientSession() as session:
        tok = ServerTokenizer(session, f"http://127.0.0.1:{free_port()}", "m")
        with pytest.raises(TokenizerUnavailable, match="failed"):
            await tok.count_chat([{"role": "user", "content": "hi"}])

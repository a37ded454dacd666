"""qwen_serve.bench.stub: the built-in trivial upstream, started as a subprocess (as ``bench ceiling`` does)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen_serve.bench.stub import StubProcess, start_stub


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProcess]:
    with start_stub(chunks_default=16, style="vllm") as s:
        yield s


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "any-name", "messages": [{"role": "user", "content": "one two three"}], **extra}


def _events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def test_stream_has_n_chunks_and_the_usage_chunk(stub: StubProcess) -> None:
    events = _events(stub.url, _chat(max_tokens=7, stream=True, stream_options={"include_usage": True}))
    role, *content, usage = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == 7 and all(e["choices"][0]["delta"]["content"] for e in content)
    assert [e["choices"][0]["finish_reason"] for e in content] == [None] * 6 + ["length"]
    assert all(e["model"] == "any-name" for e in events)  # any model is accepted and echoed
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3 + 5, "total_tokens": 8 + 7, "completion_tokens": 7}
    assert all("usage" not in e for e in [role, *content])

    # without include_usage: no usage chunk; max_completion_tokens counts like max_tokens; default 16
    assert len(_events(stub.url, _chat(max_completion_tokens=3, stream=True))) == 1 + 3
    assert len(_events(stub.url, _chat(stream=True))) == 1 + 16


def test_continuous_usage_stats_as_vllm_sends_them(stub: StubProcess) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = _events(stub.url, _chat(max_tokens=4, stream=True, stream_options=options))
    assert [e["usage"]["completion_tokens"] for e in events] == [0, 1, 2, 3, 4, 4]
    # vLLM 0.32, chat: exclude_unset on the token chunks (completion_tokens_details: null is sent) ...
    assert events[1]["usage"] == {"prompt_tokens": 8, "total_tokens": 9, "completion_tokens": 1,
                                  "completion_tokens_details": None}
    # ... exclude_none on the final usage chunk
    assert events[-1]["usage"] == {"prompt_tokens": 8, "total_tokens": 12, "completion_tokens": 4}
    # continuous_usage_stats without include_usage: nothing (vLLM requires both)
    plain = _events(stub.url, _chat(max_tokens=2, stream=True, stream_options={"continuous_usage_stats": True}))
    assert all("usage" not in e for e in plain)


def test_tokenize_counts_words_plus_the_template(stub: StubProcess) -> None:
    r = httpx.post(stub.url + "/tokenize", json={"model": "x", "prompt": "a b  c\nd"}).json()
    assert r["count"] == len(r["tokens"]) == 4 and r["max_model_len"] == 2048
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    r = httpx.post(stub.url + "/tokenize", json={"model": "x", "messages": messages}).json()
    assert r["count"] == (2 + 5) + (3 + 5)
    prompt = httpx.post(stub.url + "/detokenize", json={"model": "x", "tokens": [5, 17, 900]}).json()["prompt"]
    assert prompt == "w5 w17 w900"
    assert httpx.post(stub.url + "/tokenize", json={"prompt": prompt}).json()["tokens"] == [5, 17, 900]
    # the completion's usage counts the same way
    body = {"model": "x", "messages": messages, "max_tokens": 2}
    usage = httpx.post(stub.url + "/v1/chat/completions", json=body).json()["usage"]
    assert usage == {"prompt_tokens": 15, "total_tokens": 17, "completion_tokens": 2}


def test_metrics_are_vllm_shaped_and_count_open_streams(stub: StubProcess) -> None:
    models = httpx.get(stub.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["stub"]

    def running() -> float:
        text = httpx.get(stub.url + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {s.name for f in families.values() for s in f.samples}
        assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total"} <= samples
        assert all("model_name" in s.labels for f in families.values() for s in f.samples)
        return sum(s.value for s in families["vllm:num_requests_running"].samples)

    assert running() == 0
    slow = _chat(max_tokens=3, stream=True, fake_interval_ms=1000)  # about 3 s per stream
    threads = [threading.Thread(target=_events, args=(stub.url, slow)) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5  # polled: a starved box may start the threads late
    while running() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 3
    for t in threads:
        t.join()
    assert running() == 0


def test_freeze_stalls_every_request(stub: StubProcess) -> None:
    freeze_s = 1.5
    frozen = threading.Thread(target=httpx.post, args=(stub.url + "/v1/chat/completions",),
                              kwargs={"json": _chat(max_tokens=1, stub_freeze_s=freeze_s), "timeout": 10})
    t0 = time.monotonic()
    frozen.start()
    time.sleep(0.2)  # the stub is asleep by now
    t1 = time.monotonic()
    r = httpx.get(stub.url + "/health", timeout=10)
    waited = time.monotonic() - t1
    frozen.join()
    assert r.status_code == 200
    assert waited >= freeze_s - 0.2 - 0.25, waited  # held by the freeze (an upper bound would time the box)
    assert time.monotonic() - t0 >= freeze_s

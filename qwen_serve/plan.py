"""The launch planner: model geometry + config → TP/DP, YaRN, memory figures and the vLLM argv.

Called by ``qwen-serve plan`` (prints :meth:`Plan.to_json_dict`) and by the engine supervisor (spawns
``python -m vllm.entrypoints.openai.api_server *plan.vllm_args`` with ``plan.env``). Contract: CONTRACTS.md §1.

``build_plan(config, gpu_visible=...)`` is pure arithmetic: it reads at most one local ``config.json`` and,
only when ``engine.device`` is ``auto`` and ``gpu_visible`` is ``None``, checks whether ``/dev/nvidia0``
exists to add a warning. It returns a :class:`Plan` or raises :class:`~qwen_serve.errors.PlanError` whose
one-line message starts with the config key at fault (``engine.tensor_parallel_size: 3 does not ...``).

Rules:

* Device: ``engine.device`` when ``cuda``/``cpu``. For ``auto``: ``cpu`` when ``gpu_visible is False``,
  otherwise ``cuda`` — with ``gpu_visible=None`` (``qwen-serve plan``) the plan shows what would run on a GPU
  node; ``up`` passes :func:`detect_gpu` explicitly.
* TP must divide the attention heads, and divide or be a multiple of the KV heads (vLLM splits KV heads
  across ranks, or replicates them when TP exceeds them). An explicit impossible TP, or TP x DP above
  ``engine.gpus``, is an error, never a silent change.
* ``auto`` TP: the smallest valid TP (≤ the GPUs available to one replica) whose per-GPU budget
  (``gpu_memory_gib x gpu_memory_utilization`` minus the reserve below) holds its weight shard and the KV
  cache of at least one ``max_model_len`` sequence. ``auto`` DP: ``gpus // TP``.
* Reserve per GPU, outside weights and KV cache: 1 GiB fixed (CUDA context and graphs, NCCL/cuBLAS
  workspaces, allocator fragmentation) + the activations of one 8192-token prefill chunk through the MLP
  (``8192 x 3 x intermediate / TP x 2`` bytes; 8192 is vLLM's ``max_num_batched_tokens`` default for the
  API server on ≥70 GiB GPUs) + fp32 logits for 1024 sampled sequences (vLLM's ``max_num_seqs`` default
  there). That is 2.5 GiB for Qwen2.5-7B at TP=1 — what vLLM's profile run typically reports beyond the
  weights. vLLM profiles the real figure at start-up; the plan is an estimate of it.
* YaRN only when ``max_model_len`` exceeds the native context: ``factor = max_model_len / native`` (at most
  4.0), passed as ``--hf-overrides`` together with ``max_position_embeddings = max_model_len`` (vLLM 0.32 does
  not stretch ``max_position_embeddings`` by a YaRN factor and would refuse the longer ``--max-model-len``)
  and the model's ``rope_theta`` (the override replaces the whole RoPE dict). vLLM's YaRN is static: the
  factor applies to every prompt, short ones too, which can lower quality on short texts, so a warning says
  so whenever YaRN is on. Beyond the vendor-validated context (Qwen2.5 under 7B: 32768) a second warning
  is added.
* ``model.revision`` (hub models): ``--revision`` and, unless ``engine.extra_args`` names another
  ``--tokenizer``, ``--tokenizer-revision``, so weights and tokenizer come from the same commit. Ignored
  with a warning for a local directory.
* CPU: TP = DP = 1; the KV cache is ``engine.cpu_kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qwen_serve.config import Config
from qwen_serve.constants import ENGINE_HOST
from qwen_serve.errors import PlanError
from qwen_serve.presets import ModelGeometry, resolve_geometry

__all__ = ["Plan", "build_plan", "detect_gpu", "valid_tensor_parallel_sizes"]

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0
MAX_YARN_FACTOR = 4.0
_FIXED_RESERVE_BYTES = 1 * GIB
_PREFILL_CHUNK_TOKENS = 8192
_SAMPLED_SEQS = 1024
_KV_BLOCK_TOKENS = 16  # vLLM allocates the KV cache in blocks of 16 tokens
_OWNED_FLAGS = ("--host", "--port")  # the engine listens on 127.0.0.1:engine.port, nowhere else
# The engine keeps idle keep-alive connections this long (vLLM's default is 5 s). The gateway drops its own
# after gateway.upstream.IDLE_S (4 s), but a gateway stalled between the engine finishing a response and the
# gateway reading it sees the connection as fresher than the engine does; with 5 s a stall over 1 s let the
# engine close a connection the gateway was reusing (the likely cause of 502s in two CI runs). Set via
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE.
ENGINE_KEEP_ALIVE_S = 75


class Plan(BaseModel):
    """A launch plan. The first block of fields is the ``plan --json`` contract (CONTRACTS.md §1)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int
    native_context: int
    max_model_len: int
    tensor_parallel_size: int
    data_parallel_size: int
    rope_scaling: dict[str, Any] | None
    param_count: int
    weights_bytes_per_gpu: int
    kv_cache_bytes_per_token: int  # whole model: all layers, K and V, at the KV dtype
    kv_cache_tokens_per_replica: int
    max_full_context_sequences_per_replica: int
    vllm_args: list[str]
    warnings: list[str]
    # extensions
    device: Literal["cuda", "cpu"]
    served_name: str
    env: dict[str, str]  # extra environment for the engine process (engine.env wins)
    engine_port: int

    def to_json_dict(self) -> dict[str, Any]:
        """The ``plan --json`` object: the contract keys plus the extensions."""
        return self.model_dump(mode="json")


def detect_gpu() -> bool:
    """Whether this machine shows an NVIDIA GPU (``/dev/nvidia0``); what ``up`` passes to :func:`build_plan`."""
    return Path("/dev/nvidia0").exists()


def valid_tensor_parallel_sizes(geometry: ModelGeometry, limit: int | None = None) -> list[int]:
    """TP sizes vLLM accepts for this model: divisors of the attention heads that split or replicate KV heads."""
    heads, kv = geometry.num_attention_heads, geometry.num_key_value_heads
    return [
        tp
        for tp in range(1, heads + 1)
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and (limit is None or tp <= limit)
    ]


def _kv_bytes_per_token(g: ModelGeometry, dtype_bytes: int, tp: int = 1) -> int:
    """K and V for every layer; per GPU when ``tp`` > 1 (KV heads split, or replicated to one per rank)."""
    return 2 * g.num_hidden_layers * max(1, g.num_key_value_heads // tp) * g.head_dim * dtype_bytes


def _reserve_bytes(g: ModelGeometry, tp: int) -> int:
    activations = _PREFILL_CHUNK_TOKENS * 3 * g.intermediate_size // tp * 2
    logits = _SAMPLED_SEQS * g.vocab_size * 4
    return _FIXED_RESERVE_BYTES + activations + logits


class _Fit:
    """Memory figures for one TP size on the GPU budget."""

    def __init__(self, g: ModelGeometry, tp: int, budget: float, kv_dtype_bytes: int, max_len: int) -> None:
        self.tp = tp
        self.weights = -(-g.param_count * g.dtype_bytes // tp)  # ceil
        free = int(budget - self.weights - _reserve_bytes(g, tp))
        per_token = _kv_bytes_per_token(g, kv_dtype_bytes, tp)
        self.tokens = max(0, free) // per_token // _KV_BLOCK_TOKENS * _KV_BLOCK_TOKENS
        self.weights_fit = free > 0
        self.sequences = self.tokens // max_len


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _fit_error(key: str, what: str, fit: _Fit, budget: float, max_len: int) -> PlanError:
    if not fit.weights_fit:
        why = (
            f"{_gib(fit.weights)} of weights per GPU at tensor_parallel_size {fit.tp} plus the activation "
            f"reserve exceed the {_gib(budget)} usable per GPU"
        )
    else:
        why = (
            f"tensor_parallel_size {fit.tp} leaves room for {fit.tokens} KV-cache tokens per replica, "
            f"less than one model.max_model_len sequence ({max_len})"
        )
    return PlanError(f"{key}: {what}: {why}")


def _is_flag(arg: str, flag: str) -> bool:
    """Whether ``arg`` is ``flag`` (``--flag`` or ``--flag=value``, ``_`` read as ``-``)."""
    return arg.replace("_", "-").split("=", 1)[0] == flag


def _owned_flag(arg: str) -> str | None:
    """The owned flag (``--host``, ``--port``) vLLM would read ``arg`` as, or None.

    vLLM's argparse accepts any unambiguous prefix of a long option (``--hos``, ``--po``), an
    ``=value`` suffix, ``_`` for ``-`` and JSON-dotted keys (``--host.x``), so the option name is cut at
    ``=``, ``.`` and ``+`` and every non-empty prefix of an owned flag is refused, ambiguous ones too.
    """
    if not arg.startswith("--") or len(arg) == 2:
        return None
    name = arg.replace("_", "-")
    for sep in "=.+":
        name = name.split(sep, 1)[0]
    if len(name) <= 2:
        return None
    return next((owned for owned in _OWNED_FLAGS if owned.startswith(name)), None)


def _check_extra_args(extra_args: list[str], planned: list[str]) -> list[str]:
    """Warnings for ``engine.extra_args``; raises :class:`PlanError` for an argument that would move the
    engine off ``127.0.0.1:engine.port``."""
    warnings: list[str] = []
    for arg in extra_args:
        owned = _owned_flag(arg)
        if owned is not None:
            as_owned = "" if arg.split("=", 1)[0] == owned else f" (vLLM reads it as {owned})"
            raise PlanError(
                f"engine.extra_args: {arg.split('=', 1)[0]} is not allowed{as_owned}: "
                f"the engine listens on {ENGINE_HOST}:engine.port only"
            )
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag in planned:
            warnings.append(f"engine.extra_args: {flag} overrides the planned value")
    return warnings


def build_plan(config: Config, *, gpu_visible: bool | None = None) -> Plan:
    """Plan the engine launch for ``config``; raises :class:`PlanError` when the request is impossible."""
    model, engine = config.model, config.engine
    warnings: list[str] = []

    local = config.resolve_path(model.source)
    is_local = local.is_dir()
    geometry = resolve_geometry(str(local) if is_local else model.source)
    vllm_model = str(local) if is_local else (geometry.hf_id or model.source)

    # --- device -------------------------------------------------------------------------------------------
    device: Literal["cuda", "cpu"] = "cpu" if engine.device == "cpu" else "cuda"
    if engine.device == "auto":
        device = "cpu" if gpu_visible is False else "cuda"
        if gpu_visible is None and not detect_gpu():
            warnings.append("engine.device auto: no GPU visible here; planned for cuda (`up` would run on cpu)")

    # --- context and YaRN -----------------------------------------------------------------------------------
    native = geometry.native_context
    max_len = model.max_model_len or native
    rope_scaling: dict[str, Any] | None = None
    if max_len > native:
        factor = max_len / native
        if factor > MAX_YARN_FACTOR:
            raise PlanError(
                f"model.max_model_len: {max_len} is {factor:.3g}x the native context {native} of {geometry.name}; "
                f"YaRN goes up to {MAX_YARN_FACTOR:g}x ({int(native * MAX_YARN_FACTOR)})"
            )
        rope_scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": native}
        warnings.append(
            f"model.max_model_len: {max_len} is above the native context {native}: static YaRN (factor "
            f"{factor:g}) scales every prompt, short ones too, which can lower quality on short texts; "
            f"use {native} unless prompts need more"
        )
    if max_len > geometry.max_validated_context:
        warnings.append(
            f"model.max_model_len: {max_len} is beyond the {geometry.max_validated_context} tokens "
            f"{geometry.name} is officially validated for (YaRN factor {max_len / native:g}); quality may degrade"
        )

    kv_dtype_bytes = 1 if engine.kv_cache_dtype.startswith("fp8") else geometry.dtype_bytes
    kv_per_token = _kv_bytes_per_token(geometry, kv_dtype_bytes)
    env: dict[str, str] = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(ENGINE_KEEP_ALIVE_S)}

    # --- parallelism and memory -----------------------------------------------------------------------------
    explicit_tp = engine.tensor_parallel_size if isinstance(engine.tensor_parallel_size, int) else None
    explicit_dp = engine.data_parallel_size if isinstance(engine.data_parallel_size, int) else None
    if explicit_tp is not None and explicit_tp not in valid_tensor_parallel_sizes(geometry):
        heads, kv_heads = geometry.num_attention_heads, geometry.num_key_value_heads
        why = (
            f"does not divide the {heads} attention heads"
            if heads % explicit_tp
            else f"neither divides nor is a multiple of the {kv_heads} KV heads"
        )
        raise PlanError(
            f"engine.tensor_parallel_size: {explicit_tp} {why} of {geometry.name} "
            f"(valid: {', '.join(map(str, valid_tensor_parallel_sizes(geometry)))})"
        )

    if device == "cpu":
        for key, value in (("tensor_parallel_size", explicit_tp), ("data_parallel_size", explicit_dp)):
            if value is not None and value > 1:
                warnings.append(f"engine.{key}: {value} ignored on cpu (runs 1)")
        tp = dp = 1
        kv_gib = max(1, int(engine.cpu_kv_cache_gib))
        if kv_gib != engine.cpu_kv_cache_gib:
            warnings.append(f"engine.cpu_kv_cache_gib: {engine.cpu_kv_cache_gib:g} rounded to {kv_gib} (whole GiB)")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        weights = geometry.param_count * geometry.dtype_bytes
        tokens = kv_gib * GIB // kv_per_token // _KV_BLOCK_TOKENS * _KV_BLOCK_TOKENS
        if tokens < max_len:
            raise PlanError(
                f"engine.cpu_kv_cache_gib: {kv_gib} GiB holds {tokens} KV-cache tokens, less than one "
                f"model.max_model_len sequence ({max_len}); raise it or lower model.max_model_len"
            )
    else:
        gpus = engine.gpus
        if engine.gpu_memory_gib is None:
            warnings.append(f"engine.gpu_memory_gib not set: assuming {DEFAULT_GPU_MEMORY_GIB:g} GiB per GPU")
        budget = (engine.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB) * GIB * engine.gpu_memory_utilization
        if explicit_tp is not None and explicit_dp is not None and explicit_tp * explicit_dp > gpus:
            raise PlanError(
                f"engine.data_parallel_size: tensor_parallel_size {explicit_tp} x data_parallel_size "
                f"{explicit_dp} = {explicit_tp * explicit_dp} GPUs, more than engine.gpus ({gpus})"
            )
        if explicit_tp is not None and explicit_tp > gpus:
            raise PlanError(f"engine.tensor_parallel_size: {explicit_tp} is more than engine.gpus ({gpus})")
        if explicit_dp is not None and explicit_dp > gpus:
            raise PlanError(f"engine.data_parallel_size: {explicit_dp} is more than engine.gpus ({gpus})")

        def fit(tp: int) -> _Fit:
            return _Fit(geometry, tp, budget, kv_dtype_bytes, max_len)

        if explicit_tp is not None:
            chosen = fit(explicit_tp)
            if chosen.sequences < 1:
                raise _fit_error("engine.tensor_parallel_size", f"{explicit_tp} does not fit", chosen, budget, max_len)
        else:
            per_replica = gpus // (explicit_dp or 1)
            candidates = [fit(tp) for tp in valid_tensor_parallel_sizes(geometry, limit=per_replica)]
            fitting = [c for c in candidates if c.sequences >= 1]
            if not fitting:
                key = "engine.gpus" if not candidates[-1].weights_fit else "model.max_model_len"
                what = f"{geometry.name} at {max_len} tokens does not fit on {per_replica} GPU(s) per replica"
                raise _fit_error(key, what, candidates[-1], budget, max_len)
            chosen = fitting[0]
        tp = chosen.tp
        dp = explicit_dp or gpus // tp
        weights, tokens = chosen.weights, chosen.tokens
        if tp * dp < gpus:
            warnings.append(f"engine.gpus: {gpus - tp * dp} of {gpus} GPUs unused (TP {tp} x DP {dp})")

    # --- vLLM argv ----------------------------------------------------------------------------------------
    args = [
        "--model", vllm_model,
        "--served-model-name", model.name,
        "--host", ENGINE_HOST,
        "--port", str(engine.port),
        "--max-model-len", str(max_len),
        "--tensor-parallel-size", str(tp),
    ]  # fmt: skip
    if model.revision:
        if is_local:
            warnings.append(f"model.revision: ignored, {model.source} is a local directory")
        else:
            args += ["--revision", model.revision]
            if not any(_is_flag(a, "--tokenizer") for a in engine.extra_args):
                args += ["--tokenizer-revision", model.revision]
    if dp > 1:
        args += ["--data-parallel-size", str(dp)]
    if device == "cuda":
        args += ["--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}"]
    else:
        # vllm-cpu 0.32's torch.compile path gives wrong tokens for SmolLM2 (checked against
        # transformers) and recompiles on every start; eager is correct and starts faster.
        args.append("--enforce-eager")
    if engine.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", engine.kv_cache_dtype]
    args.append("--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching")
    if engine.structured_outputs_backend != "auto":
        args += ["--structured-outputs-config", json.dumps({"backend": engine.structured_outputs_backend})]
    if model.tool_calling:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        if engine.structured_outputs_backend not in ("xgrammar", "auto"):
            # vLLM 0.32 enforces named/required tool choice with xgrammar-only structural tags
            # ("Invalid grammar specification: 'triggers'" on guidance); its JSON-schema path works
            # with every backend.
            env["VLLM_ENFORCE_STRICT_TOOL_CALLING"] = "0"
    if rope_scaling is not None:
        rope = dict(rope_scaling)
        if geometry.rope_theta is not None:
            rope["rope_theta"] = geometry.rope_theta
        args += ["--hf-overrides", json.dumps({"rope_scaling": rope, "max_position_embeddings": max_len})]
    warnings += _check_extra_args(engine.extra_args, args)
    args += engine.extra_args
    env.update(engine.env)

    return Plan(
        model=model.source,
        num_attention_heads=geometry.num_attention_heads,
        num_key_value_heads=geometry.num_key_value_heads,
        num_hidden_layers=geometry.num_hidden_layers,
        head_dim=geometry.head_dim,
        native_context=native,
        max_model_len=max_len,
        tensor_parallel_size=tp,
        data_parallel_size=dp,
        rope_scaling=rope_scaling,
        param_count=geometry.param_count,
        weights_bytes_per_gpu=weights,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_tokens_per_replica=tokens,
        max_full_context_sequences_per_replica=tokens // max_len,
        vllm_args=args,
        warnings=warnings,
        device=device,
        served_name=model.name,
        env=env,
        engine_port=engine.port,
    )

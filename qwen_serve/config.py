"""The qwen-serve YAML config as pydantic models (every key, its type and default; README "Configure").

``load_config(path)`` / ``parse_config(mapping)`` return a :class:`Config` or raise
:class:`~qwen_serve.errors.ConfigError` whose message names the key path, one line per problem
(``engine.gpus: must be a positive integer``). Unknown keys are errors. Nothing here reads files other
than the one it is given, and nothing reads the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, StrictInt, ValidationError,
                      ValidationInfo, field_validator)
from pydantic_core import PydanticCustomError

from qwen_serve.constants import DEFAULT_ENGINE_PORT, DEFAULT_GATEWAY_PORT
from qwen_serve.errors import ConfigError
from qwen_serve.yaml_errors import format_validation_error, format_yaml_error

__all__ = [
    "AuthConfig",
    "Config",
    "EngineConfig",
    "GatewayConfig",
    "GuidedConfig",
    "LimitsConfig",
    "ModelConfig",
    "MultimodalConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
]

Auto = Literal["auto"]
Port = int  # range-checked with Field below


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    """The model to serve and the name clients use for it. ``source`` is the only required key."""

    source: str = Field(min_length=1, examples=["Qwen/Qwen2.5-7B-Instruct"], description=(
        "Hugging Face id, bundled preset (qwen2.5-0.5b-instruct ... qwen2.5-72b-instruct, qwen2.5-vl-*) or "
        "local directory holding config.json (relative paths resolve next to the config file)"))
    served_name: str | None = Field(None, examples=["qwen2.5-7b-instruct"], description=(
        "The model name clients send and /v1/models lists (vLLM's --served-model-name); null: the source"))
    max_model_len: PositiveInt | None = Field(None, examples=[131072], description=(
        "Context length in tokens (prompt + answer). Above the model's native context (32768 for Qwen2.5) "
        "the plan adds YaRN rope scaling, factor max_model_len / native, at most 4. null: the native context"))
    tool_calling: bool = Field(True, description=(
        "Tool calling with Qwen's hermes parser (--enable-auto-tool-choice --tool-call-parser hermes)"))
    # Hugging Face revision (branch, tag or commit hash) of a hub model, passed to vLLM as --revision (and
    # --tokenizer-revision); a commit hash keeps every replica and restart on the same weights. null: the
    # repository's default branch at download time. Ignored for a local directory.
    revision: str | None = Field(None, examples=["a09a35458c702b33eeacc393d103063234e8bc28"])

    @property
    def name(self) -> str:
        """The model name clients send (``served_name``, else the source)."""
        return self.served_name or self.source


class EngineConfig(_Section):
    """The vLLM engine ``qwen-serve up`` plans and supervises on 127.0.0.1 (``qwen-serve plan`` shows the
    launch; ``qwen-serve gateway`` uses only ``port`` of this section)."""

    device: Literal["auto", "cuda", "cpu"] = Field("auto", examples=["cpu"], description=(
        "Where vLLM runs; auto: cuda when a GPU is visible (/dev/nvidia0, CUDA_VISIBLE_DEVICES not empty "
        "or -1), else cpu"))
    gpus: PositiveInt = Field(4, examples=[8], description="GPUs per node the engine may use; ignored on cpu")
    # GPU nodes one engine spans (each with `gpus` GPUs). Above 1: tensor parallel inside a node, pipeline
    # parallel across nodes, over Ray (the chart's multinode.nodes).
    nodes: PositiveInt = 1
    gpu_memory_gib: PositiveFloat | None = Field(None, examples=[80])  # per GPU; detected or assumed 80 when unset
    cpu_kv_cache_gib: PositiveFloat = Field(2, examples=[4], description=(
        "KV-cache size on cpu, in whole GiB (vLLM's VLLM_CPU_KVCACHE_SPACE); must hold one max_model_len sequence"))
    tensor_parallel_size: Union[Auto, PositiveInt] = Field("auto", examples=[4], description=(
        "GPUs one replica spans; must divide the attention heads. auto: the smallest that fits the weights and "
        "one max_model_len sequence. An impossible explicit value is an error, never changed silently"))
    data_parallel_size: Union[Auto, PositiveInt] = Field("auto", examples=[2], description=(
        "Engine replicas; auto: gpus // tensor_parallel_size. TP x DP must not exceed gpus"))
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, examples=[0.85], description=(
        "Share of each GPU's memory vLLM may use for weights, activations and KV cache"))
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field("auto", examples=["fp8"], description=(
        "KV-cache element type; fp8 halves the cache per token (twice the tokens) at some accuracy cost. "
        "auto: the model's dtype"))
    enable_prefix_caching: bool = Field(True, description=(
        "vLLM's automatic prefix caching (shared prompt prefixes are computed once)"))
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines", "lm-format-enforcer", "auto"] = Field(
        "guidance", examples=["xgrammar"], description="vLLM's guided-decoding backend; auto: vLLM chooses")
    port: Port = Field(DEFAULT_ENGINE_PORT, ge=1, le=65535, description=(
        "Engine port, always bound to 127.0.0.1 (never reachable from outside but through the gateway)"))
    startup_timeout_s: PositiveFloat = Field(1800, examples=[3600], description=(
        "Seconds the engine may take to answer /health after a (re)start (download, load, compile); "
        "past it the start fails"))
    restart: Literal["on-failure", "never"] = Field("on-failure", examples=["never"], description=(
        "on-failure: restart a crashed or hung engine with back-off (2, 4, 8, 16, then 30 s); never: "
        "qwen-serve up exits 1"))
    max_restarts: int = Field(5, ge=0, examples=[10], description=(
        "Restarts over the process's whole life (failed attempts count); then qwen-serve up exits 1"))
    # After the engine was ready once: an engine whose /health has failed (not merely slow while busy) for
    # this many seconds is restarted (counted toward max_restarts). null: never.
    unhealthy_restart_s: PositiveFloat | None = 120
    # Tokens per streamed SSE event (vLLM's --stream-interval): the first token still goes out at once, then
    # one event per this many tokens (and at the end). Above 1: fewer events for the gateway to relay (its
    # CPU per stream falls about N-fold), at the price of tokens reaching clients in bursts, N x the time per
    # token apart. 1: every token its own event (vLLM's default).
    stream_interval: PositiveInt = 1
    extra_args: list[str] = Field(default_factory=list, examples=[["--max-num-seqs", "128"]], description=(
        "Further vLLM arguments, appended to the planned ones (--host and --port are refused)"))
    env: dict[str, str] = Field(default_factory=dict, examples=[{"VLLM_LOGGING_LEVEL": "DEBUG"}], description=(
        "Extra environment variables for the engine process (they win over the planned ones)"))


class GatewayConfig(_Section):
    """The OpenAI-compatible HTTP gateway in front of the engine."""

    host: str = Field("0.0.0.0", examples=["127.0.0.1"], description="Address the gateway listens on")
    port: Port = Field(DEFAULT_GATEWAY_PORT, ge=1, le=65535, description="The gateway's HTTP port")
    # Largest request body accepted; a larger one is answered 413 request_too_large before it is read.
    max_request_bytes: PositiveInt = 8 * 1024 * 1024
    # Idle read timeout, not a total: the longest the engine may stay silent (before the response headers,
    # or between two reads of a stream) before the request fails with 504 (or a stream's error event).
    request_timeout_s: PositiveFloat = 600
    # Total deadline from the request's arrival (null: none): 504 before the response headers, else the
    # stream ends with an error event (code deadline_exceeded) and the engine's request is aborted.
    request_deadline_s: PositiveFloat | None = Field(None, examples=[900])
    connect_timeout_s: PositiveFloat = 5  # connecting to the engine; past it the request fails with 502
    drain_timeout_s: float = Field(600, ge=0)  # SIGTERM: how long in-flight streams may finish
    ui: bool = True  # serve the streaming chat page at /
    # The HTTP client to the engine. httptools (plain http:// only; other schemes use aiohttp): the least CPU
    # per streamed event; aiohttp, httpx: the earlier clients (benchmarks/RESULTS.md).
    upstream_client: Literal["httptools", "aiohttp", "httpx"] = "httptools"
    log_requests: bool = False  # never logs prompts or keys, only method/path/status
    # A second listener on ``host`` serving only /metrics and /metrics/engine; the main port then answers
    # 404 there. null: both are served on the main port.
    metrics_port: StrictInt | None = Field(None, ge=1, le=65535, examples=[9090])  # strict: `true` is not a port
    # The engine's /metrics text is fetched at most once per this many seconds (concurrent scrapes share
    # one fetch); 0: every scrape fetches it.
    engine_metrics_cache_s: float = Field(1.0, ge=0)
    # A request whose request line and headers exceed this many bytes is answered 431 and closed.
    max_header_bytes: PositiveInt = 64 * 1024
    # From a connection's first byte of a request (or its opening) to the end of the headers; past it:
    # 408 and the connection is closed (a client that trickles headers holds nothing for long).
    header_timeout_s: PositiveFloat = 10
    # From the end of the headers to the end of the body; past it: 408 and the connection is closed.
    body_timeout_s: PositiveFloat = 60
    # An idle keep-alive connection is closed after this many seconds.
    keep_alive_timeout_s: PositiveFloat = 75
    # Gateway processes serving `port` (and `metrics_port`) together (SO_REUSEPORT), each with its own
    # engine connections; rate limits and metrics are shared between them. auto: enough for the planned
    # engine's token rate, at least 1, at most the CPUs this process may use (1 for `qwen-serve gateway`,
    # whose engine is not planned). 1: one process, as before workers existed.
    workers: Union[Auto, PositiveInt] = "auto"
    responses_store: bool = Field(False, examples=[True], description=(
        "Stored responses of the Responses API (store, previous_response_id, GET/DELETE /v1/responses/{id}). vLLM "
        "keeps them in one engine's memory: single replica only (the plan then starts the engine "
        "with VLLM_ENABLE_RESPONSES_API_STORE=1). false: store is forced off, previous_response_id is "
        "refused with 400 and those routes answer 404"))

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A port other than ``gateway.port`` (one socket cannot serve both apps)."""
        if value is not None and value == info.data.get("port"):
            raise PydanticCustomError("metrics_port_clash", "must differ from gateway.port")
        return value


class AuthConfig(_Section):
    """API keys: who may call the gateway, which models they may use, their rate limits."""

    enabled: bool = Field(True, examples=[False], description=(
        "Require an API key on /v1/* and /tokenize, /detokenize; false: every caller is 'anonymous', unlimited"))
    keys_file: str = Field("keys.yaml", examples=["/etc/qwen-serve/keys/keys.yaml"], description=(
        "The keys file (qwen-serve keys create|rotate|revoke|list), relative to the config file; it must exist "
        "and be valid at start-up"))
    reload_interval_s: PositiveFloat = Field(2, examples=[5], description=(
        "Seconds between checks of the keys file; a changed file is re-read, a broken one keeps the last good keys"))


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class LimitsConfig(_Section):
    """Where the per-key rpm/tpm/concurrency state lives (``gateway.limits.build_limiter`` reads it).

    ``local``: in the gateway process (limits apply per replica). ``redis``: shared by every replica at
    ``redis_url`` (needs the ``redis`` extra: ``pip install 'qwen-serve[redis]'``).
    ``on_backend_error``: what a shared backend does when its store cannot be reached: ``fail_closed``
    refuses the request (503), ``fail_open`` admits it unmetered. ``local`` never fails.
    """

    backend: Literal["local", "redis"] = Field("local", examples=["redis"], description=(
        "local: counters in each gateway process (N replicas admit up to N x a key's limits); redis: shared"))
    redis_url: str | None = Field(None, validate_default=True, examples=["redis://redis:6379/0"], description=(
        "redis://, rediss:// or unix:// URL of the shared store; required with backend: redis"))
    on_backend_error: Literal["fail_closed", "fail_open"] = Field("fail_closed", examples=["fail_open"], description=(
        "When the shared store cannot be reached: fail_closed answers 503, fail_open admits the request unmetered"))

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A redis URL when given; required with ``backend: redis``."""
        if value is None:
            if info.data.get("backend") == "redis":
                raise PydanticCustomError("redis_url_missing", "required when limits.backend is redis")
            return None
        if not value.startswith(_REDIS_SCHEMES) or len(value) <= value.index("//") + 2:
            raise PydanticCustomError("redis_url", "must be a redis://, rediss:// or unix:// URL")
        return value


class GuidedConfig(_Section):
    """Guided decoding: translation of the request fields, checks of the answers, and the bounds a
    request's constraint must stay within (checked before any other work; past one: 400 naming the field)."""

    validate_output: bool = Field(True, examples=[False], description=(
        "Check a finished guided JSON answer against its schema; the verdict is the X-Guided-Output header"))
    legacy_fields: Literal["translate", "reject"] = Field("translate", examples=["reject"], description=(
        "guided_json, guided_regex, guided_choice, guided_grammar: translate to structured_outputs, or reject (400)"))
    max_schema_bytes: PositiveInt = 256 * 1024  # a JSON schema, as compact JSON
    max_schema_depth: PositiveInt = 64  # nesting of objects/arrays in a schema
    max_schema_properties: PositiveInt = 4096  # property names across the whole schema
    max_choices: PositiveInt = 1024  # strings in a guided choice
    max_choice_bytes: PositiveInt = 64 * 1024  # their total UTF-8 bytes
    max_pattern_bytes: PositiveInt = 8 * 1024  # a guided regex, or one schema ``pattern``
    max_grammar_bytes: PositiveInt = 64 * 1024  # a guided grammar


class MultimodalConfig(_Section):
    """Image inputs of a vision-language model (``gateway.multimodal`` checks requests against it; the plan
    passes the per-request count and the pixel cap to vLLM). Ignored for a text-only model, which refuses
    image parts whatever this says."""

    max_images_per_request: PositiveInt = Field(4, examples=[8], description=(
        "Most image parts one request may carry (vLLM's --limit-mm-per-prompt); more: 400"))
    max_image_bytes: PositiveInt = Field(10 * 1024 * 1024, examples=[5242880], description=(
        "Largest decoded size of one image (a data: URL, or a fetched remote image); larger: 400"))
    url_allowlist: list[str] = Field(default_factory=list, examples=[["images.example.com", "*.cdn.example.com"]],
                                     description=(
        "Hosts remote http(s) image URLs may name (exact host, or *.suffix for its subdomains); the gateway "
        "fetches them itself, never from private, loopback or link-local addresses. Empty: data: URLs only"))
    max_image_pixels: int = Field(1280 * 28 * 28, ge=56 * 56, examples=[602112], description=(
        "Images are downscaled to at most this many pixels before the vision tower (vLLM's "
        "--mm-processor-kwargs max_pixels); 28 x 28 pixels make one image token, so the default caps an image "
        "at 1280 tokens"))
    fetch_timeout_s: PositiveFloat = Field(10, examples=[5], description=(
        "Total time allowed to fetch one remote image (connect, redirects refused, body)"))

    @field_validator("url_allowlist")
    @classmethod
    def _allowlist(cls, value: list[str]) -> list[str]:
        """Lower-case host names or ``*.suffix`` patterns; no schemes, paths, ports or bare ``*``."""
        out = []
        for entry in value:
            host = entry.strip().lower().rstrip(".")
            bare = host.removeprefix("*.")
            if not bare or "*" in bare or any(c in bare for c in "/:@ ?#[]"):
                raise PydanticCustomError("host_pattern", "entries must be host names or *.suffix patterns")
            out.append(host)
        return out


class Config(_Section):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig())
    gateway: GatewayConfig = Field(default_factory=lambda: GatewayConfig())
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig())
    guided: GuidedConfig = Field(default_factory=lambda: GuidedConfig())
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    multimodal: MultimodalConfig = Field(default_factory=lambda: MultimodalConfig())
    base_dir: Path | None = Field(default=None, exclude=True, description="directory relative paths resolve in")

    def resolve_path(self, value: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(value).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p


def parse_config(data: Any, *, base_dir: Path | None = None) -> Config:
    """Validate a mapping (already parsed YAML) into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError("config: top level must be a mapping")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    cfg.base_dir = base_dir
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"engine.gpus": 2}``) in a parsed-YAML mapping; ``None`` values are skipped."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file; relative paths inside resolve next to it.

    ``overrides`` (dotted keys, e.g. from CLI flags) are applied before validation, so their errors
    name the same key paths as the file's.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(format_yaml_error(exc, str(p))) from None
    data = data if data is not None else {}
    if overrides and isinstance(data, dict):
        apply_overrides(data, overrides)
    return parse_config(data, base_dir=p.resolve().parent)

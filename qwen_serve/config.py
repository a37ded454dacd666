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

__all__ = [
    "AuthConfig",
    "Config",
    "EngineConfig",
    "GatewayConfig",
    "GuidedConfig",
    "LimitsConfig",
    "ModelConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
]

Auto = Literal["auto"]
Port = int  # range-checked with Field below


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    source: str = Field(min_length=1, description="Hugging Face id, bundled preset or local directory")
    served_name: str | None = None
    max_model_len: PositiveInt | None = None
    tool_calling: bool = True
    # Hugging Face revision (branch, tag or commit hash) of a hub model, passed to vLLM as --revision (and
    # --tokenizer-revision); a commit hash keeps every replica and restart on the same weights. null: the
    # repository's default branch at download time. Ignored for a local directory.
    revision: str | None = None

    @property
    def name(self) -> str:
        """The model name clients send (``served_name``, else the source)."""
        return self.served_name or self.source


class EngineConfig(_Section):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpus: PositiveInt = 4
    # GPU nodes one engine spans (each with `gpus` GPUs). Above 1: tensor parallel inside a node, pipeline
    # parallel across nodes, over Ray (the chart's multinode.nodes).
    nodes: PositiveInt = 1
    gpu_memory_gib: PositiveFloat | None = None  # per GPU; detected or assumed 80 when unset
    cpu_kv_cache_gib: PositiveFloat = 2
    tensor_parallel_size: Union[Auto, PositiveInt] = "auto"
    data_parallel_size: Union[Auto, PositiveInt] = "auto"
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    enable_prefix_caching: bool = True
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines", "lm-format-enforcer", "auto"] = "guidance"
    port: Port = Field(DEFAULT_ENGINE_PORT, ge=1, le=65535)
    startup_timeout_s: PositiveFloat = 1800
    restart: Literal["on-failure", "never"] = "on-failure"
    max_restarts: int = Field(5, ge=0)
    # After the engine was ready once: an engine whose /health has failed (not merely slow while busy) for
    # this many seconds is restarted (counted toward max_restarts). null: never.
    unhealthy_restart_s: PositiveFloat | None = 120
    # Tokens per streamed SSE event (vLLM's --stream-interval): the first token still goes out at once, then
    # one event per this many tokens (and at the end). Above 1: fewer events for the gateway to relay (its
    # CPU per stream falls about N-fold), at the price of tokens reaching clients in bursts, N x the time per
    # token apart. 1: every token its own event (vLLM's default).
    stream_interval: PositiveInt = 1
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class GatewayConfig(_Section):
    host: str = "0.0.0.0"
    port: Port = Field(DEFAULT_GATEWAY_PORT, ge=1, le=65535)
    max_request_bytes: PositiveInt = 8 * 1024 * 1024
    # Idle read timeout, not a total: the longest the engine may stay silent (before the response headers,
    # or between two reads of a stream) before the request fails with 504 (or a stream's error event).
    request_timeout_s: PositiveFloat = 600
    # Total deadline from the request's arrival (null: none): 504 before the response headers, else the
    # stream ends with an error event (code deadline_exceeded) and the engine's request is aborted.
    request_deadline_s: PositiveFloat | None = None
    connect_timeout_s: PositiveFloat = 5
    drain_timeout_s: float = Field(600, ge=0)  # SIGTERM: how long in-flight streams may finish
    ui: bool = True
    # The HTTP client to the engine. httptools (plain http:// only; other schemes use aiohttp): the least CPU
    # per streamed event; aiohttp, httpx: the earlier clients (benchmarks/RESULTS.md).
    upstream_client: Literal["httptools", "aiohttp", "httpx"] = "httptools"
    log_requests: bool = False  # never logs prompts or keys, only method/path/status
    # A second listener on ``host`` serving only /metrics and /metrics/engine; the main port then answers
    # 404 there. null: both are served on the main port.
    metrics_port: StrictInt | None = Field(None, ge=1, le=65535)  # strict: `true` is not a port
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

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A port other than ``gateway.port`` (one socket cannot serve both apps)."""
        if value is not None and value == info.data.get("port"):
            raise PydanticCustomError("metrics_port_clash", "must differ from gateway.port")
        return value


class AuthConfig(_Section):
    enabled: bool = True
    keys_file: str = "keys.yaml"
    reload_interval_s: PositiveFloat = 2


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class LimitsConfig(_Section):
    """Where the per-key rpm/tpm/concurrency state lives (``gateway.limits.build_limiter`` reads it).

    ``local``: in the gateway process (limits apply per replica). ``redis``: shared by every replica at
    ``redis_url`` (needs the ``redis`` extra: ``pip install 'qwen-serve[redis]'``).
    ``on_backend_error``: what a shared backend does when its store cannot be reached: ``fail_closed``
    refuses the request (503), ``fail_open`` admits it unmetered. ``local`` never fails.
    """

    backend: Literal["local", "redis"] = "local"
    redis_url: str | None = Field(None, validate_default=True)
    on_backend_error: Literal["fail_closed", "fail_open"] = "fail_closed"

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

    validate_output: bool = True
    legacy_fields: Literal["translate", "reject"] = "translate"
    max_schema_bytes: PositiveInt = 256 * 1024  # a JSON schema, as compact JSON
    max_schema_depth: PositiveInt = 64  # nesting of objects/arrays in a schema
    max_schema_properties: PositiveInt = 4096  # property names across the whole schema
    max_choices: PositiveInt = 1024  # strings in a guided choice
    max_choice_bytes: PositiveInt = 64 * 1024  # their total UTF-8 bytes
    max_pattern_bytes: PositiveInt = 8 * 1024  # a guided regex, or one schema ``pattern``
    max_grammar_bytes: PositiveInt = 64 * 1024  # a guided grammar


class Config(_Section):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig())
    gateway: GatewayConfig = Field(default_factory=lambda: GatewayConfig())
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig())
    guided: GuidedConfig = Field(default_factory=lambda: GuidedConfig())
    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig())
    base_dir: Path | None = Field(default=None, exclude=True, description="directory relative paths resolve in")

    def resolve_path(self, value: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(value).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p


_TYPE_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "greater_than" and ctx.get("gt") == 0:
        return "must be a positive integer" if isinstance(err.get("input"), int) else "must be positive"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter(ctx.values()), "?")
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        return f"must be {op} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    return _TYPE_MESSAGES.get(kind, str(err.get("msg", kind)).lower())


def _loc(err: dict[str, Any]) -> str:
    # Union members show up as extra path elements ("literal['auto']", "int"); drop them.
    def is_union_member(p: object) -> bool:
        return isinstance(p, str) and ("[" in p or p in ("int", "str", "float") or p.startswith("constrained-"))

    parts = [str(p) for p in err["loc"] if not is_union_member(p)]
    return ".".join(parts) or "<root>"


def format_validation_error(exc: ValidationError) -> str:
    """One ``path: problem`` line per error, unions collapsed to one line per path."""
    lines: dict[str, str] = {}
    for err in exc.errors():
        path = _loc(err)  # type: ignore[arg-type]
        msg = _message(err)  # type: ignore[arg-type]
        if path in lines and "one of" in lines[path]:
            lines[path] = f"{lines[path]} or {msg.removeprefix('must be ')}"
        elif path in lines and "auto" not in lines[path] and err["type"] != "literal_error":
            continue
        else:
            lines.setdefault(path, msg)
    return "; ".join(f"{p}: {m}" for p, m in lines.items())


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
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    data = data if data is not None else {}
    if overrides and isinstance(data, dict):
        apply_overrides(data, overrides)
    return parse_config(data, base_dir=p.resolve().parent)

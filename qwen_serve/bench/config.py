"""The settings of one load, as a pydantic model: CLI flags and scenario files both end up here.

:class:`RunConfig` is the validated form of ``qwen-serve bench run`` (and of each point of a sweep or
target of a compare). Field names are the CLI flags with ``_`` for ``-``; a scenario YAML file holds any
of them (``load_scenario``), and flags given on the command line win. Validation errors name the field
(``rate: must be positive or 'inf'``) and are raised as :class:`BenchConfigError`.

The API key is ``api_key``, or the stripped content of ``api_key_file`` (``~`` expanded; read when the
config is built, so a missing, unreadable or empty file is an error naming ``api_key_file``). When both
are set, ``api_key`` wins and the file is not read. Neither is read from the environment. ``public()``
(what ``result.json`` stores) leaves the key out; ``api_key_file`` there is the path, never its content.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qwen_serve.bench.stats import parse_slo
from qwen_serve.yaml_errors import format_validation_error, format_yaml_error

__all__ = ["RunConfig", "BenchConfigError", "BenchError", "load_scenario", "read_key_file", "WORKLOADS"]

WORKLOADS = ("random", "sharegpt", "long-context", "json-schema", "multi-turn", "tools")


class BenchConfigError(ValueError):
    """A bad flag or scenario value; the message names the field."""


class BenchError(RuntimeError):
    """A run that cannot go on for a reason the message states in one line (exit 1, no traceback)."""


class RunConfig(BaseModel):
    """One load against one target."""

    model_config = ConfigDict(extra="forbid")

    url: str
    model: str
    api_key: str | None = None
    api_key_file: str | None = None
    workload: str = "random"
    api: Literal["chat", "responses"] = "chat"  # the OpenAI API the requests use (bench.apis)
    input_len: int | None = Field(default=None, ge=1)
    output_len: int = Field(default=128, ge=1)
    rate: float = math.inf
    burstiness: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    arrival: Literal["constant", "poisson", "gamma"] | None = None
    concurrency: int | None = Field(default=None, ge=1)
    duration: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    num_requests: int | None = Field(default=None, ge=1)
    warmup: int = Field(default=0, ge=0)
    ramp_up: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    slo: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = Field(default=0.0, ge=0)
    tokenizer: Literal["server", "estimate"] = "server"
    timeout: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    label: str | None = None
    pool_size: int = Field(default=512, ge=1)
    turns: int = Field(default=4, ge=1)
    shared_prefix_len: int | None = Field(default=None, ge=0)
    max_model_len: int | None = Field(default=None, ge=16)
    engine_metrics: bool = True
    metrics_url: str | None = None
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)
    prometheus_host: str = "127.0.0.1"
    progress: bool = True

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("inf", "infinity"):
            return math.inf
        return v

    @field_validator("rate")
    @classmethod
    def _rate_positive(cls, v: float) -> float:
        if math.isnan(v) or not v > 0:
            raise ValueError("must be positive or 'inf'")
        return v

    @field_validator("slo", mode="before")
    @classmethod
    def _slo(cls, v: Any) -> Any:
        return parse_slo(v) if isinstance(v, str) or v is None else v

    @field_validator("workload")
    @classmethod
    def _workload(cls, v: str) -> str:
        name, _, path = v.partition(":")
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload '{v}' (one of: random, sharegpt:FILE, long-context, "
                             "json-schema, multi-turn, tools)")
        if name == "sharegpt" and not path:
            raise ValueError("sharegpt needs a file: --workload sharegpt:FILE")
        return v

    @model_validator(mode="after")
    def _key_from_file(self) -> RunConfig:
        if self.api_key is None and self.api_key_file is not None:
            self.api_key = read_key_file(self.api_key_file)
        return self

    @model_validator(mode="after")
    def _bounds(self) -> RunConfig:
        if self.duration is None and self.num_requests is None:
            raise ValueError("give --duration S or --num-requests N")
        if math.isinf(self.rate) and self.concurrency is None and self.num_requests is None:
            raise ValueError("--rate inf with --duration needs --concurrency (otherwise the load is unbounded)")
        return self

    @property
    def workload_name(self) -> str:
        return self.workload.partition(":")[0]

    @property
    def workload_path(self) -> str | None:
        return self.workload.partition(":")[2] or None

    @property
    def closed_loop(self) -> bool:
        """``--rate inf`` with a concurrency cap: each slot sends its next request when its last ends."""
        return math.isinf(self.rate) and self.concurrency is not None

    def public(self) -> dict[str, Any]:
        """The settings for ``result.json`` (the API key left out)."""
        d = self.model_dump()
        d.pop("api_key")
        d["rate"] = "inf" if math.isinf(self.rate) else self.rate
        return d


def read_key_file(path: str) -> str:
    """The stripped content of ``path`` (``~`` expanded); ValueError naming ``api_key_file`` otherwise."""
    p = Path(path).expanduser()
    try:
        key = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"api_key_file: cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"api_key_file: {p} is not UTF-8 text") from None
    if not key:
        raise ValueError(f"api_key_file: {p} is empty")
    return key


def build(values: dict[str, Any]) -> RunConfig:
    """``RunConfig`` from a dict, errors turned into one :class:`BenchConfigError` naming each field."""
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise BenchConfigError(format_validation_error(exc)) from None


def load_scenario(path: str | Path) -> dict[str, Any]:
    """The settings of a scenario YAML file (a mapping of flag names; ``-`` or ``_`` both accepted)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise BenchConfigError(f"scenario: cannot read {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BenchConfigError(format_yaml_error(exc, f"scenario: {p}")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchConfigError(f"scenario: {p} must be a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}

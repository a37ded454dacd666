"""Model geometry: the handful of numbers the launch planner needs, for bundled presets and local models.

Called by :mod:`qwen_serve.plan` (and the CLI's ``plan --model``). ``resolve_geometry(source)`` returns a
:class:`ModelGeometry` for

* a local directory holding a Qwen2/Llama-style ``config.json``,
* a bundled preset name (``qwen2.5-7b-instruct``), or
* a Hugging Face id of a bundled preset (``Qwen/Qwen2.5-7B-Instruct``, any case),

and raises :class:`~qwen_serve.errors.PlanError` naming ``model.source`` for anything else. It reads at most
one ``config.json``; it never touches the network or the environment, so planning works offline.

The preset numbers are copied from the ``config.json`` files Qwen publishes for the Qwen2.5 instruct models.
Their ``max_position_embeddings`` is 32768; Qwen validates the 7B and larger models up to 131072 tokens with
YaRN (factor 4), the smaller ones only up to 32768.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_serve.errors import PlanError

__all__ = ["PRESETS", "ModelGeometry", "resolve_geometry"]

_QWEN_ROPE_THETA = 1_000_000.0


@dataclass(frozen=True)
class ModelGeometry:
    """Shape of a decoder-only transformer, as far as memory planning cares."""

    name: str
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    hidden_size: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    native_context: int  # max_position_embeddings as shipped
    tie_word_embeddings: bool
    dtype_bytes: int = 2  # bytes per weight as vLLM loads it (float32 checkpoints are downcast to 16 bit)
    validated_context: int | None = None  # longest context the vendor validated (with YaRN); None: native
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not
    rope_theta: float | None = _QWEN_ROPE_THETA
    hf_id: str | None = None  # what vLLM's --model gets for a preset

    @property
    def param_count(self) -> int:
        """Parameters computed from the geometry (embeddings, attention, SwiGLU MLP, RMSNorms, lm_head)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attention + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + h

    @property
    def max_validated_context(self) -> int:
        return self.validated_context or self.native_context


def _qwen25(size: str, heads: int, kv: int, layers: int, hidden: int, inter: int, *, large: bool) -> ModelGeometry:
    return ModelGeometry(
        name=f"qwen2.5-{size}-instruct",
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=layers,
        hidden_size=hidden,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=152064 if large else 151936,
        native_context=32768,
        tie_word_embeddings=not large,
        validated_context=131072 if large else 32768,
        hf_id=f"Qwen/Qwen2.5-{size.upper()}-Instruct",
    )


PRESETS: dict[str, ModelGeometry] = {
    g.name: g
    for g in (
        _qwen25("0.5b", 14, 2, 24, 896, 4864, large=False),
        _qwen25("1.5b", 12, 2, 28, 1536, 8960, large=False),
        _qwen25("3b", 16, 2, 36, 2048, 11008, large=False),
        _qwen25("7b", 28, 4, 28, 3584, 18944, large=True),
        _qwen25("14b", 40, 8, 48, 5120, 13824, large=True),
        _qwen25("32b", 40, 8, 64, 5120, 27648, large=True),
        _qwen25("72b", 64, 8, 80, 8192, 29568, large=True),
    )
}

_DTYPE_BYTES = {"float32": 2, "float": 2, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1}


def _shape(g: ModelGeometry) -> tuple[int, ...]:
    return (g.num_attention_heads, g.num_key_value_heads, g.num_hidden_layers, g.hidden_size, g.vocab_size)


def _from_config_json(path: Path, source: str) -> ModelGeometry:
    try:
        cfg: Any = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"model.source: cannot read {path / 'config.json'} ({exc})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        geometry = ModelGeometry(
            name=path.name or source,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            native_context=int(cfg.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=_DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_theta=cfg.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"model.source: {path / 'config.json'} lacks a usable {exc} for planning") from None
    # A local copy of a bundled model keeps the vendor's validated context.
    for preset in PRESETS.values():
        if _shape(preset) == _shape(geometry):
            return replace(geometry, validated_context=preset.validated_context)
    return geometry


def resolve_geometry(source: str) -> ModelGeometry:
    """Geometry for a local model directory, a preset name or a preset's Hugging Face id.

    Raises :class:`PlanError` (``model.source: ...``) when the source is none of these.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_config_json(path, source)
    key = source.strip().lower().removeprefix("qwen/")
    if key in PRESETS:
        return PRESETS[key]
    raise PlanError(
        f"model.source: unknown model {source!r}: not a local directory with config.json, "
        f"nor a bundled preset ({', '.join(PRESETS)}) or its Hugging Face id"
    )

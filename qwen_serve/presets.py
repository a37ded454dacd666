"""Model geometry: the handful of numbers the launch planner needs, for bundled presets and local models.

Called by :mod:`qwen_serve.plan` (and the CLI's ``plan --model``). ``resolve_geometry(source)`` returns a
:class:`ModelGeometry` for

* a local directory holding a Qwen2/Llama-style ``config.json`` (with a ``vision_config``: a
  vision-language model, its vision tower counted too),
* a bundled preset name (``qwen2.5-7b-instruct``, ``qwen2.5-vl-7b-instruct``), or
* a Hugging Face id of a bundled preset (``Qwen/Qwen2.5-7B-Instruct``, ``Qwen/Qwen2.5-VL-7B-Instruct``, any
  case),

and raises :class:`~qwen_serve.errors.PlanError` naming ``model.source`` for anything else. It reads at most
one ``config.json``; it never touches the network or the environment, so planning works offline.

The preset numbers are copied from the ``config.json`` files Qwen publishes for the Qwen2.5 instruct models.
Their ``max_position_embeddings`` is 32768; Qwen validates the 7B and larger models up to 131072 tokens with
YaRN (factor 4), the smaller ones only up to 32768.

The vision-language presets (:data:`VISION_PRESETS`, kept apart from the text-only :data:`PRESETS`) are
Qwen2.5-VL 3B, 7B and 72B Instruct. Their numbers come from the ``config.json`` files Qwen publishes for
``Qwen/Qwen2.5-VL-{3B,7B,72B}-Instruct``: the text part is the Qwen2.5 model of the same size (3B: 16 heads,
2 KV heads, 36 layers, hidden 2048, intermediate 11008, vocabulary 151936, tied embeddings; 7B and 72B as
Qwen2.5-7B/72B), M-RoPE sections ``[16, 24, 24]``; the vision tower is the same for all three (``depth`` 32,
``hidden_size`` 1280, ``intermediate_size`` 3420, ``num_heads`` 16, ``patch_size`` 14,
``temporal_patch_size`` 2, ``spatial_merge_size`` 2; ``out_hidden_size`` = the text width), ~0.67-0.70 B
parameters, counted in the weights. Their config ships ``max_position_embeddings`` 128000, but Qwen's model
card says it "is set for context length up to 32,768 tokens" and that YaRN beyond that "has a significant
impact on the performance of temporal and spatial localization tasks", so the planner takes 32768 as their
native and validated context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_serve.errors import PlanError

__all__ = ["PRESETS", "VISION_PRESETS", "ModelGeometry", "VisionGeometry", "resolve_geometry"]

_QWEN_ROPE_THETA = 1_000_000.0


@dataclass(frozen=True)
class VisionGeometry:
    """Shape of a Qwen2-VL / Qwen2.5-VL vision tower (ViT + patch merger), for its weights and image tokens.

    ``gated``: Qwen2.5-VL (SwiGLU MLP with biases, RMSNorm); not gated: Qwen2-VL (fc1/fc2 MLP, LayerNorm).
    """

    depth: int
    hidden_size: int  # the ViT's width (Qwen2-VL calls it embed_dim)
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the merger's output: the text model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    gated: bool = True

    @property
    def param_count(self) -> int:
        """Patch embedding (a bias-free Conv3d), the blocks (two norms, fused qkv, projection, MLP, all linear
        layers with biases) and the merger (a norm and a two-layer MLP over ``spatial_merge_size``² patches)."""
        w, i = self.hidden_size, self.intermediate_size
        norm = w if self.gated else 2 * w  # RMSNorm: weight; LayerNorm: weight and bias
        patch_embed = self.in_channels * self.temporal_patch_size * self.patch_size**2 * w
        mlp = (2 * (w * i + i) + i * w + w) if self.gated else (w * i + i + i * w + w)
        block = 2 * norm + (w * 3 * w + 3 * w) + (w * w + w) + mlp
        merged = w * self.spatial_merge_size**2
        merger = norm + (merged * merged + merged) + (merged * self.out_hidden_size + self.out_hidden_size)
        return patch_embed + self.depth * block + merger

    def tokens_per_image(self, pixels: int) -> int:
        """Image tokens (after the merge) for an image of at most ``pixels`` pixels."""
        side = self.patch_size * self.spatial_merge_size
        return max(1, pixels // (side * side))


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
    vision: VisionGeometry | None = None  # a vision-language model's vision tower; None: text only
    mrope_section: tuple[int, ...] | None = None  # M-RoPE split of the rotary dims (Qwen2-VL family)

    @property
    def accepts_images(self) -> bool:
        """Whether the model takes image inputs (it has a vision tower)."""
        return self.vision is not None

    @property
    def vision_param_count(self) -> int:
        return self.vision.param_count if self.vision is not None else 0

    @property
    def param_count(self) -> int:
        """All parameters: the text model's and the vision tower's."""
        return self.text_param_count + self.vision_param_count

    @property
    def text_param_count(self) -> int:
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

# Qwen2.5-VL's vision tower, the same for 3B, 7B and 72B (vision_config of the published config.json files).
def _qwen25_vl(size: str, text: ModelGeometry) -> ModelGeometry:
    vision = VisionGeometry(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            out_hidden_size=text.hidden_size)
    return replace(text, name=f"qwen2.5-vl-{size}-instruct", hf_id=f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct",
                   vision=vision, mrope_section=(16, 24, 24), validated_context=32768)


VISION_PRESETS: dict[str, ModelGeometry] = {
    g.name: g
    for g in (
        _qwen25_vl("3b", PRESETS["qwen2.5-3b-instruct"]),
        _qwen25_vl("7b", PRESETS["qwen2.5-7b-instruct"]),
        _qwen25_vl("72b", PRESETS["qwen2.5-72b-instruct"]),
    )
}
_ALL_PRESETS = {**PRESETS, **VISION_PRESETS}

_DTYPE_BYTES = {"float32": 2, "float": 2, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1}


def _shape(g: ModelGeometry) -> tuple[int, ...]:
    return (g.num_attention_heads, g.num_key_value_heads, g.num_hidden_layers, g.hidden_size, g.vocab_size,
            g.vision is not None)


def _vision(top: dict[str, Any], text_hidden: int) -> VisionGeometry | None:
    """The vision tower of a ``config.json`` with a ``vision_config`` (Qwen2.5-VL or Qwen2-VL keys)."""
    vc: dict[str, Any] | None = top.get("vision_config")
    if not isinstance(vc, dict):
        return None
    if "embed_dim" in vc:  # Qwen2-VL: embed_dim is the width, hidden_size the merger's output
        width = int(vc["embed_dim"])
        return VisionGeometry(depth=int(vc["depth"]), hidden_size=width,
                              intermediate_size=int(width * float(vc.get("mlp_ratio", 4))),
                              num_heads=int(vc["num_heads"]), out_hidden_size=int(vc.get("hidden_size") or text_hidden),
                              patch_size=int(vc.get("patch_size", 14)),
                              temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
                              spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                              in_channels=int(vc.get("in_channels") or vc.get("in_chans") or 3), gated=False)
    return VisionGeometry(depth=int(vc["depth"]), hidden_size=int(vc["hidden_size"]),
                          intermediate_size=int(vc["intermediate_size"]), num_heads=int(vc["num_heads"]),
                          out_hidden_size=int(vc.get("out_hidden_size") or text_hidden),
                          patch_size=int(vc.get("patch_size", 14)),
                          temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
                          spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                          in_channels=int(vc.get("in_channels") or vc.get("in_chans") or 3))


def _from_config_json(path: Path, source: str) -> ModelGeometry:
    try:
        cfg: Any = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"model.source: cannot read {path / 'config.json'} ({exc})") from None
    top = cfg if isinstance(cfg, dict) else {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or top.get("rope_scaling") or {}
        mrope = rope.get("mrope_section") if isinstance(rope, dict) else None
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
            qkv_bias=str(cfg.get("model_type") or top.get("model_type") or "").startswith("qwen2")
            or bool(cfg.get("attention_bias", False)),
            rope_theta=cfg.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None)
            or top.get("rope_theta"),
            vision=_vision(top, hidden),
            mrope_section=tuple(int(x) for x in mrope) if isinstance(mrope, list) else None,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise PlanError(f"model.source: {path / 'config.json'} lacks a usable {exc} for planning") from None
    # A local copy of a bundled model keeps the vendor's validated context (and, for Qwen2.5-VL, whose
    # config.json says 128000, the 32768 its model card gives as the context without YaRN).
    for preset in _ALL_PRESETS.values():
        if _shape(preset) == _shape(geometry):
            return replace(geometry, validated_context=preset.validated_context,
                           native_context=min(geometry.native_context, preset.native_context))
    return geometry


def resolve_geometry(source: str) -> ModelGeometry:
    """Geometry for a local model directory, a preset name or a preset's Hugging Face id.

    Raises :class:`PlanError` (``model.source: ...``) when the source is none of these.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_config_json(path, source)
    key = source.strip().lower().removeprefix("qwen/")
    if key in _ALL_PRESETS:
        return _ALL_PRESETS[key]
    raise PlanError(
        f"model.source: unknown model {source!r}: not a local directory with config.json, "
        f"nor a bundled preset ({', '.join(_ALL_PRESETS)}) or its Hugging Face id"
    )

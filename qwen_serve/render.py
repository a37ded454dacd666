"""Terminal output of ``qwen-serve plan`` and ``qwen-serve keys list``: aligned tables (rich) with units.

:func:`print_plan` and :func:`print_keys` write to ``file`` (default stdout) and return nothing. Values are
shown with their units (GiB, tokens, bytes) and thousands separators, never as Python reprs. The vLLM
command is printed outside the table, one flag per line with shell continuations, so it can be pasted into a
shell as it is. Nothing here computes a plan or reads a keys file: callers pass
:class:`~qwen_serve.plan.Plan` and :class:`~qwen_serve.keys.KeysFile` objects. Secrets and hashes are never
printed (:class:`~qwen_serve.keys.KeyEntry` has no secret; its hashes are not shown).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.table import Table

    from qwen_serve.keys import KeyEntry, KeysFile
    from qwen_serve.plan import Plan

__all__ = ["print_keys", "print_plan", "vllm_command_lines"]

_GIB = 1024**3
_VLLM_MODULE = "python -m vllm.entrypoints.openai.api_server"


def _print_table(table: Table, file: TextIO | None) -> None:
    """Render with rich, then print without the blanks rich pads rows with (clean to copy and to grep)."""
    from rich.console import Console

    out = file or sys.stdout
    # A terminal wraps the table to its width; piped or captured output keeps each row on one line.
    console = Console(file=out, highlight=False, emoji=False, width=None if out.isatty() else 200)
    with console.capture() as captured:
        console.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()).strip("\n"), file=out)


def _table(columns: Sequence[str]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_header=bool(columns), pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _n(value: float, unit: str = "") -> str:
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
    return f"{text} {unit}".rstrip()


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / _GIB:,.2f} GiB"


def _params(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.0f} M"


def vllm_command_lines(args: Sequence[str], env: dict[str, str]) -> list[str]:
    """The engine command as shell lines: ``NAME=value \\`` per variable, the module, then one flag (with its
    values) per line, each line but the last ending in `` \\``. Every word is shell-quoted."""
    words: list[list[str]] = []
    for arg in args:
        if arg.startswith("--") or not words:
            words.append([arg])
        else:
            words[-1].append(arg)
    lines = [f"{name}={shlex.quote(value)}" for name, value in env.items()] + [_VLLM_MODULE]
    lines += ["  " + " ".join(shlex.quote(w) for w in group) for group in words]
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def print_plan(plan: Plan, *, notes: Sequence[str] = (), file: TextIO | None = None) -> None:
    """The plan as a two-column table (figure, value), the vLLM command, then ``notes`` (lines printed as
    given, e.g. the gateway sizing and the multi-node layout), the warnings and the gateway notes."""
    from rich.text import Text

    out = file or sys.stdout
    served = "" if plan.served_name == plan.model else f", served as {plan.served_name}"
    print(f"Launch plan for {plan.model}{served}:", file=out)
    table = _table(())
    rope = plan.rope_scaling
    rows: list[tuple[str, str]] = [
        ("device", plan.device),
        ("parameters", _params(plan.param_count)),
        ("layers", _n(plan.num_hidden_layers)),
        ("attention heads", f"{plan.num_attention_heads} ({plan.num_key_value_heads} KV heads, head dim {plan.head_dim})"),
        ("native context", _n(plan.native_context, "tokens")),
        ("max_model_len", _n(plan.max_model_len, "tokens")),
        ("rope scaling", "none" if rope is None else
         f"{rope.get('rope_type', '?')} x{rope.get('factor', 0):g} of "
         f"{_n(rope.get('original_max_position_embeddings', 0), 'tokens')}"),
    ]
    if plan.device == "cuda":
        rows.append(("GPUs", f"{plan.gpus_per_node} per node x {plan.nodes} node{'s' if plan.nodes > 1 else ''}"))
    rows += [
        ("tensor parallel", str(plan.tensor_parallel_size)),
        ("data parallel", f"{plan.data_parallel_size} replica{'s' if plan.data_parallel_size > 1 else ''}"),
    ]
    if plan.pipeline_parallel_size > 1:
        rows.append(("pipeline parallel", f"{plan.pipeline_parallel_size} stages (one per node)"))
    rows += [
        ("weights per GPU" if plan.device == "cuda" else "weights", _gib(plan.weights_bytes_per_gpu)),
        ("KV cache per token", f"{_n(plan.kv_cache_bytes_per_token, 'bytes')} (all layers, K and V)"),
        ("KV cache per replica", _n(plan.kv_cache_tokens_per_replica, "tokens")),
        ("full-context sequences", f"{_n(plan.max_full_context_sequences_per_replica)} per replica"),
        ("engine", f"127.0.0.1:{plan.engine_port}, {plan.stream_interval} token(s) per SSE event"),
        ("engine decode rate", f"about {_n(plan.engine_tokens_per_s, 'tokens/s')} (estimate, for gateway sizing)"),
        ("gateway workers", f"{plan.gateway_workers}, relaying about {_n(plan.gateway_capacity_events_per_s)} "
                            f"SSE events/s ({plan.cpus_available} CPU(s) here)"),
    ]
    for name, value in rows:
        table.add_row(Text(name, style="bold"), Text(value))
    _print_table(table, out)
    print("\nvLLM command:", file=out)
    for line in vllm_command_lines(plan.vllm_args, plan.env):
        print(line, file=out)
    print(file=out)
    for line in [*notes, *(f"warning: {w}" for w in plan.warnings), *(f"note: {n}" for n in plan.gateway_notes)]:
        print(line, file=out)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")  # as KeyEntry.state writes times


def _limits(key: KeyEntry) -> str:
    parts = [f"{_n(v)} {unit}" for v, unit in ((key.rpm, "rpm"), (key.tpm, "tpm"), (key.max_concurrent, "concurrent"))
             if v is not None]
    return ", ".join(parts) or "unlimited"


def print_keys(keys: KeysFile, *, now: datetime | None = None, file: TextIO | None = None) -> None:
    """One row per key: id, models, limits, created, expires, state (:meth:`KeyEntry.state`)."""
    from rich.text import Text

    if not keys.keys:
        print("no keys (every request is refused while auth is enabled)", file=file or sys.stdout)
        return
    table = _table(("id", "models", "limits", "created", "expires", "state"))
    for key in keys.keys:
        table.add_row(*(Text(cell) for cell in (
            key.id, ", ".join(key.models), _limits(key), _when(key.created), _when(key.expires), key.state(now))))
    _print_table(table, file)

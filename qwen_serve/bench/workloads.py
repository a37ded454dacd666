"""What each request says: workload builders that produce the :class:`RequestSpec` list of a run.

Every builder is async (it may call the tokenizer), seeded, and runs **before** the run starts; the run
cycles through the list when it needs more requests than were built. ``spec.body`` is a
chat-completions body without ``model``/``stream``/``stream_options``::

    {"messages": [...], "max_tokens": output_len, "temperature": 0.0, "ignore_eos": true, ...}

(``ignore_eos`` only when the caller asks for it, and never on guided or tool requests, whose answer
ends where the constraint does). ``spec.input_tokens`` is the server's prompt-token count (chat
template included, as ``usage.prompt_tokens`` will say) when the tokenizer is exact, else ``None``;
``spec.output_tokens`` is the target ``max_tokens``; ``spec.kind`` the workload name.

Workloads (:func:`build_workload` dispatches on the name; :data:`WORKLOAD_NAMES`):

* ``random``: seeded words from :data:`VOCABULARY`, fitted so the templated prompt is exactly
  ``input_len`` tokens (encode a surplus, cut the ids, decode, re-count, fix up for at most
  :data:`FIT_ITERATIONS` rounds; the closest result is kept and its real count recorded). Each prompt
  is a different random word sequence from its first word, so the prefix cache cannot share them.
  With an inexact tokenizer: about ``0.75`` words per wanted token.
* ``sharegpt`` (or ``sharegpt:PATH``; option ``path``): first human turn of each ShareGPT
  conversation (JSON list or JSONL; ``{"conversations": [{"from", "value"}]}``, ``{"role",
  "content"}`` turns, or OpenAI ``messages``). Output length ``output_len`` when > 0, else the
  tokens of the first reply after that turn. Entries with a prompt under 4 tokens, without a reply
  when one is needed, or longer than ``max_model_len`` (prompt + output) are skipped; the rest are
  shuffled (seeded) and cycled when fewer than ``n``.
* ``multi-turn`` (options ``shared_prefix_len``, default ``input_len // 2``, and ``turns``, default 4):
  a system prompt of about ``shared_prefix_len`` tokens shared by all conversations, then turn ``k``
  = system + earlier user turns with pre-generated assistant replies (~``output_len`` tokens each;
  the run is open-loop and does not wait for real answers) + a new user message of about
  ``(input_len - shared_prefix_len) // turns`` tokens. Ordered conv0 turn0, conv1 turn0, ...,
  conv0 turn1, ... so a turn never precedes the one before it.
* ``long-context``: ``random`` with ``input_len`` defaulting to ``max_model_len - output_len - 16``.
* ``json-schema``: ``response_format`` ``json_schema`` (strict) with built-in schemas in turn
  (:data:`JSON_SCHEMAS`); ``spec.schema`` set; prompt padded to ``input_len`` like ``random``.
* ``tools``: OpenAI ``tools`` (:data:`TOOLS`, one or two functions) with ``tool_choice`` ``"auto"``
  or a named function; prompt padded to ``input_len`` (the count includes the tool definitions).

Tokenizer calls run concurrently, at most :data:`CONCURRENCY` at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from qwen_serve.bench.records import RequestSpec
from qwen_serve.bench.tokenizer import Tokenizer

__all__ = [
    "CONCURRENCY",
    "FIT_ITERATIONS",
    "JSON_SCHEMAS",
    "TOOLS",
    "VOCABULARY",
    "WORKLOAD_NAMES",
    "build_json_schema",
    "build_long_context",
    "build_multi_turn",
    "build_random",
    "build_sharegpt",
    "build_tools",
    "build_workload",
    "load_sharegpt",
]

WORKLOAD_NAMES: tuple[str, ...] = ("random", "sharegpt", "multi-turn", "long-context", "json-schema", "tools")
CONCURRENCY = 8
"""Tokenizer requests in flight at once while building."""
FIT_ITERATIONS = 8
"""Rounds of re-count and fix-up before the closest prompt length is accepted."""
WORDS_PER_TOKEN = 0.75
"""Words per wanted token when the tokenizer is only an estimate."""
MIN_PROMPT_TOKENS = 4
"""ShareGPT prompts shorter than this are skipped."""
LONG_CONTEXT_MARGIN = 16
"""Tokens ``long-context`` leaves free below ``max_model_len`` by default."""

VOCABULARY: tuple[str, ...] = tuple("""
about above across action after again against age ago agree air all almost alone along already also
always among amount animal another answer any appear apple area arm army around arrive art ask away
baby back bad ball bank base bear beat beauty become bed before begin behind believe bell best better
between big bird black blood blue board boat body bone book born both bottom box boy bread break bright
bring brother brown build burn busy buy call camp can capital car care carry case cat catch cause cell
center certain chair chance change character charge check chief child choose church circle city class
clean clear climb clock close cloth cloud coast cold color come common company complete contain control
cook cool copy corn corner cost cotton count country course cover cow create crop cross crowd cry
current cut dance dark day dead deal dear death decide deep degree depend describe desert design
detail develop die differ direct discuss distant divide doctor dog dollar door double down draw dream
dress drink drive drop dry during duty each early earth east easy eat edge effect egg eight either
electric element else end enemy energy engine enough enter equal even evening event ever every exact
example except excite exercise expect experience explain eye face fact fair fall family famous far
farm fast father fear feel field fight figure fill final find fine finger finish fire first fish fit
five floor flow flower fly follow food foot force forest form forward found four free fresh friend
front fruit full game garden gas gather general gentle girl give glad glass gold good govern grass
great green ground group grow guess guide hair half hand happen happy hard hat have head hear heart
heat heavy help high hill history hold home hope horse hot hour house huge human hundred hunt idea
imagine inch industry insect island join joy jump keep key kind king kitchen know lady lake land
language large last late laugh law lead learn leave left leg length letter level lie life lift light
line liquid list listen little live long look lost loud love low machine main major make man many map
mark market master match matter meat meet melody metal method middle might mile milk mind minute miss
modern moment money month moon morning mother mountain move music name nation natural near need
neighbor never new next night nine noise noon north note nothing notice number object ocean offer
office often old open order organ other paper parent part party pass path pattern pay people perhaps
period person pick picture piece place plain plan plant play please poem point poor position power
practice prepare present press pretty print problem produce product proper protect proud prove pull
push quick quiet race radio rain raise reach read ready real reason record region remember repeat reply
rest result rich ride right ring river road rock roll room root rope rose round row rule run safe sail
salt same sand save say school science score sea season seat second see seed sell send sense serve
settle seven shape share sharp sheet shell shine ship shoe shop short shoulder show side sign silent
silver simple sing sister sit size skill skin sky sleep slow small smell smile snow soft soil soldier
solve song sound south space speak special speed spell spend spring square stand star start state
station stay steam steel step stick still stone stop store story straight strange stream street
strong student study subject success sudden sugar summer sun supply surprise swim system table tail
take talk teach team tell ten test thank thick thin think third thousand three through throw tie time
tiny together tool top total touch toward town track trade train travel tree trip trouble true try
turn twenty type under unit until use usual valley value village visit voice vowel wait walk wall want
warm wash watch water wave way wear weather week weight west wheel white whole wide wife wild win
wind window winter wire wish woman wonder wood word work world write yard year yellow young
""".split())

JSON_SCHEMAS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("person", {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }),
    ("item_list", {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "price": {"type": "number"},
                    },
                    "required": ["id", "name", "price"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    }),
    ("contact", {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "zip": {"type": "string"},
                },
                "required": ["street", "city", "zip"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["name", "address", "active"],
        "additionalProperties": False,
    }),
)
"""``(name, schema)`` pairs the ``json-schema`` workload uses in turn."""

_WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
_TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}
TOOLS: tuple[dict[str, Any], ...] = (_WEATHER_TOOL, _TIME_TOOL)
"""Function tools of the ``tools`` workload (requests get the first, or both)."""
_CITIES = ("Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Toronto", "Sydney", "Nairobi", "Hanoi", "Madrid")

_HUMAN_ROLES = frozenset({"human", "user"})
_GPT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})

Messages = list[dict[str, Any]]
_T = TypeVar("_T")


async def build_workload(name: str, *, tokenizer: Tokenizer, n: int, input_len: int | None,
                         output_len: int | None, seed: int = 0, ignore_eos: bool = True,
                         max_model_len: int | None = None, **options: Any) -> list[RequestSpec]:
    """The specs of workload ``name`` (see the module docstring; ``sharegpt:PATH`` sets ``path``).

    ``options``: ``temperature`` (all; default 0), ``path`` (sharegpt), ``shared_prefix_len`` and
    ``turns`` (multi-turn). ``None`` values are ignored; any other option is a ``ValueError``.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    temperature = float(opts.pop("temperature", 0.0))
    if name.startswith("sharegpt:"):
        name, opts["path"] = "sharegpt", name.split(":", 1)[1]
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; available: {', '.join(WORKLOAD_NAMES)}")
    allowed = {"sharegpt": {"path"}, "multi-turn": {"shared_prefix_len", "turns"}}.get(name, set())
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ValueError(f"workload {name!r} does not take option(s) {', '.join(unknown)}"
                         + (f" (it takes {', '.join(sorted(allowed))})" if allowed else ""))
    common: dict[str, Any] = {"seed": seed, "temperature": temperature, "max_model_len": max_model_len}
    if name == "sharegpt":
        if "path" not in opts:
            raise ValueError("workload 'sharegpt' needs a file: name it 'sharegpt:PATH' or pass path=PATH")
        return await build_sharegpt(tokenizer, n, Path(opts["path"]), output_len=output_len,
                                    ignore_eos=ignore_eos, **common)
    if name == "long-context":
        return await build_long_context(tokenizer, n, input_len, _need(output_len, "output_len"),
                                        ignore_eos=ignore_eos, **common)
    in_len, out_len = _need(input_len, "input_len"), _need(output_len, "output_len")
    if name == "random":
        return await build_random(tokenizer, n, in_len, out_len, ignore_eos=ignore_eos, **common)
    if name == "multi-turn":
        return await build_multi_turn(tokenizer, n, in_len, out_len, ignore_eos=ignore_eos,
                                      shared_prefix_len=opts.get("shared_prefix_len"),
                                      turns=int(opts.get("turns", 4)), **common)
    if name == "json-schema":
        return await build_json_schema(tokenizer, n, in_len, out_len, **common)
    return await build_tools(tokenizer, n, in_len, out_len, **common)


# --- builders -----------------------------------------------------------------------------------


async def build_random(tokenizer: Tokenizer, n: int, input_len: int, output_len: int, *, seed: int = 0,
                       ignore_eos: bool = True, temperature: float = 0.0, max_model_len: int | None = None,
                       kind: str = "random") -> list[RequestSpec]:
    """``n`` distinct random-word prompts of exactly ``input_len`` templated tokens (when exact)."""
    _check_counts(n, input_len, output_len, max_model_len)

    def build(text: str) -> Messages:
        return [{"role": "user", "content": text}]

    overhead = await tokenizer.count_chat(build(""))
    if tokenizer.exact and input_len <= overhead:
        raise ValueError(f"input_len {input_len} leaves no room for text: the chat template alone is "
                         f"{overhead} tokens")

    async def one(i: int) -> RequestSpec:
        msgs, count = await _fit(tokenizer, build, input_len, _rng(seed, kind, i), overhead=overhead)
        return RequestSpec(index=i, body=_body(msgs, output_len, ignore_eos, temperature), input_tokens=count,
                           output_tokens=output_len, kind=kind)

    return await _bounded([partial(one, i) for i in range(n)])


async def build_long_context(tokenizer: Tokenizer, n: int, input_len: int | None, output_len: int, *,
                             seed: int = 0, ignore_eos: bool = True, temperature: float = 0.0,
                             max_model_len: int | None = None) -> list[RequestSpec]:
    """``random`` near the context limit: ``input_len`` defaults to ``max_model_len - output_len - 16``."""
    if not input_len:
        if max_model_len is None:
            raise ValueError("long-context needs input_len or max_model_len")
        input_len = max_model_len - output_len - LONG_CONTEXT_MARGIN
        if input_len < 1:
            raise ValueError(f"long-context: output_len {output_len} does not fit in max_model_len {max_model_len}")
    return await build_random(tokenizer, n, input_len, output_len, seed=seed, ignore_eos=ignore_eos,
                              temperature=temperature, max_model_len=max_model_len, kind="long-context")


async def build_json_schema(tokenizer: Tokenizer, n: int, input_len: int, output_len: int, *, seed: int = 0,
                            temperature: float = 0.0, max_model_len: int | None = None) -> list[RequestSpec]:
    """Guided-JSON requests (``response_format`` json_schema, strict), schemas of :data:`JSON_SCHEMAS` in turn.

    No ``ignore_eos``: a constrained answer ends at its closing brace. When ``input_len`` is below the
    instruction's own length the prompt is just the instruction (``input_tokens`` says how long).
    """
    _check_counts(n, input_len, output_len, max_model_len)

    async def one(i: int) -> RequestSpec:
        name, schema = JSON_SCHEMAS[i % len(JSON_SCHEMAS)]
        instruction = ("Reply with only a JSON value that matches this JSON schema, nothing else:\n"
                       + json.dumps(schema))
        msgs, count = await _fit(tokenizer, _padded(instruction), input_len, _rng(seed, "json-schema", i),
                                 allow_short=True)
        body = _body(msgs, output_len, False, temperature)
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": name, "schema": schema, "strict": True}}
        return RequestSpec(index=i, body=body, input_tokens=count, output_tokens=output_len, kind="json-schema",
                           schema=schema)

    return await _bounded([partial(one, i) for i in range(n)])


async def build_tools(tokenizer: Tokenizer, n: int, input_len: int, output_len: int, *, seed: int = 0,
                      temperature: float = 0.0, max_model_len: int | None = None) -> list[RequestSpec]:
    """Tool-calling requests: ``tools`` = get_weather (+ get_time on odd requests); ``tool_choice``
    ``"auto"`` for requests 0, 1, 4, 5, ... and the named ``get_weather`` function for 2, 3, 6, 7, ...

    No ``ignore_eos`` (the call ends at its closing tag). ``input_tokens`` includes the tool definitions.
    """
    _check_counts(n, input_len, output_len, max_model_len)

    async def one(i: int) -> RequestSpec:
        rng = _rng(seed, "tools", i)
        tools = [dict(t) for t in TOOLS[: 1 + i % 2]]
        unit = rng.choice(("celsius", "fahrenheit"))
        question = (f"What is the weather in {rng.choice(_CITIES)} right now, in {unit}? "
                    "Call the get_weather tool to find out.")
        msgs, count = await _fit(tokenizer, _padded(question), input_len, rng, tools=tools, allow_short=True)
        body = _body(msgs, output_len, False, temperature)
        body["tools"] = tools
        body["tool_choice"] = ("auto" if (i // 2) % 2 == 0
                               else {"type": "function", "function": {"name": "get_weather"}})
        return RequestSpec(index=i, body=body, input_tokens=count, output_tokens=output_len, kind="tools")

    return await _bounded([partial(one, i) for i in range(n)])


async def build_multi_turn(tokenizer: Tokenizer, n: int, input_len: int, output_len: int, *, seed: int = 0,
                           ignore_eos: bool = True, temperature: float = 0.0, max_model_len: int | None = None,
                           shared_prefix_len: int | None = None, turns: int = 4) -> list[RequestSpec]:
    """Conversations sharing one system prompt; ``ceil(n / turns)`` conversations, cut to ``n`` specs."""
    _check_counts(n, input_len, output_len, None)
    shared = input_len // 2 if shared_prefix_len is None else int(shared_prefix_len)
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if not 0 <= shared < input_len:
        raise ValueError(f"shared_prefix_len must be in [0, input_len={input_len}), got {shared}")
    user_len = max(1, (input_len - shared) // turns)
    system = await _texts_of_tokens(tokenizer, _rng(seed, "multi-turn", "system"), [shared]) if shared else [""]
    prefix: Messages = [{"role": "system", "content": system[0]}] if shared else []
    conversations = math.ceil(n / turns)

    async def conversation(c: int) -> list[Messages]:
        sizes = [user_len, output_len] * (turns - 1) + [user_len]
        texts = await _texts_of_tokens(tokenizer, _rng(seed, "multi-turn", c), sizes)
        history = list(prefix)
        out: list[Messages] = []
        for k in range(turns):
            history.append({"role": "user", "content": texts[2 * k]})
            out.append([dict(m) for m in history])
            if k < turns - 1:
                history.append({"role": "assistant", "content": texts[2 * k + 1]})
        return out

    convs = await _bounded([partial(conversation, c) for c in range(conversations)])
    order = [(c, k) for k in range(turns) for c in range(conversations)][:n]

    async def one(i: int) -> RequestSpec:
        c, k = order[i]
        msgs = convs[c][k]
        count = await tokenizer.count_chat(msgs) if tokenizer.exact else None
        if count is not None and max_model_len is not None and count + output_len > max_model_len:
            raise ValueError(f"multi-turn: turn {k} has {count} prompt tokens + {output_len} output > "
                             f"max_model_len {max_model_len}; lower input_len, output_len or turns")
        return RequestSpec(index=i, body=_body(msgs, output_len, ignore_eos, temperature), input_tokens=count,
                           output_tokens=output_len, kind="multi-turn", conversation=c, turn=k)

    return await _bounded([partial(one, i) for i in range(len(order))])


async def build_sharegpt(tokenizer: Tokenizer, n: int, path: Path | str, *, output_len: int | None = None,
                         seed: int = 0, ignore_eos: bool = True, temperature: float = 0.0,
                         max_model_len: int | None = None) -> list[RequestSpec]:
    """First human turns of a ShareGPT file, shuffled (seeded), filtered, cycled up to ``n``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pairs = load_sharegpt(path)
    order = list(range(len(pairs)))
    _rng(seed, "sharegpt").shuffle(order)

    async def check(idx: int) -> tuple[Messages, int | None, int] | None:
        prompt, reply = pairs[idx]
        if len(await tokenizer.encode(prompt)) < MIN_PROMPT_TOKENS:
            return None
        if output_len and output_len > 0:
            out = output_len
        elif reply is None:
            return None
        else:
            out = len(await tokenizer.encode(reply))
            if out < 1:
                return None
        msgs: Messages = [{"role": "user", "content": prompt}]
        count = await tokenizer.count_chat(msgs)
        if max_model_len is not None and count + out > max_model_len:
            return None
        return msgs, (count if tokenizer.exact else None), out

    accepted: list[tuple[Messages, int | None, int]] = []
    window = max(4 * CONCURRENCY, n)
    for start in range(0, len(order), window):
        part = order[start:start + window]
        results = await _bounded([partial(check, idx) for idx in part])
        accepted.extend(r for r in results if r is not None)
        if len(accepted) >= n:
            break
    if not accepted:
        raise ValueError(f"{path}: no usable conversation (need a human turn of >= {MIN_PROMPT_TOKENS} tokens"
                         + (", a reply" if not output_len else "")
                         + (f", prompt + output <= max_model_len {max_model_len}" if max_model_len else "") + ")")
    specs = []
    for i in range(n):
        msgs, count, out = accepted[i % len(accepted)]
        specs.append(RequestSpec(index=i, body=_body([dict(m) for m in msgs], out, ignore_eos, temperature),
                                 input_tokens=count, output_tokens=out, kind="sharegpt"))
    return specs


def load_sharegpt(path: Path | str) -> list[tuple[str, str | None]]:
    """``(first human turn, first reply after it or None)`` per entry that has a human turn.

    A file starting with ``[`` is one JSON list, anything else JSONL (blank lines skipped). A
    malformed entry is a ``ValueError`` naming the file and the entry (JSON list) or line (JSONL).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read ShareGPT file: {exc}") from exc
    entries: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        entries = [(f"entry {i}", e) for i, e in enumerate(data)]
    else:
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {ln}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: line {ln}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    out: list[tuple[str, str | None]] = []
    for where, entry in entries:
        pair = _first_exchange(entry, f"{p}: {where}")
        if pair is not None:
            out.append(pair)
    return out


def _first_exchange(entry: Any, where: str) -> tuple[str, str | None] | None:
    if isinstance(entry, dict):
        conv = next((entry[k] for k in ("conversations", "conversation", "messages") if k in entry), None)
        if conv is None:
            raise ValueError(f"{where}: no 'conversations' or 'messages' list (keys: {', '.join(map(str, entry))})")
    else:
        conv = entry
    if not isinstance(conv, list):
        raise ValueError(f"{where}: expected a list of turns, got {type(conv).__name__}")
    prompt: str | None = None
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}, turn {j}: expected an object, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str):
            raise ValueError(f"{where}, turn {j}: no 'from'/'role' string")
        if isinstance(value, list):  # OpenAI content parts
            value = "".join(str(part.get("text", "")) for part in value if isinstance(part, dict))
        if value is None and role.lower() in _GPT_ROLES:
            value = ""  # e.g. an assistant turn with only tool calls
        if not isinstance(value, str):
            raise ValueError(f"{where}, turn {j}: no 'value'/'content' string")
        role = role.lower()
        if prompt is None:
            if role in _HUMAN_ROLES:
                prompt = value
        elif role in _GPT_ROLES:
            return prompt, value
    return None if prompt is None else (prompt, None)


# --- helpers ------------------------------------------------------------------------------------


def _need(value: int | None, name: str) -> int:
    if value is None:
        raise ValueError(f"this workload needs {name}")
    return value


def _check_counts(n: int, input_len: int, output_len: int, max_model_len: int | None) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if input_len < 1:
        raise ValueError(f"input_len must be >= 1, got {input_len}")
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    if max_model_len is not None and input_len + output_len > max_model_len:
        raise ValueError(f"input_len {input_len} + output_len {output_len} exceeds max_model_len {max_model_len}")


def _body(messages: Messages, output_len: int, ignore_eos: bool, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, "max_tokens": output_len, "temperature": temperature}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _padded(text: str) -> Callable[[str], Messages]:
    """One user message: the padding first (distinct per request), then ``text``."""
    def build(pad: str) -> Messages:
        return [{"role": "user", "content": f"{pad}\n\n{text}" if pad else text}]
    return build


def _rng(seed: int, *parts: object) -> random.Random:
    """A generator per (seed, purpose, item): independent of build order and concurrency."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(k))


async def _surplus(tokenizer: Tokenizer, rng: random.Random, k: int, text: str = "") -> tuple[str, list[int]]:
    """Random text (extending ``text``) and its ids, at least ``k + 16`` of them."""
    want = k + 16
    ids = await tokenizer.encode(text) if text else []
    for _ in range(32):
        if len(ids) >= want:
            return text, ids
        more = _words(rng, max(16, want - len(ids)))
        text = f"{text} {more}" if text else more
        ids = await tokenizer.encode(text)
    raise RuntimeError(f"could not produce {want} tokens of text (the tokenizer returned {len(ids)})")


async def _texts_of_tokens(tokenizer: Tokenizer, rng: random.Random, sizes: Sequence[int]) -> list[str]:
    """Random texts of about ``sizes[i]`` tokens each (consecutive slices of one encoded text)."""
    if not tokenizer.exact:
        return [_words(rng, max(1, round(k * WORDS_PER_TOKEN))) for k in sizes]
    _, ids = await _surplus(tokenizer, rng, sum(sizes))
    out, pos = [], 0
    for k in sizes:
        out.append(await tokenizer.decode(ids[pos:pos + k]))
        pos += k
    return out


async def _fit(tokenizer: Tokenizer, build: Callable[[str], Messages], target: int, rng: random.Random, *,
               overhead: int | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
               allow_short: bool = False) -> tuple[Messages, int | None]:
    """Messages ``build(pad)`` whose ``count_chat`` is ``target``, and that count.

    Exact tokenizer: encode surplus words, cut the ids to ``target - overhead``, decode, re-count and
    move the cut by the difference; a cut seen before (the boundary flips between two lengths) draws
    new words. After :data:`FIT_ITERATIONS` counts the closest is returned with its real count.
    Estimate: ``0.75`` words per missing token and a count of ``None``.
    """
    if overhead is None:
        overhead = await tokenizer.count_chat(build(""), tools)
    need = target - overhead
    if need < 1:
        if allow_short:
            return build(""), (overhead if tokenizer.exact else None)
        raise ValueError(f"a prompt of {target} tokens leaves no room for text ({overhead} tokens without it)")
    if not tokenizer.exact:
        return build(_words(rng, max(1, round(need * WORDS_PER_TOKEN)))), None
    text, ids = await _surplus(tokenizer, rng, need)
    cut, tried = need, set()
    best: tuple[int, Messages, int] | None = None
    for _ in range(FIT_ITERATIONS):
        tried.add(cut)
        msgs = build(await tokenizer.decode(ids[:cut]))
        count = await tokenizer.count_chat(msgs, tools)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), msgs, count)
        if count == target:
            break
        cut = max(1, cut + target - count)
        if cut in tried:  # oscillating at this boundary: other words, same offset
            text, ids = await _surplus(tokenizer, rng, cut)
            tried.clear()
        elif cut > len(ids):
            text, ids = await _surplus(tokenizer, rng, cut, text)
    assert best is not None
    return best[1], best[2]


async def _bounded(factories: Sequence[Callable[[], Awaitable[_T]]], limit: int = CONCURRENCY) -> list[_T]:
    """Run the coroutines, at most ``limit`` at a time, results in order; the first error cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def run(factory: Callable[[], Awaitable[_T]]) -> _T:
        async with sem:
            return await factory()

    tasks = [asyncio.ensure_future(run(f)) for f in factories]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

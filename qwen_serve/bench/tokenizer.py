"""Token counts as the server sees them, for building workloads of exact prompt lengths.

:class:`ServerTokenizer` asks the server itself through vLLM's ``/tokenize`` and ``/detokenize``
(which the gateway passes through with the same auth as the chat routes), so the counts include the
model's chat template and match ``usage.prompt_tokens``:

* ``count_chat(messages, tools=None)``: ``POST /tokenize {"model", "messages", "add_generation_prompt":
  true[, "tools"]}`` → ``count`` (the whole templated prompt, as a chat completion would be charged);
* ``encode(text)``: ``POST /tokenize {"model", "prompt", "add_special_tokens": false}`` → ``tokens``;
* ``decode(ids)``: ``POST /detokenize {"model", "tokens"}`` → ``prompt``.

Any failure (connection error, timeout, non-200 status such as a server without these routes, or an
unexpected answer) raises :class:`TokenizerUnavailable` with the status in the message. The
``aiohttp.ClientSession`` belongs to the caller (not closed here).

:class:`EstimateTokenizer` is the offline stand-in (about 4 characters per token, a small per-message
overhead in ``count_chat``); ``exact`` tells the two apart (``True`` only for the server). Its
``encode``/``decode`` round-trip (ids index 4-character chunks it has seen).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp

__all__ = ["EstimateTokenizer", "ServerTokenizer", "Tokenizer", "TokenizerUnavailable"]


class TokenizerUnavailable(RuntimeError):
    """The server's ``/tokenize``/``/detokenize`` could not be used (status or cause in the message)."""


class Tokenizer(Protocol):
    """What the workload builders need from a tokenizer."""

    exact: bool
    """``True`` when counts are the server's own (``/tokenize``), ``False`` for estimates."""

    async def count_chat(self, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Prompt tokens of a chat request with these messages (chat template + generation prompt)."""
        ...

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens, no template)."""
        ...

    async def decode(self, ids: Sequence[int]) -> str:
        """The text of these token ids."""
        ...


class ServerTokenizer:
    """The server's tokenizer through ``/tokenize`` and ``/detokenize`` (``exact = True``)."""

    exact: bool = True

    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str, *,
                 api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def count_chat(self, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages],
                                "add_generation_prompt": True}
        if tools:
            body["tools"] = [dict(t) for t in tools]
        answer = await self._post("/tokenize", body)
        return int(_field(answer, "count", int, "/tokenize"))

    async def encode(self, text: str) -> list[int]:
        answer = await self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        tokens = _field(answer, "tokens", list, "/tokenize")
        return [int(t) for t in tokens]

    async def decode(self, ids: Sequence[int]) -> str:
        answer = await self._post("/detokenize", {"model": self.model, "tokens": list(ids)})
        return str(_field(answer, "prompt", str, "/detokenize"))

    async def _post(self, route: str, body: dict[str, Any]) -> Any:
        url = self.base_url + route
        try:
            async with self.session.post(url, json=body, headers=self.headers, timeout=self.timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise TokenizerUnavailable(f"POST {url} failed: {type(exc).__name__}: {exc}") from exc
        if status != 200:
            detail = raw[:300].decode(errors="replace")
            hint = " (the server has no tokenizer route)" if status == 404 else ""
            raise TokenizerUnavailable(f"POST {url} answered HTTP {status}{hint}: {detail}")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise TokenizerUnavailable(f"POST {url} answered HTTP 200 with a non-JSON body: {exc}") from exc


def _field(answer: Any, name: str, typ: type[Any], route: str) -> Any:
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, typ) or isinstance(value, bool):
        raise TokenizerUnavailable(f"{route} answered without a {typ.__name__} {name!r}: {str(answer)[:200]}")
    return value


class EstimateTokenizer:
    """No server: about 4 characters per token (``exact = False``)."""

    exact: bool = False
    CHARS_PER_TOKEN = 4
    MESSAGE_OVERHEAD = 4
    """Tokens per message for role markers (ChatML: ``<|im_start|>role\\n ... <|im_end|>\\n``)."""
    PROMPT_OVERHEAD = 3
    """The generation prompt (``<|im_start|>assistant\\n``)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._chunks: list[str] = []

    async def count_chat(self, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        total = self.PROMPT_OVERHEAD
        for m in messages:
            total += self.MESSAGE_OVERHEAD + self._estimate(_content_text(m.get("content")))
            for call in m.get("tool_calls") or ():
                total += self._estimate(json.dumps(call))
        if tools:
            total += self._estimate(json.dumps(list(tools)))
        return total

    async def encode(self, text: str) -> list[int]:
        n = self.CHARS_PER_TOKEN
        out = []
        for i in range(0, len(text), n):
            chunk = text[i:i + n]
            if chunk not in self._ids:
                self._ids[chunk] = len(self._chunks)
                self._chunks.append(chunk)
            out.append(self._ids[chunk])
        return out

    async def decode(self, ids: Sequence[int]) -> str:
        if any(not 0 <= i < len(self._chunks) for i in ids):
            raise ValueError("EstimateTokenizer.decode: unknown token id (only ids from encode are known)")
        return "".join(self._chunks[i] for i in ids)

    def _estimate(self, text: str) -> int:
        return -(-len(text) // self.CHARS_PER_TOKEN)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""

"""Stage 2 of the gateway pipeline: per-key rpm, tpm and concurrency limits (contract: CONTRACTS.md §3, §5).

The pipeline calls, after auth and before the upstream hop::

    lease = await limiter.acquire(principal, estimate_prompt_tokens(body))
    try:
        ...                                   # forward, stream
    finally:
        lease.release(usage_total_or_none)    # prompt + completion tokens from ``usage``; None if unknown

``acquire`` raises :class:`~qwen_serve.errors.RateLimited` (429 + ``Retry-After``) whose ``limit`` —
``rpm``, ``tpm`` or ``concurrency`` — is the ``qwen_serve_rate_limited_total`` label. When several limits
refuse, the one that frees last is reported. Every lease must be released exactly once (later calls are
ignored); an unreleased lease holds its concurrency slot and its token estimate forever.

Limits are per :class:`Limiter` instance, i.e. per gateway process. With N gateway replicas a key gets up to
N times its limits; configure ``limit / N``. :class:`Limiter` is the seam for a shared store (e.g. Redis).

:class:`LocalLimiter` accounting, exact (no buckets), window W = 60 s:

* **rpm** — a sliding log of admission times. A request at time t is admitted iff fewer than ``rpm``
  admissions lie in (t − W, t]. Hence *no interval of length W ever contains more than rpm admissions*:
  the last admission in such an interval would have seen all the others.
* **tpm** (prompt + completion tokens) — a ledger of charges. A request in flight is charged its estimate
  for as long as it runs (so a long stream cannot slip out of the window); when released it is charged its
  actual tokens (``None`` keeps the estimate) at its release time, for W. A request is admitted iff
  ``charges + estimate <= tpm``. Consequence (checked by a property test): for any interval of length W, the
  actual tokens of the requests *finishing* in it are at most ``tpm`` plus the underestimates
  (actual − estimate) of those among them still in flight when the last of them was admitted. With the
  prompt-only estimate a key therefore overshoots by at most the completions of its concurrently running
  requests — one response for a sequential client; with an upper-bound estimate (prompt + ``max_tokens``) it
  never overshoots.
* A request whose estimate alone exceeds ``tpm`` can never be admitted: 429 (``limit="tpm"``,
  ``retry_after`` = W) with a message saying so — a 429 rather than a 400 because it is this key's limit,
  not a malformed request.
* **concurrency** — unreleased leases.

Retry-After: rpm → until enough admissions leave the window; tpm → until enough finished charges leave it
(charges of requests in flight only free on release, so then at least 1 s); concurrency → 1 s.

Not thread-safe: call from the event loop only. :func:`estimate_prompt_tokens` is the cheap upfront estimate.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from qwen_serve.errors import RateLimited

__all__ = [
    "WINDOW_S",
    "KeyLimits",
    "Lease",
    "Limiter",
    "LocalLimiter",
    "estimate_prompt_tokens",
]

WINDOW_S = 60.0
_UNKNOWN_WAIT_S = 1.0  # when room depends on another request finishing


class KeyLimits(Protocol):
    """What the limiter reads from a principal (``gateway.auth.Principal`` fits; stages don't import each other)."""

    @property
    def key_id(self) -> str: ...

    @property
    def rpm(self) -> int | None: ...

    @property
    def tpm(self) -> int | None: ...

    @property
    def max_concurrent(self) -> int | None: ...


class Lease(Protocol):
    """An admitted request's hold on its key's limits."""

    def release(self, actual_tokens: int | None = None) -> None:
        """Free the concurrency slot and replace the token estimate by ``actual_tokens`` (idempotent)."""
        ...


class Limiter(Protocol):
    """Admission control per key; implementations may share state between replicas."""

    async def acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        """Admit one request or raise :class:`RateLimited`."""
        ...

    async def aclose(self) -> None: ...


class _NoLease:
    __slots__ = ()

    def release(self, actual_tokens: int | None = None) -> None:
        pass


_NO_LEASE = _NoLease()


class _KeyState:
    __slots__ = ("starts", "done", "done_tokens", "in_flight", "in_flight_tokens")

    def __init__(self) -> None:
        self.starts: deque[float] = deque()  # admission times (rpm)
        self.done: deque[tuple[float, int]] = deque()  # (release time, actual tokens) of finished requests
        self.done_tokens = 0  # sum over done
        self.in_flight = 0
        self.in_flight_tokens = 0  # sum of estimates of unreleased leases

    def prune(self, horizon: float) -> None:
        starts, done = self.starts, self.done
        while starts and starts[0] <= horizon:
            starts.popleft()
        while done and done[0][0] <= horizon:
            self.done_tokens -= done.popleft()[1]


class _LocalLease:
    __slots__ = ("_state", "_estimate", "_clock", "_released")

    def __init__(self, state: _KeyState, estimate: int | None, clock: Callable[[], float]) -> None:
        self._state = state
        self._estimate = estimate  # None when tokens are not tracked (no tpm at admission)
        self._clock = clock
        self._released = False

    def release(self, actual_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        state = self._state
        state.in_flight -= 1
        if self._estimate is not None:
            state.in_flight_tokens -= self._estimate
            tokens = self._estimate if actual_tokens is None else max(0, int(actual_tokens))
            if tokens:
                state.done.append((self._clock(), tokens))
                state.done_tokens += tokens


class LocalLimiter:
    """In-memory :class:`Limiter` for one process; see the module docstring for the exact accounting.

    ``clock`` (seconds, monotonic) and ``window_s`` are injectable for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._window = window_s
        self._states: dict[str, _KeyState] = {}

    async def acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        return self.try_acquire(principal, estimated_tokens)

    async def aclose(self) -> None:
        self._states.clear()

    def try_acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        """Synchronous :meth:`acquire`."""
        rpm, tpm, concurrency = principal.rpm, principal.tpm, principal.max_concurrent
        if rpm is None and tpm is None and concurrency is None:
            return _NO_LEASE
        key_id = principal.key_id
        estimate = max(0, int(estimated_tokens))
        now = self._clock()
        window = self._window
        state = self._states.get(key_id)
        if state is None:
            state = self._states[key_id] = _KeyState()
        state.prune(now - window)

        refusals: list[RateLimited] = []
        if concurrency is not None and state.in_flight >= concurrency:
            refusals.append(RateLimited(
                f"Too many concurrent requests for API key '{key_id}': the limit is {concurrency}. "
                "Try again when one has finished.",
                limit="concurrency", retry_after=_UNKNOWN_WAIT_S,
            ))
        if rpm is not None and len(state.starts) >= rpm:
            # Room once len - rpm + 1 admissions have left: the (len - rpm)-th oldest is the last to go.
            wait = state.starts[len(state.starts) - rpm] + window - now
            refusals.append(RateLimited(
                f"Rate limit reached for API key '{key_id}': {rpm} requests per minute. "
                f"Please try again in {_seconds(wait)}s.",
                limit="rpm", retry_after=wait,
            ))
        if tpm is not None:
            if estimate > tpm:
                refusals.append(RateLimited(
                    f"Request too large for API key '{key_id}': its estimated {estimate} prompt tokens exceed the "
                    f"limit of {tpm} tokens per minute, so it can never be admitted. Shorten the prompt or ask "
                    "for a higher tpm limit.",
                    limit="tpm", retry_after=window,
                ))
            else:
                used = state.in_flight_tokens + state.done_tokens
                if used + estimate > tpm:
                    wait = _tokens_wait(state.done, used + estimate - tpm, now, window)
                    refusals.append(RateLimited(
                        f"Rate limit reached for API key '{key_id}': {tpm} tokens per minute (in use {used}, "
                        f"requested {estimate}). Please try again in {_seconds(wait)}s.",
                        limit="tpm", retry_after=wait,
                    ))
        if refusals:
            raise max(refusals, key=lambda r: r.retry_after)

        state.in_flight += 1
        if rpm is not None:
            state.starts.append(now)
        if tpm is None:
            return _LocalLease(state, None, self._clock)
        state.in_flight_tokens += estimate
        return _LocalLease(state, estimate, self._clock)


def _tokens_wait(done: deque[tuple[float, int]], excess: int, now: float, window: float) -> float:
    """Seconds until finished charges totalling ``excess`` leave the window (else until all have, ≥ 1 s)."""
    freed = 0
    for released_at, tokens in done:
        freed += tokens
        if freed >= excess:
            return released_at + window - now
    return max(_UNKNOWN_WAIT_S, done[-1][0] + window - now if done else 0.0)


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


# --- upfront estimate -------------------------------------------------------------------------------------

_PER_MESSAGE = 4  # Qwen's chat template: "<|im_start|>role\n" … "<|im_end|>\n"
_REPLY_PRIMER = 3  # "<|im_start|>assistant\n"


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A cheap upper-ish estimate of the prompt's tokens, without a tokenizer.

    UTF-8 bytes / 4 over every piece of text the model reads — message contents (strings, and the ``text``
    of content parts), names, tool calls, tool definitions, and ``prompt`` for completions — plus the chat
    template's few tokens per message. Bytes rather than characters: ~4 characters per token for English,
    and ~0.75 tokens per character for CJK text, both close to Qwen2.5's tokenizer. Token-id prompts count
    exactly. Never raises on odd shapes (validation is not this function's job).
    """
    size = 0
    tokens = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens += _REPLY_PRIMER
        for message in messages:
            tokens += _PER_MESSAGE
            if not isinstance(message, Mapping):
                continue
            size += _content_size(message.get("content"))
            for field in ("name", "reasoning_content"):
                value = message.get(field)
                if isinstance(value, str):
                    size += _text_size(value)
            if message.get("tool_calls"):
                size += _json_size(message["tool_calls"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        size += _text_size(prompt)
    elif isinstance(prompt, list):
        for item in prompt:
            if isinstance(item, str):
                size += _text_size(item)
            elif isinstance(item, int):
                tokens += 1
            elif isinstance(item, list):
                tokens += len(item)
    for field in ("tools", "functions"):
        if body.get(field):
            size += _json_size(body[field])
    return tokens + math.ceil(size / 4)


def _content_size(content: Any) -> int:
    if isinstance(content, str):
        return _text_size(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += _text_size(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                total += _text_size(part["text"])
        return total
    return 0


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str))
    except (TypeError, ValueError):
        return 0

"""Stage 2 of the gateway pipeline: per-key rpm, tpm and concurrency limits (429 ``rate_limit_exceeded`` with
``Retry-After``, counted in ``qwen_serve_rate_limited_total{key_id,limit}``).

The pipeline calls, after auth and before the upstream hop::

    lease = await limiter.acquire(principal, estimate_prompt_tokens(body))
    try:
        ...                                   # forward, stream
    finally:
        lease.release(usage_total_or_none)    # prompt + completion tokens from ``usage``; None if unknown

``acquire`` raises :class:`~qwen_serve.errors.RateLimited` (429 + ``Retry-After``) whose ``limit`` —
``rpm``, ``tpm`` or ``concurrency`` — is the ``qwen_serve_rate_limited_total`` label. When several limits
refuse, the one that frees last is reported. A request no wait can admit raises
:class:`~qwen_serve.errors.TooLargeForLimit` (413, ``x-should-retry: false``; its estimate exceeds the tpm)
or a ``RateLimited`` with ``retryable=False`` (a limit of 0). Every lease must be released exactly once
(later calls are ignored); an unreleased lease holds its concurrency slot and its token estimate forever.

Limits are per :class:`Limiter` instance. The gateway gets its limiter from :func:`build_limiter`, which
reads the config's ``limits`` section: with ``local``, one gateway process has a :class:`LocalLimiter`, and
the worker processes of one gateway (``gateway.workers`` > 1) share one
:class:`~qwen_serve.gateway.limits_shared.SharedLimiter` in shared memory, with the same accounting. With
``local`` the limits are per host: with N gateway replicas a key gets up to N times its limits. With
``redis`` every process and replica books in one Redis
(:class:`~qwen_serve.gateway.limits_redis.RedisLimiter`), so a key's limits hold across all of them.

:class:`LocalLimiter` accounting, window W = 60 s, kept in time buckets of R = ``resolution_s`` (0.1 s):
an amount booked at time t counts until the end of its bucket plus W — for at least W (so every bound
below holds exactly as with a per-request log) and at most R longer. Memory per key is at most W/R + 1
buckets whatever the request rate, a request adds to the newest bucket instead of allocating, and a
refusal's Retry-After walks at most W/R buckets (a per-request log at 3,000 req/s held 360,000 objects
per minute, and every tpm refusal walked them). R = 0 keeps one entry per request (the exact log; tests
use it to check boundaries to the millisecond).

* **rpm** — admissions per window. A request at time t is admitted iff fewer than ``rpm`` admissions
  still count at t (all of (t − W, t], and some up to R older). Hence *no interval of length W ever
  contains more than rpm admissions*: the last admission in such an interval would have seen all the others.
* **tpm** (prompt + completion tokens) — a ledger of charges. A request in flight is charged its estimate
  for as long as it runs (so a long stream cannot slip out of the window); when released it is charged its
  actual tokens (``None`` keeps the estimate) at its release time, for W. A request is admitted iff
  ``charges + estimate <= tpm``. Consequence (checked by a property test): for any interval of length W, the
  actual tokens of the requests *finishing* in it are at most ``tpm`` plus the underestimates
  (actual − estimate) of those among them still in flight when the last of them was admitted. With the
  prompt-only estimate a key therefore overshoots by at most the completions of its concurrently running
  requests — one response for a sequential client; with an upper-bound estimate (prompt + ``max_tokens``) it
  never overshoots.
* A request whose estimate alone exceeds ``tpm`` can never be admitted: 413 ``request_too_large_for_limit``
  (:class:`~qwen_serve.errors.TooLargeForLimit`) with ``x-should-retry: false``, whatever the other limits
  say — a 429 would be retried by clients (the OpenAI SDK for up to two minutes) and could never succeed.
* **concurrency** — unreleased leases.

Retry-After: rpm → until enough admissions leave the window; tpm → until enough finished charges leave it
(charges of requests in flight only free on release, so then at least 1 s); concurrency → 1 s.

Not thread-safe: call from the event loop only. :func:`estimate_prompt_tokens` is the cheap upfront estimate.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from qwen_serve.config import LimitsConfig
from qwen_serve.errors import ConfigError, RateLimited, TooLargeForLimit

__all__ = [
    "RESOLUTION_S",
    "SHARED_LIMITS_ENV",
    "WINDOW_S",
    "KeyLimits",
    "Lease",
    "LedgerView",
    "Limiter",
    "LocalLimiter",
    "build_limiter",
    "estimate_prompt_tokens",
    "refusal",
    "too_large",
]

WINDOW_S = 60.0
RESOLUTION_S = 0.1
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
        """Admit one request or raise :class:`RateLimited` (429) or, when no wait can admit it,
        :class:`TooLargeForLimit` (413). A principal whose ``tpm`` is None is not metered in tokens."""
        ...

    async def aclose(self) -> None: ...


class _NoLease:
    __slots__ = ()

    def release(self, actual_tokens: int | None = None) -> None:
        pass


_NO_LEASE = _NoLease()


class _Ledger:
    """Amounts booked over time, summed over a sliding window, in buckets of ``resolution`` seconds
    (``resolution`` 0: one bucket per booking). Oldest first; bucket i starts at ``starts[i]`` and holds
    ``amounts[i]``; ``total`` is the sum of ``amounts``. A booking counts for ``span`` (window + resolution)
    seconds from the start of its bucket; ``expiry`` is when the oldest bucket stops counting (infinity when
    empty), so the hot path asks "anything to forget?" with one comparison. Two deques of plain numbers
    rather than a deque of ``[start, amount]`` pairs: numbers are not tracked by the cyclic garbage
    collector, so a key's ledgers are two objects to it instead of up to 2 × W/R + 2."""

    # Measured with auth in bytes: −2.4% of a request's instructions (benchmarks/RESULTS.md, 2026-11-29,
    # "auth in bytes, limiter fast path").
    __slots__ = ("starts", "amounts", "total", "expiry", "resolution", "span")

    def __init__(self, resolution: float, span: float) -> None:
        self.starts: deque[float] = deque()
        self.amounts: deque[int] = deque()
        self.total = 0
        self.expiry = math.inf
        self.resolution = resolution
        self.span = span

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, now: float, amount: int) -> None:
        starts = self.starts
        if not starts:
            starts.append(now)
            self.amounts.append(amount)
            self.expiry = now + self.span
        elif now < starts[-1] + self.resolution:
            self.amounts[-1] += amount
        else:
            starts.append(now)
            self.amounts.append(amount)
        self.total += amount

    def prune(self, now: float) -> None:
        """Forget the buckets whose every booking is at least the window old (the same sum as in
        :meth:`wait_to_free`, so a Retry-After lands exactly on it)."""
        starts, amounts, span = self.starts, self.amounts, self.span
        while starts and starts[0] + span <= now:
            starts.popleft()
            self.total -= amounts.popleft()
        self.expiry = starts[0] + span if starts else math.inf

    def wait_to_free(self, amount: int, now: float) -> float | None:
        """Seconds until bookings totalling ``amount`` have left the window; None if they never will."""
        freed = 0
        for start, booked in zip(self.starts, self.amounts):
            freed += booked
            if freed >= amount:
                return start + self.span - now
        return None

    def newest_end(self) -> float | None:
        """When the newest bucket stops counting; None when empty."""
        return self.starts[-1] + self.span if self.starts else None


class LedgerView(Protocol):
    """What :func:`refusal` reads of a ledger (:class:`_Ledger`, or one in shared memory)."""

    @property
    def total(self) -> int: ...

    def wait_to_free(self, amount: int, now: float) -> float | None: ...

    def newest_end(self) -> float | None: ...


class _KeyState:
    __slots__ = ("starts", "done", "in_flight", "in_flight_tokens")

    def __init__(self, resolution: float, span: float) -> None:
        self.starts = _Ledger(resolution, span)  # admissions (rpm)
        self.done = _Ledger(resolution, span)  # actual tokens of finished requests, booked at release (tpm)
        self.in_flight = 0
        self.in_flight_tokens = 0  # sum of estimates of unreleased leases


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
        estimate = self._estimate
        if estimate is not None:
            state.in_flight_tokens -= estimate
            tokens = estimate if actual_tokens is None else int(actual_tokens)
            if tokens > 0:
                state.done.add(self._clock(), tokens)


class LocalLimiter:
    """In-memory :class:`Limiter` for one process; see the module docstring for the exact accounting.

    ``clock`` (seconds, monotonic), ``window_s`` and ``resolution_s`` (bucket width, 0 = exact log) are
    injectable for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S,
                 resolution_s: float = RESOLUTION_S) -> None:
        if not 0 <= resolution_s < window_s:
            raise ValueError("resolution_s must be >= 0 and below window_s")
        self._clock = clock
        self._window = window_s
        self._resolution = resolution_s
        self._span = window_s + resolution_s  # how long a booking counts, at most (see the module docstring)
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
        state = self._states.get(principal.key_id)
        if state is None:
            state = self._states[principal.key_id] = _KeyState(self._resolution, self._span)
        now = self._clock()
        starts, done = state.starts, state.done
        if now >= starts.expiry:
            starts.prune(now)
        if now >= done.expiry:
            done.prune(now)
        estimate = estimated_tokens if estimated_tokens > 0 else 0
        if tpm is not None and estimate > tpm:
            raise too_large(principal.key_id, estimate, tpm)
        if ((concurrency is not None and state.in_flight >= concurrency)
                or (rpm is not None and starts.total >= rpm)
                or (tpm is not None and state.in_flight_tokens + done.total + estimate > tpm)):
            raise self._refusal(principal, state, estimate, now)
        state.in_flight += 1
        if rpm is not None:
            starts.add(now, 1)
        if tpm is None:
            return _LocalLease(state, None, self._clock)
        state.in_flight_tokens += estimate
        return _LocalLease(state, estimate, self._clock)

    def _refusal(self, principal: KeyLimits, state: _KeyState, estimate: int, now: float) -> RateLimited:
        return refusal(principal, state.in_flight, state.in_flight_tokens, state.starts, state.done, estimate, now,
                       self._window)


def refusal(principal: KeyLimits, in_flight: int, in_flight_tokens: int, starts: LedgerView, done: LedgerView,
            estimate: int, now: float, window: float) -> RateLimited:
    """The 429 for a request that cannot be admitted (the module docstring's rules; every limiter uses it):
    of the limits that refuse, the one that frees last. ``starts``: the key's admissions; ``done``: the
    charges of its finished requests; ``in_flight``/``in_flight_tokens``: its unreleased leases and their
    estimates."""
    key_id, rpm, tpm, concurrency = principal.key_id, principal.rpm, principal.tpm, principal.max_concurrent
    refusals: list[RateLimited] = []
    if concurrency is not None and in_flight >= concurrency:
        refusals.append(RateLimited(
            f"Too many concurrent requests for API key '{key_id}': the limit is {concurrency}. "
            "Try again when one has finished.",
            limit="concurrency", retry_after=_UNKNOWN_WAIT_S, retryable=concurrency > 0,
        ))
    if rpm is not None and starts.total >= rpm:
        # Room once total - rpm + 1 admissions have left the window.
        wait = starts.wait_to_free(starts.total - rpm + 1, now) or window
        refusals.append(RateLimited(
            f"Rate limit reached for API key '{key_id}': {rpm} requests per minute. "
            f"Please try again in {_seconds(wait)}s.",
            limit="rpm", retry_after=wait, retryable=rpm > 0,
        ))
    used = in_flight_tokens + done.total
    if tpm is not None and used + estimate > tpm:  # estimate <= tpm: the caller refused the rest
        # Finished charges leaving may be enough; else a request in flight must finish first.
        freed_in = done.wait_to_free(used + estimate - tpm, now)
        if freed_in is None:
            end = done.newest_end()
            freed_in = max(_UNKNOWN_WAIT_S, end - now if end is not None else 0.0)
        refusals.append(RateLimited(
            f"Rate limit reached for API key '{key_id}': {tpm} tokens per minute (in use {used}, "
            f"requested {estimate}). Please try again in {_seconds(freed_in)}s.",
            limit="tpm", retry_after=freed_in,
        ))
    # A limit that never frees wins: no wait helps, whatever the others say.
    return max(refusals, key=lambda r: (not r.retryable, r.retry_after))


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def too_large(key_id: str, estimate: int, tpm: int) -> TooLargeForLimit:
    """The 413 for a request whose estimate alone exceeds the key's tpm."""
    return TooLargeForLimit(
        f"Request too large for API key '{key_id}': its estimated {estimate} prompt tokens exceed the limit of "
        f"{tpm} tokens per minute, so it can never be admitted. Shorten the prompt or ask for a higher tpm limit.",
        limit="tpm",
    )


SHARED_LIMITS_ENV = "QWEN_SERVE_SHARED_LIMITS"  # set by qwen_serve.workers in each gateway worker's environment


def build_limiter(config: LimitsConfig, *, shared_path: str | None = None,
                  on_backend_error: Callable[[str], None] | None = None) -> Limiter:
    """The :class:`Limiter` the config's ``limits`` section asks for.

    ``local`` → :class:`LocalLimiter`, or, in a gateway worker process (``gateway.workers`` > 1: ``shared_path``,
    by default the :data:`SHARED_LIMITS_ENV` variable the worker supervisor sets), the
    :class:`~qwen_serve.gateway.limits_shared.SharedLimiter` on that shared-memory file, so the workers of one
    host share every key's limits. ``redis`` → :class:`~qwen_serve.gateway.limits_redis.RedisLimiter` on
    ``limits.redis_url`` (shared by every gateway process and replica); ``on_backend_error(op)`` is called
    once per failed round trip to Redis. Raises :class:`ConfigError` when the backend cannot be built.
    """
    if config.backend == "local":
        path = shared_path if shared_path is not None else os.environ.get(SHARED_LIMITS_ENV)
        if path:
            from qwen_serve.gateway.limits_shared import SharedLimiter

            return SharedLimiter.attach(path, on_error=config.on_backend_error)
        return LocalLimiter()
    if config.backend == "redis":
        from qwen_serve.gateway.limits_redis import build_redis_limiter

        return build_redis_limiter(config, on_error=on_backend_error)
    raise ConfigError(f"limits.backend: {config.backend!r} is not a known backend; use 'local' or 'redis'")


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

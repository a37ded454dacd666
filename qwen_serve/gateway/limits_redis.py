"""Per-key rpm, tpm and concurrency limits shared by every gateway replica, kept in Redis.

:class:`RedisLimiter` is a :class:`~qwen_serve.gateway.limits.Limiter` with the accounting of
:class:`~qwen_serve.gateway.limits.LocalLimiter` (read that module's docstring: rpm admissions per window,
the tpm ledger with in-flight estimates, concurrency leases, 413 for an estimate over the tpm, 429 with
``limit`` and ``Retry-After``, a limit of 0 not retryable), but the state of a key lives in Redis, so the
limits hold for the key across all replicas together instead of per replica.

Contract:

* **Atomic, one round trip.** ``acquire`` runs one Lua script (prune, check every limit, book the admission);
  ``release`` runs one script, sent in the background (``Lease.release`` is synchronous). A release is
  applied before the same limiter's next ``acquire`` for that key, so a sequential client never races its
  own release. A request whose estimate alone exceeds the tpm gets its 413 without a round trip.
* **Server time.** The scripts read Redis' ``TIME``, so replicas with skewed clocks agree on every window.
* **Keys.** ``qwen-serve:limits:{<key_id>}:<part>`` (the braces are a Redis Cluster hash tag: a key's parts
  share one slot). Every write sets them to expire once nothing in them can count any more (window +
  bucket + lease TTL + 1 s), so an idle key leaves nothing behind.
* **Leases lapse.** A lease is a member of a sorted set scored by its deadline (now + ``lease_ttl_s``, 30 s).
  A background heartbeat (every ``lease_ttl_s / 3``) renews the leases this limiter holds; a lease whose
  gateway died (or was cut off from Redis for longer than the TTL) lapses: its concurrency slot and its
  in-flight estimate are freed and it is charged nothing (its request died with its gateway). A lapsed
  lease that is released later charges its tokens then.
* **Backend errors.** When Redis cannot be reached (connection, timeout or server error), ``acquire``
  follows ``on_backend_error``: ``fail_closed`` raises :class:`~qwen_serve.errors.LimiterUnavailable`
  (503 ``service_unavailable`` + ``Retry-After``), ``fail_open`` admits the request unmetered (its lease is
  a no-op). After a failure Redis is not asked again for ``retry_interval_s`` (1 s: no request waits for a
  timeout meanwhile); then the next request probes it, and on success metering resumes. A release or a
  heartbeat that fails is dropped (the lease lapses in Redis). Every request decided by the policy, and
  every failed release or heartbeat, counts once in ``qwen_serve_limiter_backend_errors_total{op}`` (``op``:
  ``acquire`` | ``release`` | ``heartbeat``), through the ``on_error`` callback
  (:func:`backend_error_counter` makes the Counter). One warning is logged when Redis becomes
  unreachable and one line when it is back; never a key or the URL.

Buckets: as in ``LocalLimiter``, a ledger (rpm admissions, tpm charges of finished requests) keeps
buckets of ``resolution_s`` (0.1 s; 0 = one entry per booking), at most W/R + 1 per key and ledger.

Call from one event loop. ``redis`` (``pip install 'qwen-serve[redis]'``) is imported by
:func:`build_redis_limiter`; this module imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from qwen_serve.config import LimitsConfig
from qwen_serve.errors import ConfigError, LimiterUnavailable, RateLimited, TooLargeForLimit
from qwen_serve.gateway.limits import RESOLUTION_S, WINDOW_S, KeyLimits, Lease

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BACKEND_ERRORS_METRIC",
    "KEY_PREFIX",
    "LEASE_TTL_S",
    "RedisLimiter",
    "backend_error_counter",
    "build_redis_limiter",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "qwen-serve:limits"
LEASE_TTL_S = 30.0  # a dead gateway's leases lapse within this
RETRY_INTERVAL_S = 1.0  # after a backend failure, how long requests get the policy without asking Redis
OP_TIMEOUT_S = 1.0  # per Redis command (socket read/write)
CONNECT_TIMEOUT_S = 0.5
BACKEND_ERRORS_METRIC = "qwen_serve_limiter_backend_errors"  # exported with the _total suffix
_UNKNOWN_WAIT_S = 1.0
_US = 1_000_000

# The parts of a key's state, in the order of the scripts' KEYS.
_PARTS = ("state", "rpm:t", "rpm:n", "tpm:t", "tpm:n", "leases", "est")

# --- Lua -------------------------------------------------------------------------------------------------
# KEYS: 1 state hash (fields rpm, tpm: ledger totals; est: estimates of live leases; seq: bucket ids),
# 2/3 rpm ledger (zset bucket id -> start, hash bucket id -> amount), 4/5 tpm ledger, 6 leases (zset
# lease id -> deadline), 7 est (hash lease id -> estimate). Times are integer microseconds. Numbers
# handed to redis.call go through num(): Lua would print a 16-digit time as 1.7e+15.

_PRELUDE = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function num(x)
  if x == 0 then return '0' end  -- not '-0', which Redis refuses as an integer
  return string.format('%.0f', x)
end
local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function touch(ttl_ms)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
end
local function ledger_prune(z, h, field, now, span)
  local limit = num(now - span)
  while true do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', limit, 'LIMIT', 0, 500)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', h, unpack(old))
    local freed = 0
    for i = 1, #old do freed = freed + (tonumber(amounts[i]) or 0) end
    redis.call('HDEL', h, unpack(old))
    redis.call('ZREM', z, unpack(old))
    redis.call('HINCRBY', KEYS[1], field, num(-freed))
    if #old < 500 then return end
  end
end
local function ledger_add(z, h, field, now, amount, resolution)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if #last > 0 and now < tonumber(last[2]) + resolution then
    redis.call('HINCRBY', h, last[1], num(amount))
  else
    local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    redis.call('ZADD', z, num(now), id)
    redis.call('HSET', h, id, num(amount))
  end
  redis.call('HINCRBY', KEYS[1], field, num(amount))
end
-- Microseconds until bookings totalling amount have left the window (oldest first); nil if they never will.
local function wait_to_free(z, h, amount, now, span)
  local freed, offset = 0, 0
  while true do
    local chunk = redis.call('ZRANGE', z, offset, offset + 199, 'WITHSCORES')
    if #chunk == 0 then return nil end
    local ids = {}
    for i = 1, #chunk, 2 do ids[#ids + 1] = chunk[i] end
    local amounts = redis.call('HMGET', h, unpack(ids))
    for j = 1, #ids do
      freed = freed + (tonumber(amounts[j]) or 0)
      if freed >= amount then return tonumber(chunk[2 * j]) + span - now end
    end
    offset = offset + 200
  end
end
local function prune_leases(now)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', num(now), 'LIMIT', 0, 500)
    if #gone == 0 then return end
    local estimates = redis.call('HMGET', KEYS[7], unpack(gone))
    local freed = 0
    for i = 1, #gone do freed = freed + (tonumber(estimates[i]) or 0) end
    redis.call('HDEL', KEYS[7], unpack(gone))
    redis.call('ZREM', KEYS[6], unpack(gone))
    if freed ~= 0 then redis.call('HINCRBY', KEYS[1], 'est', num(-freed)) end
    if #gone < 500 then return end
  end
end
"""

# ARGV: now override ('' = TIME), rpm, tpm, concurrency ('' = none), estimate, lease id, lease ttl (us),
# window (us), resolution (us), key ttl (ms).
# Returns {0} when admitted, else {1, concurrency full (0/1), leases, rpm total, rpm wait (us, -1 = rpm
# does not refuse), tokens in use, tpm wait (us, -1 = tpm does not refuse)}.
_ACQUIRE = _PRELUDE + r"""
local now = clock(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local estimate = tonumber(ARGV[5])
local window, resolution = tonumber(ARGV[8]), tonumber(ARGV[9])
local span = window + resolution
prune_leases(now)
ledger_prune(KEYS[2], KEYS[3], 'rpm', now, span)
ledger_prune(KEYS[4], KEYS[5], 'tpm', now, span)
local leases = redis.call('ZCARD', KEYS[6])
local state = redis.call('HMGET', KEYS[1], 'rpm', 'tpm', 'est')
local started = tonumber(state[1]) or 0
local used = (tonumber(state[2]) or 0) + (tonumber(state[3]) or 0)
local conc_full = conc ~= nil and leases >= conc
local rpm_full = rpm ~= nil and started >= rpm
local tpm_full = tpm ~= nil and used + estimate > tpm
if conc_full or rpm_full or tpm_full then
  local rpm_wait, tpm_wait = -1, -1
  if rpm_full then
    rpm_wait = wait_to_free(KEYS[2], KEYS[3], started - rpm + 1, now, span) or window
  end
  if tpm_full then
    tpm_wait = wait_to_free(KEYS[4], KEYS[5], used + estimate - tpm, now, span)
    if tpm_wait == nil then
      local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
      tpm_wait = 0
      if #last > 0 then tpm_wait = tonumber(last[2]) + span - now end
      tpm_wait = math.max(tpm_wait, 1000000)
    end
  end
  return {1, conc_full and 1 or 0, leases, started, num(rpm_wait), used, num(tpm_wait)}
end
redis.call('ZADD', KEYS[6], num(now + tonumber(ARGV[7])), ARGV[6])
if tpm ~= nil then
  redis.call('HSET', KEYS[7], ARGV[6], num(estimate))
  redis.call('HINCRBY', KEYS[1], 'est', num(estimate))
end
if rpm ~= nil then ledger_add(KEYS[2], KEYS[3], 'rpm', now, 1, resolution) end
touch(ARGV[10])
return {0}
"""

# ARGV: now override, lease id, tokens to charge ('' = none), resolution (us), key ttl (ms).
_RELEASE = _PRELUDE + r"""
local now = clock(ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[2])
local estimate = redis.call('HGET', KEYS[7], ARGV[2])
if estimate then
  redis.call('HDEL', KEYS[7], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'est', num(-tonumber(estimate)))
end
local tokens = tonumber(ARGV[3])
if tokens ~= nil and tokens > 0 then ledger_add(KEYS[4], KEYS[5], 'tpm', now, tokens, tonumber(ARGV[4])) end
touch(ARGV[5])
return 0
"""

# ARGV: now override, lease ttl (us), key ttl (ms), lease ids... Renews the leases that have not lapsed
# (a pruned lease stays gone); returns how many were renewed.
_RENEW = _PRELUDE + r"""
local deadline = num(clock(ARGV[1]) + tonumber(ARGV[2]))
local renewed = 0
for i = 4, #ARGV do renewed = renewed + redis.call('ZADD', KEYS[6], 'XX', 'CH', deadline, ARGV[i]) end
touch(ARGV[3])
return renewed
"""


# --- metric ----------------------------------------------------------------------------------------------


def backend_error_counter(registry: CollectorRegistry | None) -> Counter:
    """``qwen_serve_limiter_backend_errors_total{op}`` on ``registry`` (``op``: ``acquire`` — a request
    decided by ``on_backend_error``; ``release``, ``heartbeat`` — a round trip that failed)."""
    return Counter(BACKEND_ERRORS_METRIC,
                   "Limiter store (Redis) failures: requests decided by limits.on_backend_error (op=acquire), "
                   "failed lease releases and heartbeats.", ["op"], registry=registry)


# --- leases ----------------------------------------------------------------------------------------------


class _NoLease:
    def release(self, actual_tokens: int | None = None) -> None:
        pass


_NO_LEASE = _NoLease()


class _RedisLease:
    """A lease booked in Redis; :meth:`release` sends the release script in the background."""

    def __init__(self, limiter: RedisLimiter, key_id: str, lease_id: str, estimate: int | None) -> None:
        self._limiter = limiter
        self.key_id = key_id
        self.lease_id = lease_id
        self.estimate = estimate  # None: tokens not tracked (no tpm at admission)
        self._released = False

    def release(self, actual_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self, actual_tokens)


# --- the limiter -----------------------------------------------------------------------------------------


class RedisLimiter:
    """:class:`~qwen_serve.gateway.limits.Limiter` on a shared Redis; see the module docstring.

    ``client`` is a ``redis.asyncio.Redis`` (closed by :meth:`aclose`). ``on_error(op)`` is called once per
    backend error (see :func:`backend_error_counter`). ``clock`` (seconds) replaces Redis' ``TIME`` — for
    tests only: every replica must share one clock. ``prefix`` namespaces the keys.
    """

    def __init__(self, client: Redis, *, on_backend_error: str = "fail_closed",
                 on_error: Callable[[str], None] | None = None, lease_ttl_s: float = LEASE_TTL_S,
                 heartbeat_s: float | None = None, window_s: float = WINDOW_S, resolution_s: float = RESOLUTION_S,
                 retry_interval_s: float = RETRY_INTERVAL_S, prefix: str = KEY_PREFIX,
                 clock: Callable[[], float] | None = None) -> None:
        from redis.exceptions import RedisError

        if on_backend_error not in ("fail_closed", "fail_open"):
            raise ValueError("on_backend_error must be 'fail_closed' or 'fail_open'")
        if not 0 <= resolution_s < window_s:
            raise ValueError("resolution_s must be >= 0 and below window_s")
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        self._client = client
        self._fail_open = on_backend_error == "fail_open"
        self._on_error = on_error
        self._lease_ttl_us = _us(lease_ttl_s)
        self._heartbeat_s = heartbeat_s if heartbeat_s is not None else lease_ttl_s / 3
        self._window_us = _us(window_s)
        self._resolution_us = _us(resolution_s)
        self._key_ttl_ms = math.ceil((window_s + resolution_s + lease_ttl_s) * 1000) + 1000
        self._retry_interval_s = retry_interval_s
        self._prefix = prefix
        self._clock = clock
        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._acquire_script = client.register_script(_ACQUIRE)
        self._release_script = client.register_script(_RELEASE)
        self._renew_script = client.register_script(_RENEW)
        self._gateway_id = secrets.token_hex(6)  # lease ids: unique per limiter instance
        self._ids = itertools.count(1)
        self._held: dict[str, dict[str, _RedisLease]] = {}  # key id -> lease id -> lease
        self._releasing: dict[str, set[asyncio.Task[None]]] = {}  # key id -> release round trips under way
        self._heartbeat: asyncio.Task[None] | None = None
        self._retry_at = -math.inf  # monotonic: until then the store is considered down
        self._down_since: float | None = None
        self._closed = False

    # ------------------------------------------------------------------ Limiter
    async def acquire(self, principal: KeyLimits, estimated_tokens: int) -> Lease:
        key_id, rpm, tpm, concurrency = principal.key_id, principal.rpm, principal.tpm, principal.max_concurrent
        if rpm is None and tpm is None and concurrency is None:
            return _NO_LEASE
        estimate = estimated_tokens if estimated_tokens > 0 else 0
        if tpm is not None and estimate > tpm:
            raise _too_large(key_id, estimate, tpm)
        if time.monotonic() < self._retry_at:
            return self._policy("acquire")
        pending = self._releasing.get(key_id)
        if pending:  # this limiter's own releases of the key land first
            await asyncio.wait(set(pending))
        lease_id = f"{self._gateway_id}:{next(self._ids)}"
        args = [self._now_arg(), _opt(rpm), _opt(tpm), _opt(concurrency), estimate, lease_id, self._lease_ttl_us,
                self._window_us, self._resolution_us, self._key_ttl_ms]
        try:
            reply = await self._acquire_script(keys=self._keys(key_id), args=args)
        except self._failures as exc:
            self._failed("acquire", exc)
            return self._policy(None)
        self._recovered()
        if int(reply[0]) != 0:
            raise _refusal(principal, [int(x) for x in reply], estimate)
        lease = _RedisLease(self, key_id, lease_id, estimate if tpm is not None else None)
        self._held.setdefault(key_id, {})[lease_id] = lease
        self._ensure_heartbeat()
        return lease

    async def aclose(self) -> None:
        """Stop the heartbeat, wait (bounded by the client's timeouts) for releases under way, close the
        client. Leases still held are not released: they lapse within ``lease_ttl_s``."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.settle()
        self._held.clear()
        await self._client.aclose()

    # ------------------------------------------------------------------ extras
    async def settle(self) -> None:
        """Wait until every release sent so far has been applied (or has failed)."""
        tasks = {task for tasks in self._releasing.values() for task in tasks}
        if tasks:
            await asyncio.wait(tasks)

    @property
    def backend_down(self) -> bool:
        """Whether the last round trip to Redis failed."""
        return self._down_since is not None

    def held(self) -> int:
        """Leases this limiter holds (renewed by its heartbeat)."""
        return sum(len(leases) for leases in self._held.values())

    # ------------------------------------------------------------------ internals
    def _keys(self, key_id: str) -> list[str]:
        base = f"{self._prefix}:{{{key_id}}}:"
        return [base + part for part in _PARTS]

    def _now_arg(self) -> str | int:
        return "" if self._clock is None else _us(self._clock())

    def _policy(self, op: str | None) -> Lease:
        """The configured answer when Redis cannot be asked; counts the request when ``op`` is given (a
        failed round trip has been counted already)."""
        if op is not None:
            self._count(op)
        if self._fail_open:
            return _NO_LEASE
        raise LimiterUnavailable(
            "The rate-limit store cannot be reached, so the request cannot be metered and is refused. "
            "Please try again shortly.", retry_after=max(1.0, self._retry_interval_s))

    def _count(self, op: str) -> None:
        if self._on_error is not None:
            self._on_error(op)

    def _failed(self, op: str, exc: BaseException) -> None:
        self._count(op)
        now = time.monotonic()
        self._retry_at = now + self._retry_interval_s
        if self._down_since is None:
            self._down_since = now
            log.warning("the rate-limit store (Redis) is unreachable (%s: %s); requests are %s until it is back",
                        type(exc).__name__, str(exc)[:200],
                        "admitted unmetered" if self._fail_open else "refused with 503")

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info("the rate-limit store (Redis) is reachable again after %.1f s; limits are metered again",
                        time.monotonic() - self._down_since)
            self._down_since = None
            self._retry_at = -math.inf

    def _release(self, lease: _RedisLease, actual_tokens: int | None) -> None:
        held = self._held.get(lease.key_id)
        if held is not None:
            held.pop(lease.lease_id, None)
            if not held:
                del self._held[lease.key_id]
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop: the lease lapses in Redis
            return
        if lease.estimate is None:
            tokens: str | int = ""
        else:
            tokens = lease.estimate if actual_tokens is None else int(actual_tokens)
        task = loop.create_task(self._send_release(lease, tokens, self._now_arg()))
        tasks = self._releasing.setdefault(lease.key_id, set())
        tasks.add(task)
        task.add_done_callback(lambda t: self._release_done(lease.key_id, t))

    async def _send_release(self, lease: _RedisLease, tokens: str | int, now: str | int) -> None:
        args = [now, lease.lease_id, tokens, self._resolution_us, self._key_ttl_ms]
        try:
            await self._release_script(keys=self._keys(lease.key_id), args=args)
        except self._failures as exc:
            self._failed("release", exc)
        else:
            self._recovered()

    def _release_done(self, key_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._releasing.get(key_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._releasing[key_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("lease release failed", exc_info=task.exception())

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="limits-heartbeat")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self.renew()

    async def renew(self) -> None:
        """Push the deadline of every lease this limiter holds to now + ``lease_ttl_s`` (one pipelined
        round trip; the heartbeat calls it every ``lease_ttl_s / 3``)."""
        if not self._held:
            return
        now = self._now_arg()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key_id, leases in list(self._held.items()):
                    await self._renew_script(keys=self._keys(key_id),
                                             args=[now, self._lease_ttl_us, self._key_ttl_ms, *leases],
                                             client=pipe)
                await pipe.execute()
        except self._failures as exc:
            self._failed("heartbeat", exc)
        else:
            self._recovered()


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _opt(value: int | None) -> int | str:
    return "" if value is None else value


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def _too_large(key_id: str, estimate: int, tpm: int) -> TooLargeForLimit:
    return TooLargeForLimit(
        f"Request too large for API key '{key_id}': its estimated {estimate} prompt tokens exceed the limit of "
        f"{tpm} tokens per minute, so it can never be admitted. Shorten the prompt or ask for a higher tpm limit.",
        limit="tpm",
    )


def _refusal(principal: KeyLimits, reply: Sequence[int], estimate: int) -> RateLimited:
    """The 429 for the acquire script's refusal: of the limits that refuse, the one that frees last (a limit
    that never frees first), worded as ``LocalLimiter`` words it."""
    _, concurrency_full, _, _, rpm_wait, used, tpm_wait = reply
    key_id, rpm, tpm, concurrency = principal.key_id, principal.rpm, principal.tpm, principal.max_concurrent
    refusals: list[RateLimited] = []
    if concurrency_full and concurrency is not None:
        refusals.append(RateLimited(
            f"Too many concurrent requests for API key '{key_id}': the limit is {concurrency}. "
            "Try again when one has finished.",
            limit="concurrency", retry_after=_UNKNOWN_WAIT_S, retryable=concurrency > 0,
        ))
    if rpm_wait >= 0 and rpm is not None:
        wait = rpm_wait / _US
        refusals.append(RateLimited(
            f"Rate limit reached for API key '{key_id}': {rpm} requests per minute. "
            f"Please try again in {_seconds(wait)}s.",
            limit="rpm", retry_after=wait, retryable=rpm > 0,
        ))
    if tpm_wait >= 0 and tpm is not None:
        wait = tpm_wait / _US
        refusals.append(RateLimited(
            f"Rate limit reached for API key '{key_id}': {tpm} tokens per minute (in use {used}, "
            f"requested {estimate}). Please try again in {_seconds(wait)}s.",
            limit="tpm", retry_after=wait,
        ))
    return max(refusals, key=lambda r: (not r.retryable, r.retry_after))


# --- from config -----------------------------------------------------------------------------------------


def build_redis_limiter(config: LimitsConfig, *, registry: CollectorRegistry | None = None,
                        on_error: Callable[[str], None] | None = None, op_timeout_s: float = OP_TIMEOUT_S,
                        connect_timeout_s: float = CONNECT_TIMEOUT_S, **options: Any) -> RedisLimiter:
    """The :class:`RedisLimiter` for ``limits.backend: redis``: a client for ``limits.redis_url`` (it connects
    on first use, so the gateway starts while Redis is down) and ``limits.on_backend_error``.

    Backend errors go to ``on_error(op)``; without it, and with a ``registry``, to
    :func:`backend_error_counter` on that registry. ``options`` go to :class:`RedisLimiter`. Raises
    :class:`ConfigError` when the ``redis`` package is missing or the URL is absent or unusable (the message
    never echoes the URL: it may hold a password).
    """
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ConfigError("limits.backend: 'redis' needs the redis package: pip install 'qwen-serve[redis]'") from None
    if config.redis_url is None:
        raise ConfigError("limits.redis_url: required when limits.backend is redis")
    if on_error is None and registry is not None:
        counter = backend_error_counter(registry)

        def on_error(op: str) -> None:
            counter.labels(op).inc()

    try:
        # One immediate retry: a pooled connection that Redis closed (a restart) is re-made once, not counted.
        client = Redis.from_url(config.redis_url, socket_timeout=op_timeout_s,
                                socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 1))
    except ValueError:
        raise ConfigError("limits.redis_url: not a usable redis URL") from None
    return RedisLimiter(client, on_backend_error=config.on_backend_error, on_error=on_error, **options)

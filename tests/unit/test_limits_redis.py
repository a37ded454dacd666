"""qwen_serve.gateway.limits_redis: the shared limiter against a real ``redis-server`` on 127.0.0.1.

* The scenarios and the property test of ``test_limits.py`` run unchanged on a :class:`RedisLimiter` whose
  time comes from their fake clock (the scripts take it instead of Redis' ``TIME``), through a synchronous
  adapter with ``LocalLimiter``'s face.
* In real time: two limiters ("gateways") share one key's rpm, tpm and concurrency; a lease whose holder
  died lapses while a living holder's heartbeat keeps its own; idle keys expire; Redis killed mid-run →
  ``on_backend_error`` (503 or unmetered), the metric counts, and metering resumes after a restart.

Each test gets its own key prefix; the kill/restart tests their own server. Without ``redis-server`` the
tests fail when ``QWEN_SERVE_REQUIRE_ENGINE=1`` (CI) and skip otherwise.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import tests.unit.test_limits as local_suite
from qwen_serve.config import LimitsConfig, parse_config
from qwen_serve.errors import ConfigError, LimiterUnavailable, RateLimited, TooLargeForLimit
from qwen_serve.gateway.auth import Principal
from qwen_serve.gateway.limits import RESOLUTION_S, WINDOW_S, Lease
from qwen_serve.gateway.limits_redis import BACKEND_ERRORS_METRIC, RedisLimiter, build_redis_limiter
from tests.conftest import free_port
from tests.redis_server import RedisServer, redis_asyncio, require_redis_server

T = TypeVar("T")


def key(rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None,
        key_id: str = "k") -> Principal:
    return Principal(key_id, ("*",), rpm, tpm, max_concurrent)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server for this test alone (killed and restarted by it), with a password that must never be logged."""
    require_redis_server()
    server = RedisServer(tmp_path, free_port(), password="s3cret-pw")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex}"


def _limiter(url: str, **options: Any) -> RedisLimiter:
    options.setdefault("prefix", _prefix())
    return RedisLimiter(redis_asyncio.Redis.from_url(url), **options)


async def _keys(url: str, pattern: str) -> list[bytes]:
    client = redis_asyncio.Redis.from_url(url)
    try:
        return sorted([k async for k in client.scan_iter(match=pattern, count=1000)])
    finally:
        await client.aclose()


# --- LocalLimiter's face, for test_limits' scenarios --------------------------------------------------------


class SyncLease:
    def __init__(self, owner: SyncRedisLimiter, lease: Lease) -> None:
        self._owner = owner
        self._lease = lease

    def release(self, actual_tokens: int | None = None) -> None:
        """Release and wait until Redis applied it (the scenarios acquire right after)."""
        async def release() -> None:
            self._lease.release(actual_tokens)
            await self._owner.limiter.settle()
            assert not self._owner.limiter.backend_down, "the release script failed"

        self._owner.run(release())


class SyncRedisLimiter:
    """``LocalLimiter.try_acquire`` over a :class:`RedisLimiter` on the scenario's fake clock (seconds; the
    leases never lapse on their own: the scenarios advance the clock by hours)."""

    def __init__(self, runner: asyncio.Runner, url: str, clock: Callable[[], float], window_s: float = WINDOW_S,
                 resolution_s: float = RESOLUTION_S) -> None:
        self._runner = runner
        self.limiter = _limiter(url, clock=clock, window_s=window_s, resolution_s=resolution_s, lease_ttl_s=1e9)

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return self._runner.run(wrapped())

    def try_acquire(self, principal: Principal, estimated_tokens: int) -> SyncLease:
        return SyncLease(self, self.run(self.limiter.acquire(principal, estimated_tokens)))


SyncFactory = Callable[..., SyncRedisLimiter]


@pytest.fixture
def make_sync(redis_server: RedisServer) -> Iterator[SyncFactory]:
    """``make(clock, window_s=..., resolution_s=...)``: a fresh synchronous Redis limiter (own key prefix)."""
    made: list[SyncRedisLimiter] = []
    with asyncio.Runner() as runner:
        def make(clock: Callable[[], float], window_s: float = WINDOW_S,
                 resolution_s: float = RESOLUTION_S) -> SyncRedisLimiter:
            limiter = SyncRedisLimiter(runner, redis_server.url, clock, window_s, resolution_s)
            made.append(limiter)
            return limiter

        try:
            yield make
        finally:
            for limiter in made:
                runner.run(limiter.limiter.aclose())


# Scenarios of test_limits.py taking (limiter[, clock]); their fake clock drives the Redis scripts.
SCENARIOS = [
    "test_burst_over_rpm_admits_exactly_the_limit",
    "test_rpm_window_slides",
    "test_keys_are_independent",
    "test_lowered_limit_after_reload_waits_for_enough_to_leave",
    "test_concurrency",
    "test_slowest_refusal_is_reported",
    "test_tpm_counts_the_estimate_while_in_flight",
    "test_tpm_reconciles_with_actual_usage",
    "test_tpm_overestimate_is_refunded",
    "test_tpm_retry_after_counts_only_what_must_leave",
    "test_request_larger_than_tpm_is_413_not_a_retryable_429",
    "test_a_zero_limit_is_reported_over_one_that_frees",
    "test_retryable_429s_do_not_say_should_retry",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_local_limiter_scenario_holds_on_redis(name: str, make_sync: SyncFactory) -> None:
    scenario = getattr(local_suite, name)
    clock = local_suite.Clock()
    given_args = {"limiter": make_sync(clock, resolution_s=0), "clock": clock}  # as test_limits' fixtures
    scenario(**{arg: given_args[arg] for arg in inspect.signature(scenario).parameters})


@pytest.mark.parametrize("limits,limit", [({"rpm": 0}, "rpm"), ({"max_concurrent": 0}, "concurrency")])
def test_a_limit_of_zero_is_a_429_no_wait_can_fix(make_sync: SyncFactory, limits: dict[str, int], limit: str) -> None:
    limiter: Any = make_sync(local_suite.Clock(), resolution_s=0)
    local_suite.test_a_limit_of_zero_is_a_429_no_wait_can_fix(limiter, limits, limit)


def test_buckets_count_an_admission_at_most_one_resolution_longer(make_sync: SyncFactory) -> None:
    with mock.patch.object(local_suite, "LocalLimiter", lambda clock: make_sync(clock)):
        local_suite.test_buckets_count_an_admission_at_most_one_resolution_longer(local_suite.Clock())


def test_too_large_is_refused_without_booking_anything(make_sync: SyncFactory) -> None:
    clock = local_suite.Clock()
    limiter = make_sync(clock, resolution_s=0)
    principal = key(rpm=2, tpm=100, max_concurrent=2)
    limiter.try_acquire(principal, 10)
    with pytest.raises(TooLargeForLimit):
        limiter.try_acquire(principal, 101)
    limiter.try_acquire(principal, 10)  # the refusal took neither an rpm admission nor a concurrency slot
    with pytest.raises(RateLimited):
        limiter.try_acquire(principal, 10)


def test_zero_token_leases_release_cleanly(make_sync: SyncFactory) -> None:
    limiter = make_sync(local_suite.Clock(), resolution_s=0)
    principal = key(tpm=1, max_concurrent=1)
    limiter.try_acquire(principal, 0).release()  # charges nothing: an increment of 0, never "-0"
    limiter.try_acquire(principal, 0).release(0)
    limiter.try_acquire(principal, 1).release(0)
    limiter.try_acquire(principal, 1).release()
    with pytest.raises(RateLimited):
        limiter.try_acquire(principal, 1)


async def test_unlimited_principal_touches_nothing(redis_server: RedisServer) -> None:
    limiter = _limiter(redis_server.url)
    try:
        for _ in range(100):
            (await limiter.acquire(Principal("anonymous"), 10**9)).release(10**9)
        await limiter.settle()
        assert await _keys(redis_server.url, limiter._prefix + ":*") == []
        assert limiter.held() == 0
    finally:
        await limiter.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=local_suite.ops, limit=local_suite.limits, upper_bound=st.booleans(),
       resolution=st.sampled_from([0, 1, 100, 7_000]))
def test_no_window_admits_more_than_its_limit(
    make_sync: SyncFactory, operations: list[tuple[object, ...]], limit: tuple[int | None, int | None, int | None],
    upper_bound: bool, resolution: int,
) -> None:
    """test_limits' property (and its independent model of every decision) with Redis doing the accounting."""
    def factory(clock: Callable[[], float], window_s: float, resolution_s: float) -> SyncRedisLimiter:
        return make_sync(clock, window_s=window_s, resolution_s=resolution_s)

    check = local_suite.test_no_window_admits_more_than_its_limit.hypothesis.inner_test  # type: ignore[attr-defined]
    with mock.patch.object(local_suite, "LocalLimiter", factory):
        check(operations=operations, limit=limit, upper_bound=upper_bound, resolution=resolution)


# --- real time: Redis' clock ------------------------------------------------------------------------------


async def test_keys_are_namespaced_and_retry_after_follows_redis_time(redis_server: RedisServer) -> None:
    key_id = f"team-{uuid.uuid4().hex[:8]}"
    limiter = RedisLimiter(redis_asyncio.Redis.from_url(redis_server.url))  # the default prefix
    try:
        lease = await limiter.acquire(key(rpm=1, tpm=1000, max_concurrent=2, key_id=key_id), 10)
        keys = await _keys(redis_server.url, f"qwen-serve:limits:{{{key_id}}}:*")
        assert {k.decode().rsplit("}:", 1)[1] for k in keys} == {"state", "rpm:t", "rpm:n", "leases", "est"}
        with pytest.raises(RateLimited) as info:
            await limiter.acquire(key(rpm=1, tpm=1000, max_concurrent=2, key_id=key_id), 10)
        assert info.value.limit == "rpm" and 59 <= info.value.retry_after <= 60 + RESOLUTION_S
        lease.release(25)
        await limiter.settle()
        client = redis_asyncio.Redis.from_url(redis_server.url)
        try:
            base = f"qwen-serve:limits:{{{key_id}}}:"
            state = await client.hgetall(base + "state")
            assert int(state[b"rpm"]) == 1 and int(state[b"tpm"]) == 25 and int(state[b"est"]) == 0
            assert await client.zcard(base + "leases") == 0
            ttls = [await client.pttl(k) for k in await _keys(redis_server.url, base + "*")]
            assert ttls and all(0 < ttl <= (WINDOW_S + RESOLUTION_S + 30) * 1000 + 1000 for ttl in ttls)
        finally:
            await client.aclose()
    finally:
        await limiter.aclose()


async def test_idle_keys_leave_nothing_behind(redis_server: RedisServer) -> None:
    limiter = _limiter(redis_server.url, window_s=0.5, resolution_s=0.1, lease_ttl_s=0.5)
    try:
        principal = key(rpm=5, tpm=1000, max_concurrent=2)
        (await limiter.acquire(principal, 10)).release(20)
        await limiter.settle()
        pattern = limiter._prefix + ":*"
        assert await _keys(redis_server.url, pattern)
        deadline = time.monotonic() + 6  # expiry: window + bucket + lease TTL + 1 s = 2.1 s
        while await _keys(redis_server.url, pattern):
            assert time.monotonic() < deadline, "a key's state outlived its expiry"
            await asyncio.sleep(0.2)
    finally:
        await limiter.aclose()


# --- two gateways -----------------------------------------------------------------------------------------


async def test_two_gateways_never_exceed_one_rpm_together(redis_server: RedisServer) -> None:
    prefix = _prefix()
    a, b = _limiter(redis_server.url, prefix=prefix), _limiter(redis_server.url, prefix=prefix)
    try:
        principal = key(rpm=10)
        outcomes = await asyncio.gather(*(limiter.acquire(principal, 0) for limiter in (a, b) * 20),
                                        return_exceptions=True)
        admitted = [o for o in outcomes if not isinstance(o, BaseException)]
        refusals = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(admitted) == 10 and len(refusals) == 30
        assert all(isinstance(r, RateLimited) and r.limit == "rpm" and 0 < r.retry_after <= 60 + RESOLUTION_S
                   for r in refusals)
        for lease in admitted:
            lease.release()
        for limiter in (a, b):  # releases do not give rpm back: still nothing for either gateway
            await limiter.settle()
            with pytest.raises(RateLimited):
                await limiter.acquire(principal, 0)
    finally:
        await a.aclose()
        await b.aclose()


async def test_two_gateways_share_concurrency_and_tpm(redis_server: RedisServer) -> None:
    prefix = _prefix()
    a, b = _limiter(redis_server.url, prefix=prefix), _limiter(redis_server.url, prefix=prefix)
    try:
        principal = key(tpm=100, max_concurrent=3)
        first = await a.acquire(principal, 30)
        await a.acquire(principal, 30)
        await b.acquire(principal, 30)
        for limiter in (a, b):
            with pytest.raises(RateLimited) as info:
                await limiter.acquire(principal, 0)
            assert info.value.limit == "concurrency"
        first.release(5)  # gateway A's request ends with 5 tokens
        await a.settle()
        with pytest.raises(RateLimited) as info:
            await b.acquire(principal, 40)  # 30 + 30 in flight + 5 charged + 40 > 100
        assert info.value.limit == "tpm" and "in use 65" in info.value.message
        await b.acquire(principal, 35)  # exactly 100 across both gateways
        assert (a.held(), b.held()) == (1, 2)
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_dead_gateways_lease_lapses_and_a_living_ones_does_not(redis_server: RedisServer) -> None:
    prefix, ttl = _prefix(), 1.0
    alive, doomed, other = (_limiter(redis_server.url, prefix=prefix, lease_ttl_s=ttl) for _ in range(3))
    try:
        held = key(max_concurrent=1, tpm=100, key_id="held")
        dies = key(max_concurrent=1, tpm=100, key_id="dies")
        await alive.acquire(held, 60)
        await doomed.acquire(dies, 60)
        await asyncio.sleep(2.5 * ttl)  # the heartbeat (every ttl / 3) keeps the living holder's lease
        with pytest.raises(RateLimited) as info:
            await other.acquire(held, 60)
        assert info.value.limit == "concurrency"  # tpm is full too, and frees no later
        await doomed.aclose()  # the gateway dies: no release, no heartbeat
        died = time.monotonic()
        deadline = died + ttl + 3
        while True:
            try:
                lease = await other.acquire(dies, 100)  # its slot and its 60 in-flight tokens are free again
                break
            except RateLimited:
                assert time.monotonic() < deadline, "a dead gateway's lease did not lapse"
                await asyncio.sleep(0.05)
        assert time.monotonic() - died <= ttl + 1.0  # renewed at most ttl / 3 before it died
        lease.release(0)
        with pytest.raises(RateLimited):
            await other.acquire(held, 60)  # meanwhile the living holder still holds its own
    finally:
        for limiter in (alive, doomed, other):
            await limiter.aclose()


# --- Redis goes away --------------------------------------------------------------------------------------


def _policy_limiter(server: RedisServer, policy: str) -> tuple[RedisLimiter, CollectorRegistry]:
    registry = CollectorRegistry()
    config = parse_config({"model": {"source": "x"},
                           "limits": {"backend": "redis", "redis_url": server.url, "on_backend_error": policy}}).limits
    return build_redis_limiter(config, registry=registry, retry_interval_s=0.2, prefix=_prefix()), registry


def _errors(registry: CollectorRegistry, op: str) -> float:
    return registry.get_sample_value(BACKEND_ERRORS_METRIC + "_total", {"op": op}) or 0.0


async def _until_metered(limiter: RedisLimiter, principal: Principal, timeout: float = 10) -> Lease:
    """Acquire until Redis itself answers (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lease = await limiter.acquire(principal, 0)
        except LimiterUnavailable:
            lease = None
        if lease is not None and not limiter.backend_down and limiter.held() > 0:
            return lease
        assert time.monotonic() < deadline, "metering did not resume after Redis came back"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_redis_killed_mid_run_follows_the_policy_then_recovers(
    own_redis: RedisServer, policy: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qwen_serve.gateway.limits_redis")
    limiter, registry = _policy_limiter(own_redis, policy)
    principal = key(rpm=3, max_concurrent=5, key_id="team-secretive")
    try:
        lease = await limiter.acquire(principal, 0)
        assert limiter.held() == 1 and _errors(registry, "acquire") == 0

        own_redis.kill()
        outage = 6  # more than the rpm: unmetered requests are not counted against it
        for i in range(outage):
            if policy == "fail_closed":
                with pytest.raises(LimiterUnavailable) as info:
                    await limiter.acquire(principal, 0)
                exc = info.value
                assert (exc.status, exc.type, exc.code) == (503, "service_unavailable", "service_unavailable")
                assert exc.headers == {"retry-after": "1"} and "rate-limit store" in exc.message
            else:
                (await limiter.acquire(principal, 0)).release(10)  # admitted, unmetered: a no-op lease
            assert _errors(registry, "acquire") == i + 1  # every request decided by the policy counts once
            if i == 2:
                await asyncio.sleep(0.25)  # past retry_interval_s: the next request probes Redis again
        assert limiter.backend_down
        lease.release()  # its round trip fails: dropped (the lease lapses), counted
        await limiter.settle()
        assert _errors(registry, "release") == 1 and limiter.held() == 0

        own_redis.start()  # empty, as after a restart without persistence
        first = await _until_metered(limiter, principal)
        await limiter.acquire(principal, 0)
        await limiter.acquire(principal, 0)
        with pytest.raises(RateLimited) as refusal:
            await limiter.acquire(principal, 0)  # the rpm of 3 is enforced again
        assert refusal.value.limit == "rpm"
        first.release()
        await limiter.settle()
        assert _errors(registry, "release") == 1
        assert "unreachable" in caplog.text and "reachable again" in caplog.text
        assert "s3cret-pw" not in caplog.text and "team-secretive" not in caplog.text
    finally:
        await limiter.aclose()


async def test_heartbeat_failures_count_and_stop_nothing(own_redis: RedisServer) -> None:
    limiter, registry = _policy_limiter(own_redis, "fail_closed")
    try:
        await limiter.acquire(key(max_concurrent=1), 0)
        await limiter.renew()
        assert _errors(registry, "heartbeat") == 0
        own_redis.kill()
        await limiter.renew()
        assert _errors(registry, "heartbeat") == 1 and limiter.backend_down and limiter.held() == 1
    finally:
        await limiter.aclose()


# --- construction -----------------------------------------------------------------------------------------


def test_build_needs_a_url_and_never_echoes_it() -> None:
    require_redis_server()
    with pytest.raises(ConfigError, match="limits.redis_url: required"):
        build_redis_limiter(LimitsConfig())
    url = "redis://:pw-s3cret@127.0.0.1:notaport/0"
    config = parse_config({"model": {"source": "x"}, "limits": {"backend": "redis", "redis_url": url}}).limits
    with pytest.raises(ConfigError) as info:
        build_redis_limiter(config)
    assert "s3cret" not in info.value.message and info.value.message.startswith("limits.redis_url:")


@pytest.mark.parametrize("options,message", [
    ({"on_backend_error": "retry"}, "on_backend_error"),
    ({"resolution_s": 60}, "resolution_s"),
    ({"lease_ttl_s": 0}, "lease_ttl_s"),
])
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    require_redis_server()
    with pytest.raises(ValueError, match=message):
        RedisLimiter(redis_asyncio.Redis.from_url("redis://127.0.0.1:1"), **options)

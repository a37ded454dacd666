"""qwen_serve.gateway.limits: rpm / tpm / concurrency accounting, Retry-After, the prompt estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_serve.config import LimitsConfig, parse_config
from qwen_serve.errors import ConfigError, RateLimited, TooLargeForLimit
from qwen_serve.gateway.auth import Principal
from qwen_serve.gateway.limits import RESOLUTION_S, WINDOW_S, LocalLimiter, build_limiter, estimate_prompt_tokens
from tests.redis_server import require_redis_package


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key(rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None, key_id: str = "k") -> Principal:
    return Principal(key_id, ("*",), rpm, tpm, max_concurrent)


def refused(limiter: LocalLimiter, principal: Principal, tokens: int = 0) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        limiter.try_acquire(principal, tokens)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    return info.value


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LocalLimiter:
    """The exact per-request log (resolution 0), so boundaries can be checked to the second; the bucketed
    default is checked against it below and by the property test."""
    return LocalLimiter(clock=clock, resolution_s=0)


# --- rpm --------------------------------------------------------------------------------------------------


def test_burst_over_rpm_admits_exactly_the_limit(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(rpm=10)
    admitted = refusals = 0
    for _ in range(25):
        try:
            limiter.try_acquire(principal, 0).release()
            admitted += 1
        except RateLimited as exc:
            refusals += 1
            assert exc.limit == "rpm" and exc.retry_after == pytest.approx(60)
    assert (admitted, refusals) == (10, 15)


def test_rpm_window_slides(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(rpm=3)
    for _ in range(3):
        limiter.try_acquire(principal, 0)
        clock.advance(10)  # admitted at t0, t0+10, t0+20
    clock.advance(5)  # t0+35
    exc = refused(limiter, principal)
    assert exc.retry_after == pytest.approx(25)  # the t0 admission leaves at t0+60
    assert exc.headers == {"retry-after": "25"}
    assert "3 requests per minute" in exc.message and "25s" in exc.message
    clock.advance(24.5)
    refused(limiter, principal)
    clock.advance(0.5)  # exactly t0+60: (t-60, t] no longer holds t0
    limiter.try_acquire(principal, 0)
    assert refused(limiter, principal).retry_after == pytest.approx(10)


def test_keys_are_independent(limiter: LocalLimiter) -> None:
    limiter.try_acquire(key(rpm=1, key_id="a"), 0)
    limiter.try_acquire(key(rpm=1, key_id="b"), 0)
    refused(limiter, key(rpm=1, key_id="a"))


def test_lowered_limit_after_reload_waits_for_enough_to_leave(limiter: LocalLimiter, clock: Clock) -> None:
    for _ in range(5):
        limiter.try_acquire(key(rpm=5), 0)
        clock.advance(1)
    exc = refused(limiter, key(rpm=2))  # 5 in the window, 2 allowed: the 4th oldest (t0+3) must leave
    assert exc.retry_after == pytest.approx(60 + 3 - 5)


# --- buckets (the default resolution) ---------------------------------------------------------------------


def test_buckets_count_an_admission_at_most_one_resolution_longer(clock: Clock) -> None:
    limiter = LocalLimiter(clock=clock)  # default: 0.1 s buckets
    assert RESOLUTION_S == 0.1
    principal = key(rpm=3)
    for _ in range(3):
        limiter.try_acquire(principal, 0)
        clock.advance(10)
    clock.advance(5)
    exc = refused(limiter, principal)
    assert 25 <= exc.retry_after <= 25 + RESOLUTION_S  # exact: 25
    clock.advance(25)  # t0 + 60: the exact log would admit now; the bucket holds t0 for < 0.1 s more
    refused(limiter, principal)
    clock.advance(RESOLUTION_S)
    limiter.try_acquire(principal, 0)


def test_buckets_bound_memory_and_refusal_work_whatever_the_rate(clock: Clock) -> None:
    limiter = LocalLimiter(clock=clock)
    principal = key(rpm=10**9, tpm=10**9)
    for _ in range(120_000):  # 1,000 requests per second for two windows
        limiter.try_acquire(principal, 10).release(20)
        clock.advance(0.001)
    state = limiter._states[principal.key_id]
    bound = WINDOW_S / RESOLUTION_S + 2
    assert len(state.starts) <= bound and len(state.done) <= bound
    assert state.starts.total >= 60_000  # the window still counts every admission of the last 60 s
    assert state.done.total >= 20 * 60_000
    lowered = key(rpm=10**9, tpm=20 * 60_000)  # the same key after a reload: over its tpm now
    exc = refused(limiter, lowered, 200)  # a refusal walks at most W/R buckets, not 60,000 entries
    assert exc.limit == "tpm" and 0 < exc.retry_after <= 1


def test_resolution_must_be_below_the_window() -> None:
    with pytest.raises(ValueError, match="resolution_s"):
        LocalLimiter(window_s=1, resolution_s=1)


# --- concurrency ------------------------------------------------------------------------------------------


def test_concurrency(limiter: LocalLimiter) -> None:
    principal = key(max_concurrent=2)
    first = limiter.try_acquire(principal, 0)
    limiter.try_acquire(principal, 0)
    exc = refused(limiter, principal)
    assert exc.limit == "concurrency" and exc.retry_after == 1
    first.release()
    first.release()  # idempotent: frees one slot, not two
    third = limiter.try_acquire(principal, 0)
    refused(limiter, principal)
    third.release(123)
    limiter.try_acquire(principal, 0)


async def test_async_acquire(limiter: LocalLimiter) -> None:
    lease = await limiter.acquire(key(max_concurrent=1), 10)
    with pytest.raises(RateLimited):
        await limiter.acquire(key(max_concurrent=1), 10)
    lease.release()
    (await limiter.acquire(key(max_concurrent=1), 10)).release()
    await limiter.aclose()


def test_unlimited_principal_is_free(limiter: LocalLimiter) -> None:
    for _ in range(1000):
        limiter.try_acquire(Principal("anonymous"), 10**9).release(10**9)
    assert limiter._states == {}


def test_slowest_refusal_is_reported(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(rpm=1, max_concurrent=1)
    limiter.try_acquire(principal, 0)
    exc = refused(limiter, principal)  # both refuse; rpm frees in 60 s, concurrency "in 1 s"
    assert exc.limit == "rpm"


# --- tpm --------------------------------------------------------------------------------------------------


def test_tpm_counts_the_estimate_while_in_flight(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(tpm=100)
    lease = limiter.try_acquire(principal, 60)
    exc = refused(limiter, principal, 50)
    assert exc.limit == "tpm" and exc.retry_after == 1  # only a release can free in-flight tokens
    assert "100 tokens per minute (in use 60, requested 50)" in exc.message
    limiter.try_acquire(principal, 40).release(40)
    clock.advance(600)  # a long stream: still charged its estimate
    refused(limiter, principal, 60)
    lease.release()  # usage unknown: the estimate stands, now at release time
    refused(limiter, principal, 60)
    clock.advance(60)
    limiter.try_acquire(principal, 60)


def test_tpm_reconciles_with_actual_usage(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(tpm=1000)
    lease = limiter.try_acquire(principal, 100)
    clock.advance(5)
    lease.release(900)  # prompt 100 + completion 800, charged at release time t0+5
    limiter.try_acquire(principal, 100).release(100)  # 1000 used
    clock.advance(10)
    exc = refused(limiter, principal, 1)
    assert exc.limit == "tpm"
    assert exc.retry_after == pytest.approx(50)  # the 900 charged at t0+5 leaves at t0+65; now t0+15
    clock.advance(50)
    limiter.try_acquire(principal, 850)


def test_tpm_overestimate_is_refunded(limiter: LocalLimiter) -> None:
    principal = key(tpm=100)
    limiter.try_acquire(principal, 90).release(10)
    limiter.try_acquire(principal, 90)


def test_tpm_retry_after_counts_only_what_must_leave(limiter: LocalLimiter, clock: Clock) -> None:
    principal = key(tpm=100)
    for tokens in (30, 30, 30):
        limiter.try_acquire(principal, tokens).release()
        clock.advance(10)
    # 90 used (at t0, t0+10, t0+20), now t0+30; 50 more needs 40 freed: the first two must leave.
    assert refused(limiter, principal, 50).retry_after == pytest.approx(40)


def test_request_larger_than_tpm_is_413_not_a_retryable_429(limiter: LocalLimiter) -> None:
    with pytest.raises(TooLargeForLimit) as info:
        limiter.try_acquire(key(tpm=100), 101)
    exc = info.value
    assert (exc.status, exc.type, exc.code, exc.limit) == (413, "invalid_request_error", "request_too_large_for_limit",
                                                           "tpm")
    assert exc.headers == {"x-should-retry": "false"}
    assert "can never be admitted" in exc.message and "100 tokens per minute" in exc.message
    limiter.try_acquire(key(tpm=100), 100)


def test_too_large_wins_over_limits_a_wait_would_free(limiter: LocalLimiter) -> None:
    principal = key(rpm=1, tpm=100, max_concurrent=1)
    limiter.try_acquire(principal, 10)
    with pytest.raises(TooLargeForLimit):
        limiter.try_acquire(principal, 101)
    assert limiter._states["k"].starts.total == 1  # the refusal was not admitted


@pytest.mark.parametrize("limits,limit", [({"rpm": 0}, "rpm"), ({"max_concurrent": 0}, "concurrency")])
def test_a_limit_of_zero_is_a_429_no_wait_can_fix(limiter: LocalLimiter, limits: dict[str, int], limit: str) -> None:
    exc = refused(limiter, key(**limits, tpm=100))
    assert exc.limit == limit and not exc.retryable
    assert exc.headers["x-should-retry"] == "false" and int(exc.headers["retry-after"]) >= 1


def test_a_zero_limit_is_reported_over_one_that_frees(limiter: LocalLimiter) -> None:
    principal = key(rpm=1, max_concurrent=0)
    exc = refused(limiter, principal)  # concurrency 0 never frees; rpm would not refuse yet
    assert exc.limit == "concurrency" and not exc.retryable
    limiter.try_acquire(key(rpm=1), 0)
    exc = refused(limiter, key(rpm=1, max_concurrent=0))  # rpm frees in 60 s, concurrency 0 never
    assert exc.limit == "concurrency" and exc.headers.get("x-should-retry") == "false"


def test_retryable_429s_do_not_say_should_retry(limiter: LocalLimiter) -> None:
    limiter.try_acquire(key(rpm=1), 0)
    exc = refused(limiter, key(rpm=1))
    assert exc.retryable and "x-should-retry" not in exc.headers


# --- the backend, from config ----------------------------------------------------------------------------


def _limits(**section: object) -> LimitsConfig:
    return parse_config({"model": {"source": "x"}, "limits": section}).limits


def test_local_backend_is_the_default() -> None:
    config = parse_config({"model": {"source": "x"}})
    assert (config.limits.backend, config.limits.redis_url, config.limits.on_backend_error) == \
        ("local", None, "fail_closed")
    assert isinstance(build_limiter(config.limits), LocalLimiter)


def test_redis_backend_builds_the_redis_limiter_without_connecting() -> None:
    require_redis_package()
    from qwen_serve.gateway.limits_redis import RedisLimiter

    config = _limits(backend="redis", redis_url="redis://limits.invalid:6379/0", on_backend_error="fail_open")
    limiter = build_limiter(config)  # the client connects on first use: building it sends nothing
    assert isinstance(limiter, RedisLimiter)
    assert limiter._fail_open


def test_the_app_is_built_with_the_configured_limiter(tmp_path: Path) -> None:
    from qwen_serve.gateway.app import build_app

    base = {"model": {"source": "x"}, "auth": {"enabled": False}}
    app = build_app(parse_config(base), upstream_url="http://127.0.0.1:9")
    assert isinstance(app.fastapi.state.pipeline.s.limiter, LocalLimiter)
    require_redis_package()
    from qwen_serve.gateway.limits_redis import RedisLimiter

    redis_app = build_app(parse_config({**base, "limits": {"backend": "redis", "redis_url": "rediss://h:6380"}}),
                          upstream_url="http://127.0.0.1:9")
    limiter = redis_app.fastapi.state.pipeline.s.limiter
    assert isinstance(limiter, RedisLimiter)
    limiter._on_error("acquire")  # a failed round trip, as the limiter reports it
    metrics = redis_app.fastapi.state.metrics
    assert metrics.registry.get_sample_value("qwen_serve_limiter_backend_errors_total", {"op": "acquire"}) == 1


@pytest.mark.parametrize("section,message", [
    ({"backend": "etcd"}, "limits.backend: must be one of 'local' or 'redis'"),
    ({"backend": "redis"}, "limits.redis_url: required when limits.backend is redis"),
    ({"redis_url": "http://h:6379"}, "limits.redis_url: must be a redis://, rediss:// or unix:// url"),
    ({"redis_url": "redis://"}, "limits.redis_url: must be a redis://, rediss:// or unix:// url"),
    ({"redis_url": 6379}, "limits.redis_url: must be a string"),
    ({"on_backend_error": "retry"}, "limits.on_backend_error: must be one of 'fail_closed' or 'fail_open'"),
    ({"shared": True}, "limits.shared: unknown key"),
])
def test_limits_section_is_validated(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _limits(**section)
    assert info.value.message == message


def test_redis_url_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        _limits(redis_url="http://user:s3cret@h:6379")
    assert "s3cret" not in info.value.message


# --- the property: no window ever admits more than its limit ----------------------------------------------

WINDOW = 60_000  # integer "milliseconds" keep the boundary arithmetic exact


@dataclass
class Request:
    seq: int  # event index of the admission
    t: int
    estimate: int
    release_seq: int | None = None
    release_t: int | None = None
    actual: int | None = None

    @property
    def charged(self) -> int:
        """Final reconciled tokens: the usage given at release, else the estimate."""
        return self.estimate if self.actual is None else self.actual


@dataclass
class History:
    requests: list[Request] = field(default_factory=list)


ops = st.lists(
    st.one_of(
        # boundary steps make "exactly one window later" (and 1 ms either side) common
        st.tuples(st.just("advance"), st.integers(0, 30_000) | st.sampled_from([1, WINDOW // 2, WINDOW - 1, WINDOW])),
        st.tuples(st.just("acquire"), st.integers(0, 120)),
        st.tuples(st.just("release"), st.integers(0, 10_000), st.one_of(st.none(), st.integers(0, 300))),
    ),
    max_size=120,
)
limits = st.tuples(
    st.one_of(st.none(), st.integers(1, 8)),  # rpm
    st.one_of(st.none(), st.integers(1, 150)),  # tpm
    st.one_of(st.none(), st.integers(1, 4)),  # max_concurrent
)


class LimiterFactory(Protocol):
    def __call__(self, *, clock: Clock, window_s: float, resolution_s: float) -> Any: ...


def run(operations: list[tuple[object, ...]], principal: Principal, upper_bound: bool, resolution: int = 0,
        make: LimiterFactory = LocalLimiter) -> History:
    """Drive a limiter (``make``: LocalLimiter by default; anything with ``try_acquire`` and the same rules) and
    check every decision against an independent model of the rules.

    With buckets (``resolution`` > 0) a booking may count up to ``resolution`` longer than the window:
    an admission must still satisfy the exact rules, and a refusal those of a window ``resolution`` longer.
    """
    clock = Clock(0)
    limiter = make(clock=clock, window_s=WINDOW, resolution_s=resolution)
    history = History()
    leases = {}
    for seq, op in enumerate(operations):
        if op[0] == "advance":
            clock.advance(op[1])  # type: ignore[arg-type]
        elif op[0] == "acquire":
            estimate = int(op[1])  # type: ignore[call-overload]
            now = int(clock.now)
            live = [r for r in history.requests if r.release_seq is None]

            def allowed_by(window: int) -> dict[str, bool]:
                starts = [r for r in history.requests if r.t > now - window]
                charges = sum(r.estimate for r in live) + sum(
                    r.charged for r in history.requests if r.release_t is not None and r.release_t > now - window
                )
                return {
                    "rpm": principal.rpm is None or len(starts) < principal.rpm,
                    "tpm": principal.tpm is None or charges + estimate <= principal.tpm,
                    "concurrency": principal.max_concurrent is None or len(live) < principal.max_concurrent,
                }

            allowed = allowed_by(WINDOW)
            try:
                lease = limiter.try_acquire(principal, estimate)
            except TooLargeForLimit:
                assert principal.tpm is not None and estimate > principal.tpm, "too large although it fits the tpm"
                continue
            except RateLimited as exc:
                assert not allowed_by(WINDOW + resolution)[exc.limit], f"refused by {exc.limit} although the rules allow it"
                assert 0 < exc.retry_after <= WINDOW + resolution
                continue
            assert all(allowed.values()), f"admitted although {allowed}"
            leases[len(history.requests)] = lease
            history.requests.append(Request(seq, now, estimate))
        else:
            unreleased = [i for i, r in enumerate(history.requests) if r.release_seq is None]
            if not unreleased:
                continue
            index = unreleased[int(op[1]) % len(unreleased)]  # type: ignore[call-overload]
            request = history.requests[index]
            actual = op[2]
            if upper_bound and actual is not None:
                actual = min(int(actual), request.estimate)  # type: ignore[call-overload]
            leases[index].release(actual)  # type: ignore[arg-type]
            leases[index].release(999_999)  # a second release is ignored
            request.release_seq, request.release_t, request.actual = seq, int(clock.now), actual  # type: ignore[assignment]
    return history


@settings(max_examples=400, deadline=None)
@given(operations=ops, limit=limits, upper_bound=st.booleans(), resolution=st.sampled_from([0, 1, 100, 7_000]))
def test_no_window_admits_more_than_its_limit(
    operations: list[tuple[object, ...]], limit: tuple[int | None, int | None, int | None], upper_bound: bool,
    resolution: int,
) -> None:
    check_no_window_admits_more_than_its_limit(operations, limit, upper_bound, resolution, LocalLimiter)


def check_no_window_admits_more_than_its_limit(
    operations: list[tuple[object, ...]], limit: tuple[int | None, int | None, int | None], upper_bound: bool,
    resolution: int, make: LimiterFactory,
) -> None:
    """The property for one run: the limiter ``make`` builds decides as the rules say, and what it admitted
    never exceeds a limit in any window (shared with tests/unit/test_limits_shared.py)."""
    rpm, tpm, max_concurrent = limit
    principal = key(rpm, tpm, max_concurrent)
    requests = run(operations, principal, upper_bound, resolution, make).requests

    # rpm: every half-open interval [s, s + W) holds at most rpm admissions (the worst ones start at one).
    if rpm is not None:
        for first in requests:
            assert sum(first.t <= r.t < first.t + WINDOW for r in requests) <= rpm

    # tpm: tokens are the reconciled amounts, attributed when a request finishes. For every interval
    # [s, s + W), let R be the requests finishing in it and i* the last of them to be admitted. Then
    #   sum(actual over R) <= tpm + sum(actual - estimate over those of R still in flight at i*'s admission),
    # i.e. the only overshoot is the underestimate of requests that were running when the last one started.
    # With estimates that are upper bounds (actual <= estimate) there is none: sum(actual over R) <= tpm.
    if tpm is not None:
        finished = [r for r in requests if r.release_t is not None]
        for first in finished:
            assert first.release_t is not None
            window = [r for r in finished if first.release_t <= r.release_t < first.release_t + WINDOW]  # type: ignore[operator]
            last = max(window, key=lambda r: r.seq)
            overshoot = sum(r.charged - r.estimate for r in window if r.release_seq > last.seq)  # type: ignore[operator]
            total = sum(r.charged for r in window)
            assert total <= tpm + overshoot
            if upper_bound:
                assert total <= tpm


# --- the upfront estimate ---------------------------------------------------------------------------------


def test_estimate_chat_messages() -> None:
    body = {"messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 400}]}
    assert estimate_prompt_tokens(body) == 3 + 2 * 4 + 110


def test_estimate_counts_every_text_part() -> None:
    parts = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" * 40},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
        {"type": "text", "text": "b" * 40},
    ]}]}
    plain = {"messages": [{"role": "user", "content": "a" * 80}]}
    assert estimate_prompt_tokens(parts) == estimate_prompt_tokens(plain) == 3 + 4 + 20


def test_estimate_tools_and_tool_calls_add_tokens() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    call = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}]}
    assert estimate_prompt_tokens(with_tools) > estimate_prompt_tokens(base)
    assert estimate_prompt_tokens(call) > estimate_prompt_tokens(base) + 4


def test_estimate_non_ascii_by_utf8_bytes() -> None:
    assert estimate_prompt_tokens({"prompt": "你好" * 20}) == math.ceil(40 * 3 / 4)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("abcd" * 10, 10), (["abcd" * 10, "abcd"], 11), ([1, 2, 3], 3), ([[1, 2], [3, 4, 5]], 5), ("", 0)],
)
def test_estimate_completion_prompts(prompt: object, expected: int) -> None:
    assert estimate_prompt_tokens({"prompt": prompt}) == expected


@pytest.mark.parametrize(
    "body",
    [{}, {"messages": None}, {"messages": "hi"}, {"messages": [None, 3, {"content": {"x": 1}}]}, {"prompt": 5},
     {"messages": [{"content": [None, 1, {"text": 2}]}]}, {"tools": object()}],
)
def test_estimate_never_raises(body: dict[str, object]) -> None:
    assert estimate_prompt_tokens(body) >= 0

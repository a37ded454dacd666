"""qwen_serve.gateway.limits_shared: the shared-memory limiter keeps LocalLimiter's rules, across processes,
and a dead process's leases do not hold a key's slots for ever."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_serve.config import LimitsConfig
from qwen_serve.errors import LimiterUnavailable, RateLimited, TooLargeForLimit
from qwen_serve.gateway.auth import Principal
from qwen_serve.gateway.limits import SHARED_LIMITS_ENV, LocalLimiter, build_limiter
from qwen_serve.gateway.limits_shared import SharedLimiter
from tests.unit.test_limits import WINDOW, Clock, check_no_window_admits_more_than_its_limit, limits, ops


def key(rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None,
        key_id: str = "k") -> Principal:
    return Principal(key_id, ("*",), rpm, tpm, max_concurrent)


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    return SharedLimiter.create(tmp_path / "limits", key_slots=8, lease_slots=64)


# --- the same rules as LocalLimiter ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(operations=ops, limit=limits, upper_bound=st.booleans(), resolution=st.sampled_from([1, 100, 7_000]))
def test_no_window_admits_more_than_its_limit(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[object, ...]],
    limit: tuple[int | None, int | None, int | None], upper_bound: bool, resolution: int,
) -> None:
    """LocalLimiter's property test, run on a SharedLimiter (resolution > 0: the shared one keeps buckets)."""
    path = tmp_path_factory.mktemp("shm") / "limits"

    def make(*, clock: Clock, window_s: float, resolution_s: float) -> SharedLimiter:
        SharedLimiter.create(path, key_slots=2, lease_slots=256, window_s=window_s, resolution_s=resolution_s)
        return SharedLimiter(path, clock=clock)

    check_no_window_admits_more_than_its_limit(operations, limit, upper_bound, resolution, make)


@settings(max_examples=150, deadline=None)
@given(operations=ops, limit=limits, resolution=st.sampled_from([1, 100, 7_000]))
def test_decides_exactly_as_the_local_limiter(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[object, ...]],
    limit: tuple[int | None, int | None, int | None], resolution: int,
) -> None:
    """Step by step, the same admissions, the same refusing limit and the same Retry-After as LocalLimiter."""
    path = SharedLimiter.create(tmp_path_factory.mktemp("shm") / "limits", key_slots=2, lease_slots=256,
                                window_s=WINDOW, resolution_s=resolution)
    clock = Clock(0)
    local = LocalLimiter(clock=clock, window_s=WINDOW, resolution_s=resolution)
    shared = SharedLimiter(path, clock=clock)
    principal = key(*limit)
    leases: list[tuple[Any, Any]] = []
    for op in operations:
        if op[0] == "advance":
            clock.advance(op[1])  # type: ignore[arg-type]
        elif op[0] == "acquire":
            outcomes = []
            for limiter in (local, shared):
                try:
                    outcomes.append(limiter.try_acquire(principal, int(op[1])))  # type: ignore[call-overload]
                except (RateLimited, TooLargeForLimit) as exc:
                    outcomes.append((type(exc), exc.limit, getattr(exc, "retry_after", None), exc.message))
            if isinstance(outcomes[0], tuple) or isinstance(outcomes[1], tuple):
                assert outcomes[0] == outcomes[1]
            else:
                leases.append((outcomes[0], outcomes[1]))
        elif leases:
            pair = leases.pop(int(op[1]) % len(leases))  # type: ignore[call-overload]
            for lease in pair:
                lease.release(op[2])  # type: ignore[arg-type]
    shared.close()


def test_rpm_and_concurrency_across_two_instances(shm: Path) -> None:
    """Two attachments (as two workers would have) share one key's rpm and concurrency."""
    clock = Clock()
    a, b = SharedLimiter(shm, clock=clock), SharedLimiter(shm, clock=clock)
    k = key(rpm=3)
    a.try_acquire(k, 0).release()
    b.try_acquire(k, 0).release()
    a.try_acquire(k, 0).release()
    with pytest.raises(RateLimited) as info:
        b.try_acquire(k, 0)
    assert info.value.limit == "rpm" and 0 < info.value.retry_after <= 60.1
    c = key(max_concurrent=2, key_id="c")
    held = [a.try_acquire(c, 0), b.try_acquire(c, 0)]
    with pytest.raises(RateLimited) as info:
        a.try_acquire(c, 0)
    assert info.value.limit == "concurrency"
    held[1].release()
    held[1].release()  # a second release is ignored
    assert a.in_flight("c") == 1
    b.try_acquire(c, 0)  # the freed slot, taken through the other attachment
    assert b.in_flight("c") == 2
    clock.advance(61)
    a.try_acquire(k, 0)  # the window slid for every attachment


def test_tpm_is_charged_and_refunded_across_instances(shm: Path) -> None:
    clock = Clock()
    a, b = SharedLimiter(shm, clock=clock), SharedLimiter(shm, clock=clock)
    k = key(tpm=100)
    lease = a.try_acquire(k, 60)
    with pytest.raises(RateLimited) as info:
        b.try_acquire(k, 50)  # 60 in flight + 50 > 100
    assert info.value.limit == "tpm"
    lease.release(20)  # the actual usage replaces the estimate
    b.try_acquire(k, 50).release(50)
    with pytest.raises(TooLargeForLimit):
        a.try_acquire(k, 101)


def test_unlimited_keys_take_no_slot(shm: Path) -> None:
    limiter = SharedLimiter(shm)
    for i in range(20):  # more keys than the table's 8 slots
        limiter.try_acquire(key(key_id=f"free{i}"), 10).release()


def test_a_full_key_table_fails_closed_or_open(shm: Path) -> None:
    closed = SharedLimiter(shm)
    for i in range(8):
        closed.try_acquire(key(rpm=5, key_id=f"k{i}"), 0).release()
    with pytest.raises(LimiterUnavailable):
        closed.try_acquire(key(rpm=5, key_id="one-too-many"), 0)
    opened = SharedLimiter(shm, on_error="fail_open")
    opened.try_acquire(key(rpm=5, key_id="one-too-many"), 0).release()  # admitted unmetered
    closed.try_acquire(key(rpm=5, key_id="k3"), 0)  # known keys keep working


def test_the_file_must_be_a_shared_limits_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a shared limits file"):
        SharedLimiter(bogus)
    with pytest.raises(ValueError, match="resolution_s"):
        SharedLimiter.create(tmp_path / "x", resolution_s=0)


def test_build_limiter_chooses_the_shared_one_in_a_worker(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = LimitsConfig()
    assert isinstance(build_limiter(config), LocalLimiter)
    monkeypatch.setenv(SHARED_LIMITS_ENV, str(shm))
    limiter = build_limiter(config)
    assert isinstance(limiter, SharedLimiter) and limiter.path == shm


# --- other processes ----------------------------------------------------------------------------------------


def _hold_and_die(path: str, count: int, ready: Any) -> None:
    limiter = SharedLimiter(path)
    leases = [limiter.try_acquire(key(max_concurrent=4, tpm=1000, key_id="k"), 10) for _ in range(count)]
    ready.put(len(leases))
    ready.close()
    ready.join_thread()  # the queue's feeder thread has sent it
    os._exit(0)  # no release: the process dies holding its leases


def _acquire_many(path: str, n: int, out: Any) -> None:
    limiter = SharedLimiter(path)
    admitted = 0
    for _ in range(n):
        try:
            limiter.try_acquire(key(rpm=50, key_id="shared"), 0).release()
            admitted += 1
        except RateLimited:
            pass
    out.put(admitted)


def test_concurrent_processes_admit_exactly_the_rpm(shm: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_acquire_many, args=(str(shm), 40, out)) for _ in range(3)]
    for p in procs:
        p.start()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert admitted == 50  # 120 attempts in three processes, one shared limit of 50 per minute


def test_leases_of_a_dead_process_are_reclaimed(shm: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_and_die, args=(str(shm), 3, ready))
    child.start()
    assert ready.get(timeout=60) == 3
    child.join(30)
    assert child.exitcode == 0
    limiter = SharedLimiter(shm)
    k = key(max_concurrent=4, tpm=1000, key_id="k")
    assert limiter.in_flight("k") == 3
    held = limiter.try_acquire(k, 10)
    # The key is at its limit of 4; the refusal path finds the dead owner and takes its slots back.
    more = [limiter.try_acquire(k, 10) for _ in range(3)]
    assert limiter.in_flight("k") == 4
    for lease in (held, *more):
        lease.release(0)
    assert limiter.in_flight("k") == 0


def test_reclaim_by_pid_frees_slots_and_keeps_charges(shm: Path) -> None:
    clock = Clock()
    dead = SharedLimiter(shm, clock=clock, pid=999_999_001)
    k = key(max_concurrent=2, tpm=100, key_id="k")
    dead.try_acquire(k, 30)
    dead.try_acquire(k, 30)
    survivor = SharedLimiter(shm, clock=clock, pid=999_999_002)
    assert survivor.reclaim(999_999_001) == 2
    assert survivor.in_flight("k") == 0
    survivor.try_acquire(k, 40)  # 60 charged (the dead requests' estimates, booked at reclaim) + 40 <= 100
    with pytest.raises(RateLimited) as info:
        survivor.try_acquire(k, 1)
    assert info.value.limit == "tpm"

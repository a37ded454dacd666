"""Arrival schedules: reproducible, right mean rate and gap variability per kind, bounds, ramp-up."""

from __future__ import annotations

import math
import statistics

import pytest

from qwen_serve.bench.arrivals import schedule


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times)]


def _cv(times: list[float]) -> float:
    g = _gaps(times)
    return statistics.pstdev(g) / statistics.fmean(g)


def test_seeded_reproducible_and_non_decreasing() -> None:
    a = schedule(500, 20.0, seed=7)
    assert a == schedule(500, 20.0, seed=7)
    assert a != schedule(500, 20.0, seed=8)
    assert all(x <= y for x, y in zip(a, a[1:]))
    assert a[0] > 0 and len(a) == 500


def test_poisson_rate_and_cv() -> None:
    times = schedule(20000, 50.0, seed=1)
    rate = len(times) / times[-1]
    assert rate == pytest.approx(50.0, rel=0.03)
    assert _cv(times) == pytest.approx(1.0, rel=0.05)
    assert schedule(100, 50.0, seed=1, kind="poisson") == times[:100]


@pytest.mark.parametrize(("burstiness", "cv"), [(0.25, 2.0), (4.0, 0.5)])
def test_gamma_cv(burstiness: float, cv: float) -> None:
    times = schedule(20000, 10.0, burstiness=burstiness, seed=3)
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.05)
    assert _cv(times) == pytest.approx(cv, rel=0.05)
    assert schedule(50, 10.0, burstiness=burstiness, seed=3, kind="gamma") == times[:50]


def test_constant_exact_gaps() -> None:
    times = schedule(10, 4.0, kind="constant")
    assert times == pytest.approx([i * 0.25 for i in range(10)])
    assert schedule(None, 4.0, kind="constant", duration=2.0) == pytest.approx([i * 0.25 for i in range(8)])


def test_duration_bound_and_first_bound_wins() -> None:
    times = schedule(None, 100.0, seed=2, duration=5.0)
    assert times and times[-1] < 5.0
    assert len(times) == pytest.approx(500, rel=0.15)
    assert len(schedule(10, 100.0, seed=2, duration=5.0)) == 10
    short = schedule(10_000, 100.0, seed=2, duration=1.0)
    assert short == times[: len(short)] and short[-1] < 1.0


def test_infinite_rate() -> None:
    assert schedule(5, math.inf) == [0.0] * 5
    with pytest.raises(ValueError, match="closed-loop"):
        schedule(None, math.inf, duration=10.0)


def test_ramp_up() -> None:
    rate, ramp, duration = 200.0, 4.0, 10.0
    times = schedule(None, rate, seed=5, duration=duration, ramp_up_s=ramp)
    first = sum(1 for t in times if t < ramp / 2)
    second = sum(1 for t in times if ramp / 2 <= t < ramp)
    assert first < second
    assert first == pytest.approx(rate * ramp / 8, rel=0.3)  # Λ(ramp/2) = rate*ramp/8
    assert second == pytest.approx(3 * rate * ramp / 8, rel=0.15)
    assert len(times) == pytest.approx(rate * (duration - ramp / 2), rel=0.05)
    after = [t for t in times if t >= ramp]
    assert len(after) / (duration - ramp) == pytest.approx(rate, rel=0.12)
    constant = schedule(None, 10.0, kind="constant", duration=duration, ramp_up_s=ramp)
    assert len(constant) == pytest.approx(10.0 * (duration - ramp / 2), abs=1)
    gaps = _gaps(constant)[1:]
    assert all(a >= b - 1e-9 for a, b in zip(gaps, gaps[1:]))  # gaps shrink during the ramp, then stay


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((10, 0.0), {}, "rate"),
    ((10, -1.0), {}, "rate"),
    ((10, math.nan), {}, "rate"),
    ((None, 1.0), {}, "n .*or duration"),
    ((10, 1.0), {"burstiness": 0.0}, "burstiness"),
    ((10, 1.0), {"burstiness": -2.0}, "burstiness"),
    ((10, 1.0), {"ramp_up_s": -1.0}, "ramp_up_s"),
    ((10, 1.0), {"duration": 0.0}, "duration"),
    ((-1, 1.0), {}, "n must"),
    ((10, 1.0), {"kind": "uniform"}, "unknown arrival kind"),
    ((10, 1.0), {"kind": "poisson", "burstiness": 2.0}, "gamma"),
])
def test_errors(args: tuple[int | None, float], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        schedule(*args, **kwargs)  # type: ignore[arg-type]

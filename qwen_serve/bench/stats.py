"""Statistics over a run's records: pure functions, no I/O, no clocks.

* :func:`percentile` is linear interpolation between closest ranks (NumPy's default, which
  ``vllm bench serve`` also uses), so figures agree with it on the same samples.
* :func:`summarize` turns samples into the latency object of ``result.json``:
  ``{mean, p50, p90, p95, p99, max, n}`` (``None`` values when there are no samples).
* :func:`goodput` counts the requests that met every given SLO (``ttft_ms``, ``tpot_ms``, ``e2el_ms``;
  a request without a TPOT, e.g. one output token, meets a TPOT SLO).
* :func:`in_flight` gives the mean and the peak number of requests in flight from ``(sent, end)``
  intervals (a sweep line: a request that ends at the instant another starts does not overlap it).
* :func:`median_interval` is the median of per-round values with a seeded bootstrap 95% interval and
  the min-max spread, for ``bench compare``.
* :func:`lag_trend` is the least-squares slope of schedule lag against scheduled time (ms of lag per
  second of run), how a run detects that it fell behind its schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["PERCENTILES", "percentile", "summarize", "goodput", "in_flight", "median_interval", "lag_trend",
           "parse_slo"]

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated; NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(values: Iterable[float | None]) -> dict[str, float | None]:
    """``{mean, p50, p90, p95, p99, max, n}`` of the non-``None`` values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "max": None, "n": 0}
    out: dict[str, float | None] = {"mean": math.fsum(xs) / len(xs)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["max"] = xs[-1]
    out["n"] = len(xs)
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_ms=500,tpot_ms=50"`` → ``{"ttft_ms": 500.0, "tpot_ms": 50.0}``; ValueError names the bad part."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in SLO_KEYS:
            raise ValueError(f"slo: '{part.strip()}' is not one of {', '.join(k + '=X' for k in SLO_KEYS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"slo: {name} must be a number of milliseconds, got '{value}'") from None
        if not math.isfinite(out[name]) or out[name] <= 0:
            raise ValueError(f"slo: {name} must be positive and finite, got '{value}'")
    return out


def goodput(rows: Iterable[Mapping[str, float | None]], slo: Mapping[str, float]) -> int:
    """How many of the (successful) ``rows`` met every SLO in ``slo``."""
    good = 0
    for row in rows:
        ok = True
        for key, limit in slo.items():
            v = row.get(key)
            if v is None:
                if key != "tpot_ms":
                    ok = False
                    break
            elif v > limit:
                ok = False
                break
        good += ok
    return good


def in_flight(intervals: Iterable[tuple[float, float]], span: float) -> tuple[float, int]:
    """Mean requests in flight over ``span`` seconds and the peak, from ``(start, end)`` intervals."""
    events: list[tuple[float, int]] = []
    busy = 0.0
    for start, end in intervals:
        busy += max(0.0, end - start)
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return (busy / span if span > 0 else 0.0), peak


def median_interval(values: Sequence[float], *, seed: int = 0, resamples: int = 2000) -> dict[str, float | None]:
    """Median of ``values`` with a bootstrap 95% interval (seeded) and the min and max."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return {"median": None, "ci_low": None, "ci_high": None, "min": None, "max": None, "n": 0}
    rng = random.Random(seed)
    meds = sorted(percentile(sorted(rng.choice(xs) for _ in xs), 50) for _ in range(resamples))
    return {"median": percentile(xs, 50), "ci_low": percentile(meds, 2.5), "ci_high": percentile(meds, 97.5),
            "min": xs[0], "max": xs[-1], "n": len(xs)}


def lag_trend(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(scheduled_s, lag_ms)`` points, in ms of lag per second; 0.0 when < 3 points."""
    n = len(points)
    if n < 3:
        return 0.0
    mx = math.fsum(p[0] for p in points) / n
    my = math.fsum(p[1] for p in points) / n
    sxx = math.fsum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return math.fsum((p[0] - mx) * (p[1] - my) for p in points) / sxx

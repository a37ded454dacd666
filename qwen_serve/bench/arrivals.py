"""When requests are due: seeded arrival schedules for an open-loop run (pure, no I/O).

:func:`schedule` returns send offsets in seconds from the run's ``t0``: a non-decreasing list whose
first element may be above 0. It stops after ``n`` arrivals or at the last arrival before ``duration``,
whichever bound comes first (at least one of them must be given). The same arguments always give the
same list (``random.Random(seed)``).

Kinds (the gaps between arrivals, mean ``1/rate`` for all of them):

* ``constant``: exactly ``1/rate`` apart, the first at 0;
* ``poisson``: exponential gaps (a Poisson process; gamma with shape 1);
* ``gamma``: gamma gaps with shape ``burstiness`` and scale ``1/(rate*burstiness)``: coefficient of
  variation ``1/sqrt(burstiness)``, so ``burstiness < 1`` is burstier than Poisson and ``> 1``
  smoother (the meaning of vLLM's ``--burstiness``).

Default kind: ``poisson`` when ``burstiness == 1``, else ``gamma``. ``burstiness`` other than 1 with
an explicit ``constant``/``poisson`` kind is an error rather than silently ignored.

``rate == inf`` means "all at once": ``n`` zeros (with only ``duration`` it is an error; a closed-loop
run is the run loop's business, not a schedule).

Ramp-up: over the first ``ramp_up_s`` seconds the instantaneous rate rises linearly from 0 to
``rate``. The unit-rate process above is time-warped through the inverse of the integrated rate
``Λ(t) = rate*t²/(2*ramp)`` (``t < ramp``), ``rate*ramp/2 + rate*(t - ramp)`` after, so the kind
(the shape of the gaps) is kept and a run of ``duration`` seconds expects
``rate*(duration - ramp/2)`` arrivals.
"""

from __future__ import annotations

import math
import random
from typing import Literal

__all__ = ["ArrivalKind", "ARRIVAL_KINDS", "schedule"]

ArrivalKind = Literal["constant", "poisson", "gamma"]
ARRIVAL_KINDS: tuple[str, ...] = ("constant", "poisson", "gamma")


def schedule(n: int | None, rate: float, *, burstiness: float = 1.0, seed: int = 0,
             duration: float | None = None, ramp_up_s: float = 0.0,
             kind: ArrivalKind | None = None) -> list[float]:
    """Arrival offsets (seconds from t0) for ``n`` requests and/or the window ``[0, duration)``."""
    if n is None and duration is None:
        raise ValueError("schedule needs n (request count) or duration (seconds), or both")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s (inf for all at once), got {rate}")
    if math.isnan(burstiness) or burstiness <= 0 or math.isinf(burstiness):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isnan(ramp_up_s) or ramp_up_s < 0 or math.isinf(ramp_up_s):
        raise ValueError(f"ramp_up_s must be a finite number >= 0, got {ramp_up_s}")
    if kind is None:
        kind = "poisson" if burstiness == 1.0 else "gamma"
    elif kind not in ARRIVAL_KINDS:
        raise ValueError(f"unknown arrival kind {kind!r}; available: {', '.join(ARRIVAL_KINDS)}")
    elif kind != "gamma" and burstiness != 1.0:
        raise ValueError(f"burstiness applies to the gamma kind only, not {kind!r}")

    if math.isinf(rate):
        if n is None:
            raise ValueError("an infinite rate needs n: a duration-bound run at infinite rate is closed-loop")
        return [0.0] * n

    rng = random.Random(seed)
    shape = 1.0 if kind == "poisson" else burstiness
    out: list[float] = []
    work = 0.0  # cumulative arrivals of the unit-rate process
    while n is None or len(out) < n:
        if kind == "constant":
            work = float(len(out))
        else:
            work += rng.gammavariate(shape, 1.0 / shape)
        t = _warp(work, rate, ramp_up_s)
        if duration is not None and t >= duration:
            break
        out.append(t)
    return out


def _warp(work: float, rate: float, ramp: float) -> float:
    """``Λ⁻¹(work)``: the time by which ``work`` arrivals are expected under the ramped rate."""
    if ramp <= 0:
        return work / rate
    ramp_work = rate * ramp / 2.0
    if work < ramp_work:
        return math.sqrt(2.0 * ramp * work / rate)
    return ramp + (work - ramp_work) / rate

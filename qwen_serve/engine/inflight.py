"""How many requests the gateway has in flight to the engine, as the health monitor asks it.

:func:`gauge_reader` turns the gateway's ``qwen_serve_in_flight_requests`` gauge (one child per ``model``
label value, a bounded set) into the cheap ``in_flight()`` callable that
:class:`~qwen_serve.engine.state.EngineMonitor` calls once per failed ``/health`` probe: it sums the
gauge's samples through prometheus-client's public ``collect()``, so the counting stays where the pipeline
does it (one increment when a generate request is sent on, one decrement when it finishes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["gauge_reader"]


class _Sample(Protocol):
    @property
    def value(self) -> float: ...


class _Family(Protocol):
    @property
    def samples(self) -> Iterable[_Sample]: ...


class _Collector(Protocol):
    def collect(self) -> Iterable[_Family]: ...


def gauge_reader(gauge: _Collector) -> Callable[[], int]:
    """A callable returning the sum of ``gauge``'s current values over all its label values (0 for none)."""

    def read() -> int:
        return max(0, round(sum(sample.value for family in gauge.collect() for sample in family.samples)))

    return read

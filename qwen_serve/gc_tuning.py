"""The cyclic garbage collector's settings for a process that serves the gateway.

:func:`tune_for_serving` is called once by the process that owns the gateway (``qwen-serve up`` and
``qwen-serve gateway``, and the benchmarks that measure them), after the app is built and before it
serves. It is process-wide, so library code (``build_app``, in-process test gateways) never calls it.

Why (measured; ``benchmarks/RESULTS.md``, "Gateway process: garbage-collector settings"): with CPython's
default thresholds (700, 10, 10) the gateway spent about a sixth of its CPU in the collector under load. Each
request in flight holds about a hundred tracked objects (scope, tasks, coroutines, buffers) for milliseconds, so the
young generation fills hundreds of times a second; what is in flight at that moment survives, is promoted,
and soon triggers a full collection that walks the whole heap: the ~68,000 objects of the imported modules,
FastAPI's routes and pydantic's models, ~36 ms each, several times a second.

* :func:`gc.freeze` moves everything alive at startup into the permanent generation: the collector no
  longer walks it (it is never garbage; it lives as long as the process).
* The young threshold goes from 700 to :data:`GEN0_THRESHOLD`: allocations minus deallocations of tracked
  objects since the last collection. Requests free what they allocate, so the count stays near what is in
  flight and a young collection runs when real growth accumulates, not on every burst. Cyclic garbage waits
  a little longer (at most that many objects); reference counting still frees everything else at once.
"""

from __future__ import annotations

import gc

__all__ = ["GEN0_THRESHOLD", "tune_for_serving"]

GEN0_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Collect once, freeze what is alive, raise the young generation's threshold (idempotent)."""
    # Measured: 1.256× req/s, p99 57 → 16 ms (benchmarks/RESULTS.md, 2026-11-29, "garbage-collector settings").
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)

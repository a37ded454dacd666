"""``bench sweep``: the same workload at rising load until the server saturates.

Points are either request rates (open loop, the run's ``--concurrency`` cap kept) or concurrencies
(closed loop, ``--rate inf``). ``points=K`` (auto) first measures the saturation throughput with a
closed loop at the run's concurrency (default 64), then sweeps K-1 Poisson rates evenly spaced below it.
The sweep stops after the first saturated point (achieved request throughput under 90% of the offered
rate, or a cap-/client-bound verdict) unless ``stop_at_saturation`` is false.

Every point gets its own directory (``NN-label/`` with ``result.json`` and the request files), and the
sweep directory gets ``sweep.json`` (the points in load order) and an overlay ``report.html`` with the
throughput-vs-latency curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from qwen_serve.bench.config import BenchError, RunConfig
from qwen_serve.bench.persist import save_run
from qwen_serve.bench.report import render, write_sweep
from qwen_serve.bench.run import RunOutcome

__all__ = ["plan_points", "sweep", "SATURATED"]

SATURATED = 0.9
AUTO_CONCURRENCY = 64
Execute = Callable[[RunConfig], Awaitable[RunOutcome]]


def plan_points(cfg: RunConfig, *, rates: Sequence[float] = (),
                concurrencies: Sequence[int] = ()) -> list[RunConfig]:
    """The configs of the explicit points, in increasing load."""
    if rates and concurrencies:
        raise ValueError("give --rates or --concurrencies, not both")
    if rates:
        return [cfg.model_copy(update={"rate": r, "label": f"rate={r:g}"}) for r in sorted(rates)]
    if concurrencies:
        return [cfg.model_copy(update={"rate": math.inf, "concurrency": c, "label": f"c={c}"})
                for c in sorted(concurrencies)]
    raise ValueError("a sweep needs --rates, --concurrencies or --points")


def _saturated(cfg: RunConfig, result: dict[str, Any]) -> bool:
    if result["client"]["bound"] is not None:
        return True
    return not math.isinf(cfg.rate) and result["request_throughput"] < SATURATED * cfg.rate


async def sweep(base: RunConfig, out: str | Path, execute: Execute, *, rates: Sequence[float] = (),
                concurrencies: Sequence[int] = (), points: int | None = None,
                stop_at_saturation: bool = True, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the points one after another, save each, then the sweep's report; return the points' results."""
    out = Path(out)
    results: list[dict[str, Any]] = []
    numbers = itertools.count()
    rows: dict[str, list[dict[str, Any]]] = {}

    async def point(cfg: RunConfig) -> dict[str, Any]:
        outcome = await execute(cfg)
        res = save_run(outcome, out / f"{next(numbers):02d}-{cfg.label}", report=False)
        results.append(res)
        rows[res["label"]] = [r.to_row() for r in outcome.records]
        say(f"  {res['label']}: {res['request_throughput']:.2f} req/s, TTFT p99 {_ms(res['ttft_ms']['p99'])}, "
            f"TPOT p99 {_ms(res['tpot_ms']['p99'])}" + (f" [{res['client']['bound']}-bound]"
                                                         if res['client']['bound'] else ""))
        return res

    if points is not None:
        if points < 2:
            raise ValueError("points: an automatic sweep needs at least 2 points")
        conc = base.concurrency or AUTO_CONCURRENCY
        sat = await point(base.model_copy(update={"rate": math.inf, "concurrency": conc, "label": f"max,c={conc}"}))
        top = sat["request_throughput"]
        if top <= 0:
            raise BenchError("the saturation point completed no request; nothing to sweep below it")
        plan = [base.model_copy(update={"rate": round(top * i / points, 3), "concurrency": base.concurrency,
                                        "label": f"rate={top * i / points:.3g}"}) for i in range(1, points)]
        saturation = results.pop()
        for cfg in plan:
            res = await point(cfg)
            if stop_at_saturation and _saturated(cfg, res):
                say(f"  saturated at {cfg.label}; stopping")
                break
        results.append(saturation)
    else:
        for cfg in plan_points(base, rates=rates, concurrencies=concurrencies):
            res = await point(cfg)
            if stop_at_saturation and _saturated(cfg, res):
                say(f"  saturated at {cfg.label}; stopping")
                break
    write_sweep(out, results)
    render(out, results, rows, sweep=results, title="qwen-serve bench sweep")
    return results


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"

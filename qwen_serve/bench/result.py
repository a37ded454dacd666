"""``result.json`` from a :class:`~qwen_serve.bench.run.RunOutcome`: figures, verdicts and warnings.

:func:`build_result` is pure (records in, dict out) apart from reading the client ceiling cache
(:func:`qwen_serve.bench.ceiling.load_cached`). Warm-up requests never count. Latency objects are
:func:`~qwen_serve.bench.stats.summarize` outputs in milliseconds; ``ttft_ms`` and ``e2el_ms`` run from
each request's *scheduled* time, ``ttft_from_send_ms`` from its actual send, for contrast.

Token counts come from the server's ``usage`` (``tokens.source: "usage"``); when the server sent none,
the client's count of events with text stands in and ``tokens.source`` says ``"client-estimate"``.

The client's own health is judged here, so a saturated load generator is never read as a slow server:

* ``client.bound = "cap"`` when the schedule lag grew while every concurrency slot was busy (the cap,
  not the arrival process, set the load); ``"client"`` when the lag grew otherwise, or the client used
  most of its core, or a closed loop kept fewer requests in flight than asked;
* ``client.warnings`` says which, with the figures, and also flags a run near the client's measured
  ceiling (``bench ceiling``), answers that missed their output length, and a low guided validity.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import jsonschema

from qwen_serve.bench.records import RequestRecord
from qwen_serve.bench.run import RunOutcome
from qwen_serve.bench.stats import goodput, in_flight, lag_trend, percentile, summarize

__all__ = ["build_result", "check_guided", "CPU_BUSY", "LAG_GROWTH_MS"]

CPU_BUSY = 0.90
"""Share of one core above which the client is taken to be saturated."""
LAG_GROWTH_MS = 50.0
"""The median schedule lag of the last quarter of a run exceeding the first quarter's by this much = lag grew."""
CEILING_NEAR = 0.70


def check_guided(records: list[RequestRecord], schemas: dict[int, dict[str, Any]]) -> None:
    """Set ``guided_valid`` on answered requests whose spec carried a schema (after the run)."""
    for rec in records:
        schema = schemas.get(rec.spec_index)
        if schema is None or not rec.ok:
            continue
        try:
            jsonschema.validate(json.loads(rec.text), schema)
            rec.guided_valid = True
        except (ValueError, jsonschema.ValidationError):
            rec.guided_valid = False


def _timeseries(records: list[RequestRecord], duration: float) -> dict[str, list[float]]:
    if duration <= 0 or not records:
        return {"t_s": [], "completed_rps": [], "output_tps": [], "in_flight": [], "schedule_lag_ms": []}
    width = max(1.0, math.ceil(duration / 300.0))
    n = int(math.ceil(duration / width))
    done = [0.0] * n
    tokens = [0.0] * n
    busy = [0.0] * n
    lags: list[list[float]] = [[] for _ in range(n)]
    for r in records:
        b = min(n - 1, int(r.end / width))
        if r.ok:
            done[b] += 1
        if r.chunk_times and r.chunk_tokens:
            for t, k in zip(r.chunk_times, r.chunk_tokens):
                tokens[min(n - 1, int(t / width))] += k
        lags[min(n - 1, int(r.scheduled / width))].append(r.schedule_lag_ms)
        s, e = r.sent, r.end
        first, last = int(s / width), min(n - 1, int(e / width))
        for b in range(first, last + 1):
            lo, hi = max(s, b * width), min(e, (b + 1) * width)
            if hi > lo:
                busy[b] += hi - lo
    return {
        "t_s": [round((i + 1) * width, 3) for i in range(n)],
        "completed_rps": [d / width for d in done],
        "output_tps": [t / width for t in tokens],
        "in_flight": [b / width for b in busy],
        "schedule_lag_ms": [percentile(sorted(x), 99) if x else 0.0 for x in lags],
    }


def _median(xs: list[float]) -> float:
    return percentile(sorted(xs), 50) if xs else 0.0


def build_result(outcome: RunOutcome, ceiling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``result.json`` object of one run (see the module docstring)."""
    cfg = outcome.config
    recs = outcome.records
    schemas = {i: s.schema for i, s in enumerate(outcome.specs) if s.schema is not None}
    if schemas:
        check_guided(recs, schemas)
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok]
    duration = outcome.duration_s
    usage_known = all(r.output_tokens is not None for r in ok)
    out_tokens = sum((r.output_tokens if r.output_tokens is not None else r.client_output_tokens or 0) for r in ok)
    in_tokens = sum(r.input_tokens or 0 for r in ok)
    client_est = sum(r.client_output_tokens or 0 for r in ok)
    targets = [r for r in ok if r.target_output_tokens is not None and r.output_tokens is not None]
    guided_recs = [r for r in ok if r.guided_valid is not None]
    misses = sum(1 for r in targets if r.output_tokens != r.target_output_tokens) \
        if cfg.ignore_eos and not guided_recs and cfg.workload_name != "tools" else 0

    rows = [{"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "e2el_ms": r.e2el_ms} for r in ok]
    good = goodput(rows, cfg.slo) if cfg.slo else None
    mean_inflight, peak = in_flight(((r.sent, r.end) for r in recs), duration)
    cpu_util = outcome.cpu_s / duration if duration > 0 else 0.0

    # The client's own verdict.
    warnings: list[str] = list(outcome.notes)
    bound: str | None = None
    by_time = sorted(recs, key=lambda r: r.scheduled)
    quarter = max(1, len(by_time) // 4)
    lag_first = _median([r.schedule_lag_ms for r in by_time[:quarter]])
    lag_last = _median([r.schedule_lag_ms for r in by_time[-quarter:]])
    slope = lag_trend([(r.scheduled, r.schedule_lag_ms) for r in by_time])
    grew = len(by_time) >= 8 and lag_last - lag_first > LAG_GROWTH_MS and slope > 0
    if grew:
        if cfg.concurrency is not None and peak >= cfg.concurrency:
            bound = "cap"
            warnings.append(
                f"cap-bound: schedule lag grew from {lag_first:.0f} ms to {lag_last:.0f} ms while all "
                f"{cfg.concurrency} concurrency slots were busy; the cap, not --rate, set the load, and the "
                "wait for a slot is counted in TTFT/E2EL")
        else:
            bound = "client"
            warnings.append(
                f"client-bound: schedule lag grew from {lag_first:.0f} ms to {lag_last:.0f} ms with free slots "
                f"(client CPU {cpu_util:.0%} of a core); the load generator fell behind its schedule, so "
                "these figures describe the client, not the server")
    if cpu_util >= CPU_BUSY:
        bound = bound or "client"
        warnings.append(f"client CPU at {cpu_util:.0%} of one core: the load generator is near its limit; "
                        "split the load over several processes or lower the rate")
    if cfg.closed_loop and cfg.concurrency and mean_inflight < 0.9 * cfg.concurrency and len(recs) >= 2 * cfg.concurrency:
        bound = bound or "client"
        warnings.append(f"achieved concurrency {mean_inflight:.1f} of the {cfg.concurrency} asked: the client "
                        "could not keep every slot busy")
    events = sum(len(r.chunk_times) for r in recs)
    if ceiling and duration > 0:
        eps = events / duration
        rps = len(recs) / duration
        c_eps, c_rps = float(ceiling.get("chunks_per_s_per_core") or 0), float(ceiling.get("requests_per_s_per_core") or 0)
        near = [f"{x / c:.0%} of its {what} ceiling ({c:,.0f}/s per core)" for x, c, what in
                ((eps, c_eps, "events"), (rps, c_rps, "requests")) if c > 0 and x / c >= CEILING_NEAR]
        if near:
            warnings.append("this run used " + " and ".join(near) + " measured by `qwen-serve bench ceiling`")
    if misses:
        wanted = {r.target_output_tokens for r in targets}
        target = f"{wanted.pop()} tokens" if len(wanted) == 1 else "per-request tokens"
        warnings.append(f"{misses} of {len(targets)} answers missed their output length target "
                        f"({target}): the server may not honour ignore_eos")
    if not usage_known and ok:
        warnings.append("the server sent no usage for some answers: token counts are the client's estimate")
    if failed:
        warnings.append(f"{len(failed)} of {len(recs)} requests failed (see errors)")

    by_status = Counter(str(r.status) for r in failed)
    by_code = Counter(r.error or "unknown" for r in failed)
    examples = list(dict.fromkeys(f"{r.status} {r.error}: {r.error_message}" for r in failed))[:5]
    guided = None
    if guided_recs:
        valid = sum(1 for r in guided_recs if r.guided_valid)
        guided = {"valid": valid, "invalid": len(guided_recs) - valid, "validity_rate": valid / len(guided_recs)}
        if valid < len(guided_recs):
            warnings.append(f"guided validity {valid / len(guided_recs):.1%}: {len(guided_recs) - valid} of "
                            f"{len(guided_recs)} guided answers did not match their schema")

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    return {
        "label": cfg.label or _default_label(cfg),
        "started_at": outcome.started_at,
        "requests_completed": len(ok),
        "requests_failed": len(failed),
        "requests_warmup": len(outcome.warmup),
        "duration_s": duration,
        "request_throughput": rate(len(ok)),
        "output_token_throughput": rate(out_tokens),
        "input_token_throughput": rate(in_tokens),
        "total_token_throughput": rate(out_tokens + in_tokens),
        "goodput_rps": rate(good) if good is not None else None,
        "slo": cfg.slo or None,
        "ttft_ms": summarize(r.ttft_ms for r in ok),
        "ttft_from_send_ms": summarize(r.ttft_from_send_ms for r in ok),
        "tpot_ms": summarize(r.tpot_ms for r in ok),
        "itl_ms": summarize(x for r in ok for x in r.itl_ms()),
        "e2el_ms": summarize(r.e2el_ms for r in ok),
        "schedule_lag_ms": summarize(r.schedule_lag_ms for r in recs),
        "tokens": {
            "source": "usage" if usage_known else "client-estimate",
            "input_total": in_tokens,
            "output_total": out_tokens,
            "output_target_total": sum(r.target_output_tokens or 0 for r in targets) if targets else None,
            "output_length_misses": misses,
            "input_exact": outcome.tokenizer_exact,
            "client_output_estimate_total": client_est,
            "client_estimate_mismatch_pct": (100.0 * (client_est - out_tokens) / out_tokens) if out_tokens else None,
        },
        "errors": {"by_status": dict(by_status), "by_code": dict(by_code), "examples": examples},
        "concurrency": {"asked": cfg.concurrency, "achieved_mean": mean_inflight, "peak": peak},
        "client": {"cpu_util": cpu_util, "cpu_s": outcome.cpu_s, "bound": bound, "warnings": warnings,
                   "lag_slope_ms_per_s": slope, "events": events,
                   "events_per_s": rate(events)},
        "engine": outcome.engine,
        "guided": guided,
        "config": cfg.public(),
        "timeseries": _timeseries(recs, duration),
    }


def _default_label(cfg: Any) -> str:
    rate = "inf" if math.isinf(cfg.rate) else f"{cfg.rate:g}"
    conc = f",c={cfg.concurrency}" if cfg.concurrency else ""
    return f"rate={rate}{conc}"

"""``bench compare``: two or more targets under the same load, alternated in rounds, ratios with intervals.

Each round runs every target once with the same settings and the same requests (the pool is built once,
against the first target), in an order that rotates every round (A B, B A, ...), so drift on a shared
machine falls on both sides. Per target and metric the summary gives the median over rounds; per
metric and target after the first, the ratio target ÷ first is computed *per round* and summarised as
its median, a bootstrap 95% interval and the min-max spread
(:func:`~qwen_serve.bench.stats.median_interval`). Each run is saved under
``round-NN/<target>/``; ``compare.json`` holds the summary, ``report.html`` the overlay of the last round.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from qwen_serve.bench.config import RunConfig
from qwen_serve.bench.persist import save_run
from qwen_serve.bench.records import RequestSpec
from qwen_serve.bench.report import render, strict_json
from qwen_serve.bench.run import RunOutcome, build_specs, pool_size
from qwen_serve.bench.stats import median_interval

__all__ = ["Target", "parse_target", "compare", "METRICS"]

METRICS: tuple[tuple[str, ...], ...] = (
    ("request_throughput",), ("output_token_throughput",),
    ("ttft_ms", "mean"), ("ttft_ms", "p50"), ("ttft_ms", "p99"),
    ("tpot_ms", "mean"), ("tpot_ms", "p99"), ("itl_ms", "p50"), ("e2el_ms", "p50"), ("e2el_ms", "p99"),
    ("client", "cpu_util"),
)


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    api_key: str | None = None
    model: str | None = None
    api: str | None = None  # chat | responses; None: the run's --api


def parse_target(text: str) -> Target:
    """``NAME=URL[,api_key=K][,model=M][,api=chat|responses]`` → :class:`Target`; ValueError names the
    malformed part. ``api`` lets one compare the two APIs of the same server."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"target: '{text}' is not NAME=URL[,api_key=K][,model=M][,api=chat|responses]")
    url, *opts = rest.split(",")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"target: {name}: URL must start with http:// or https://, got '{url}'")
    extra: dict[str, str] = {}
    for opt in opts:
        k, s, v = opt.partition("=")
        if not s or k not in ("api_key", "model", "api"):
            raise ValueError(f"target: {name}: unknown option '{opt}' (api_key=K, model=M, api=chat|responses)")
        if k == "api" and v not in ("chat", "responses"):
            raise ValueError(f"target: {name}: api must be chat or responses, got '{v}'")
        extra[k] = v
    return Target(name=name, url=url, api_key=extra.get("api_key"), model=extra.get("model"), api=extra.get("api"))


def _get(result: dict[str, Any], path: Sequence[str]) -> float | None:
    v: Any = result
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


def summarize_rounds(names: Sequence[str], rounds: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians per target and per-round ratios to the first target, for every metric in :data:`METRICS`."""
    base = names[0]
    out: dict[str, Any] = {"baseline": base, "rounds": len(rounds), "metrics": {}}
    for path in METRICS:
        key = ".".join(path)
        entry: dict[str, Any] = {"median": {}, "ratio": {}}
        for name in names:
            entry["median"][name] = median_interval([v for r in rounds if (v := _get(r[name], path)) is not None])
        for name in names[1:]:
            ratios = [a / b for r in rounds
                      if (a := _get(r[name], path)) is not None and (b := _get(r[base], path)) not in (None, 0.0)]
            entry["ratio"][name] = median_interval(ratios)
        out["metrics"][key] = entry
    return out


async def compare(base: RunConfig, targets: Sequence[Target], out: str | Path,
                  execute: Callable[..., Awaitable[RunOutcome]], *, rounds: int = 3,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the rounds, save every run, write ``compare.json`` and the report; return the summary."""
    if len(targets) < 2:
        raise ValueError("compare needs at least two --target")
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("target: names must be unique")
    out = Path(out)
    cfgs = {t.name: base.model_copy(update={"url": t.url, "api_key": t.api_key or base.api_key,
                                            "model": t.model or base.model, "label": t.name,
                                            "api": t.api or base.api}) for t in targets}
    first = cfgs[targets[0].name]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=first.timeout)) as session:
        pool: tuple[list[RequestSpec], bool] = await build_specs(first, session, pool_size(first))
    results: list[dict[str, dict[str, Any]]] = []
    rows: dict[str, list[dict[str, Any]]] = {}
    for n in range(rounds):
        order = [targets[(i + n) % len(targets)] for i in range(len(targets))]
        this: dict[str, dict[str, Any]] = {}
        for t in order:
            cfg = cfgs[t.name].model_copy(update={"seed": base.seed + n})
            outcome = await execute(cfg, specs=pool)
            res = save_run(outcome, out / f"round-{n + 1:02d}" / t.name, report=False)
            this[t.name] = res
            rows[t.name] = [r.to_row() for r in outcome.records]
            say(f"  round {n + 1}/{rounds} {t.name}: {res['request_throughput']:.2f} req/s, "
                f"TTFT mean {res['ttft_ms']['mean'] or 0:.1f} ms, TPOT mean {res['tpot_ms']['mean'] or 0:.2f} ms")
        results.append(this)
    names = [t.name for t in targets]
    summary = summarize_rounds(names, results)
    summary["targets"] = [{"name": t.name, "url": t.url, "model": cfgs[t.name].model} for t in targets]
    summary["config"] = base.public()
    (out / "compare.json").write_text(json.dumps(strict_json(summary), indent=2))
    render(out, [results[-1][n] for n in names], rows, title="qwen-serve bench compare")
    return summary


def table(summary: dict[str, Any]) -> list[str]:
    """The summary as text lines: metric, median per target, ratio [95% interval] (min-max)."""
    names = [t["name"] for t in summary["targets"]]
    lines = [f"{'metric':<26}" + "".join(f"{n:>14}" for n in names)
             + "".join(f"   {n}/{names[0]} [95% CI] (min-max)" for n in names[1:])]
    for key, entry in summary["metrics"].items():
        cells = "".join(f"{_f(entry['median'][n]['median']):>14}" for n in names)
        ratios = "".join(
            f"   {_f(r['median'], 3)} [{_f(r['ci_low'], 3)}-{_f(r['ci_high'], 3)}] ({_f(r['min'], 3)}-{_f(r['max'], 3)})"
            for n in names[1:] for r in [entry["ratio"][n]])
        lines.append(f"{key:<26}{cells}{ratios}")
    return lines


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"

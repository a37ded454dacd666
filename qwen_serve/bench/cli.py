"""``qwen-serve bench run|sweep|compare|report|ceiling``: the command line of the load-testing suite.

:func:`add_parser` attaches the ``bench`` subcommand to ``qwen-serve``'s parser; :func:`main` runs it and
returns the exit code (2 with one line naming the field for a bad flag or scenario value). Load flags
default to "not given", so a ``--scenario FILE`` value is used unless the same flag is on the command
line. The event loop is uvloop when installed (the client's hot path is the loop's I/O).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qwen_serve.bench.config import BenchConfigError, BenchError, RunConfig, build, load_scenario
from qwen_serve.bench.tokenizer import TokenizerUnavailable

__all__ = ["add_parser", "main", "run_async"]

T = TypeVar("T")
EXIT_USAGE = 2
_NOT_LOAD = {"scenario", "out", "rates", "concurrencies", "points", "no_stop", "targets", "rounds", "func",
             "cmd", "bench_cmd", "dirs", "chunks", "client_cpu", "stub_cpu"}


def run_async(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {kind.__name__}") from None
    return parse


def _load_flags(p: argparse.ArgumentParser, *, target: bool = True) -> None:
    S = argparse.SUPPRESS
    g = p.add_argument_group("target")
    if target:
        g.add_argument("--url", default=S, help="server or gateway base URL (http://host:port)")
    g.add_argument("--model", default=S, help="model name to request")
    g.add_argument("--api", choices=["chat", "responses"], default=S,
                   help="OpenAI API to call: chat (/v1/chat/completions, default) or responses (/v1/responses)")
    g.add_argument("--api-key", default=S, help="Bearer key (qwen-serve gateway keys: qs-...)")
    g.add_argument("--api-key-file", default=S, metavar="PATH",
                   help="file holding the Bearer key (~ expanded, content stripped); --api-key wins")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default=S,
                   help="random | sharegpt:FILE | long-context | json-schema | multi-turn | tools (default random)")
    w.add_argument("--input-len", type=int, default=S, help="prompt tokens (exact with the server's /tokenize)")
    w.add_argument("--output-len", type=int, default=S, help="max_tokens (exact with ignore_eos; default 128)")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", default=S,
                   help="let answers stop at EOS (output lengths then vary)")
    w.add_argument("--temperature", type=float, default=S)
    w.add_argument("--tokenizer", choices=["server", "estimate"], default=S,
                   help="server: exact lengths via /tokenize (default); estimate: ~4 chars per token")
    w.add_argument("--turns", type=int, default=S, help="multi-turn: user turns per conversation (default 4)")
    w.add_argument("--shared-prefix-len", type=int, default=S, help="multi-turn: tokens of the shared system prompt")
    w.add_argument("--max-model-len", type=int, default=S, help="long-context/sharegpt: the server's context limit")
    w.add_argument("--pool-size", type=int, default=S, help="distinct requests built before the run (default 512)")
    w.add_argument("--seed", type=int, default=S)
    a = p.add_argument_group("load")
    a.add_argument("--rate", default=S, help="requests/s, or inf (default inf)")
    a.add_argument("--burstiness", type=float, default=S, help="gamma shape: 1 = Poisson, <1 burstier, >1 smoother")
    a.add_argument("--arrival", choices=["constant", "poisson", "gamma"], default=S)
    a.add_argument("--concurrency", type=int, default=S, help="cap on requests in flight")
    a.add_argument("--duration", type=float, default=S, help="seconds to send for")
    a.add_argument("--num-requests", type=int, default=S, help="requests to send")
    a.add_argument("--warmup", type=int, default=S, help="requests sent first and left out of the figures")
    a.add_argument("--ramp-up", type=float, default=S, help="seconds over which the rate rises to --rate")
    a.add_argument("--timeout", type=float, default=S, help="seconds per request (default 600)")
    a.add_argument("--slo", default=S, help="goodput SLOs: ttft_ms=X,tpot_ms=Y,e2el_ms=Z")
    o = p.add_argument_group("observation")
    o.add_argument("--label", default=S)
    o.add_argument("--no-engine-metrics", dest="engine_metrics", action="store_false", default=S,
                   help="do not read the server's /metrics before, during and after")
    o.add_argument("--metrics-url", default=S, help="Prometheus text of the engine (default URL/metrics)")
    o.add_argument("--prometheus-port", type=int, default=S, help="expose the load generator's own metrics here")
    o.add_argument("--prometheus-host", default=S)
    o.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    p.add_argument("--scenario", help="YAML file of any of these settings (flags given here win)")


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible server",
                           description="Load-test an OpenAI-compatible LLM server (vLLM, qwen-serve, ...).")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)

    run = bsub.add_parser("run", help="one load; writes result.json, requests.jsonl/csv, plots, report.html")
    _load_flags(run)
    run.add_argument("--out", help="output directory (default bench-results/<time>)")

    sweep = bsub.add_parser("sweep", help="rising load (rates or concurrencies) up to saturation")
    _load_flags(sweep)
    sweep.add_argument("--rates", type=_csv(float), help="comma-separated request rates")
    sweep.add_argument("--concurrencies", type=_csv(int), help="comma-separated concurrencies (closed loop)")
    sweep.add_argument("--points", type=int, help="automatic: saturation, then POINTS-1 rates below it")
    sweep.add_argument("--no-stop", action="store_true", help="run every point, even past saturation")
    sweep.add_argument("--out")

    cmp_ = bsub.add_parser("compare", help="two or more targets, alternated in rounds; ratios with intervals")
    _load_flags(cmp_, target=False)
    cmp_.add_argument("--target", dest="targets", action="append",
                      help="NAME=URL[,api_key=K][,model=M][,api=chat|responses]; give two or more")
    cmp_.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    cmp_.add_argument("--out")

    rep = bsub.add_parser("report", help="re-render a result directory, or overlay several")
    rep.add_argument("dirs", nargs="+", type=Path)
    rep.add_argument("--out", help="output directory for an overlay (default: the single DIR)")

    ceil = bsub.add_parser("ceiling", help="the load generator's own limit against a built-in trivial server")
    ceil.add_argument("--concurrency", type=int, default=16)
    ceil.add_argument("--chunks", type=int, default=16, help="SSE events per answer")
    ceil.add_argument("--duration", type=float, default=10.0)
    ceil.add_argument("--client-cpu", type=int, help="CPU to pin the client to (default: the first)")
    ceil.add_argument("--stub-cpu", type=int, help="CPU to pin the trivial server to (default: the last)")
    bench.set_defaults(func=main)


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(load settings, other settings): scenario values overlaid by the flags given."""
    values: dict[str, Any] = load_scenario(args.scenario) if getattr(args, "scenario", None) else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "cmd", "bench_cmd", "scenario")}
    # A key given on the command line, in either form, replaces the scenario's key in either form.
    if "api_key" in given or "api_key_file" in given:
        values.pop("api_key", None)
        values.pop("api_key_file", None)
    values.update(given)
    other = {k: values.pop(k) for k in list(values) if k in _NOT_LOAD}
    return values, other


def _out_dir(other: dict[str, Any], kind: str) -> Path:
    import time

    return Path(other.get("out") or Path("bench-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The run's headline figures as text (what ``bench run`` prints)."""
    def lat(key: str) -> str:
        d = r[key]
        if not d.get("n"):
            return f"{key:<16} -"
        return f"{key:<16} mean {d['mean']:9.2f}  p50 {d['p50']:9.2f}  p90 {d['p90']:9.2f}  p99 {d['p99']:9.2f}  max {d['max']:9.2f}"
    t = r["tokens"]
    c = r["concurrency"]
    lines = [
        f"{r['label']}: {r['requests_completed']} ok, {r['requests_failed']} failed in {r['duration_s']:.2f} s",
        f"requests/s {r['request_throughput']:.3f}   output tok/s {r['output_token_throughput']:.1f}   "
        f"total tok/s {r['total_token_throughput']:.1f}"
        + (f"   goodput {r['goodput_rps']:.3f} req/s" if r["goodput_rps"] is not None else ""),
        lat("ttft_ms"), lat("tpot_ms"), lat("itl_ms"), lat("e2el_ms"), lat("schedule_lag_ms"),
        f"tokens from {t['source']}: in {t['input_total']}, out {t['output_total']} "
        f"(client estimate {t['client_output_estimate_total']}, length misses {t['output_length_misses']})",
        f"concurrency asked {c['asked'] or '-'}, achieved mean {c['achieved_mean']:.2f}, peak {c['peak']}; "
        f"client CPU {r['client']['cpu_util']:.0%} of a core",
    ]
    if r.get("engine"):
        e = r["engine"]
        lines.append(f"engine: KV cache peak {_pct(e.get('kv_cache_usage_peak'))}, prefix-cache hit rate "
                     f"{_pct(e.get('prefix_cache_hit_rate'))}, preemptions {e.get('preemptions')}, "
                     f"queue peak {e.get('queue_peak')}")
    if r.get("guided"):
        lines.append(f"guided JSON: {r['guided']['valid']} valid, {r['guided']['invalid']} invalid")
    lines += [f"WARNING: {w}" for w in r["client"]["warnings"]]
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _execute_with(cfg_progress: bool) -> Any:
    from qwen_serve.bench.exporter import BenchExporter
    from qwen_serve.bench.progress import live
    from qwen_serve.bench.run import Progress, execute

    async def go(cfg: RunConfig, **kw: Any) -> Any:
        exporter = None
        if cfg.prometheus_port is not None:
            exporter = BenchExporter(cfg.label or "bench", cfg.prometheus_port, cfg.prometheus_host)
            exporter.set_target(None if math.isinf(cfg.rate) else cfg.rate, cfg.concurrency)
        progress = Progress()
        try:
            async with live(progress, cfg.label or "bench", enabled=cfg.progress and cfg_progress):
                return await execute(cfg, progress=progress, exporter=exporter, **kw)
        finally:
            if exporter is not None:
                exporter.close()
    return go


def main(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except (BenchConfigError, ValueError) as exc:
        print(f"qwen-serve bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenizerUnavailable as exc:
        print(f"qwen-serve bench: {exc} (is the server up? for a server without /tokenize, "
              "--tokenizer estimate sends prompts of about the asked length)", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"qwen-serve bench: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.bench_cmd
    if cmd == "report":
        from qwen_serve.bench.report import render_from_dirs

        out = Path(args.out) if args.out else (args.dirs[0] if len(args.dirs) == 1 else Path("bench-report"))
        print(render_from_dirs(out, list(args.dirs)))
        return 0
    if cmd == "ceiling":
        from qwen_serve.bench.ceiling import default_cpus, measure, save_cached

        client_cpu, stub_cpu = default_cpus()
        fig = measure(run_async, concurrency=args.concurrency, chunks=args.chunks, duration=args.duration,
                      client_cpu=args.client_cpu if args.client_cpu is not None else client_cpu,
                      stub_cpu=args.stub_cpu if args.stub_cpu is not None else stub_cpu)
        path = save_cached(fig)
        print(f"client ceiling (concurrency {fig['concurrency']}, {fig['chunks_per_request']} events per answer, "
              f"client on CPU {fig['client_cpu']}, server on CPU {fig['stub_cpu']}):")
        print(f"  {fig['requests_per_s']:,.0f} requests/s, {fig['chunks_per_s']:,.0f} events/s "
              f"at {fig['client_cpu_util']:.0%} of a core")
        print(f"  per core: {fig['requests_per_s_per_core']:,.0f} requests/s, "
              f"{fig['chunks_per_s_per_core']:,.0f} events/s; achieved concurrency "
              f"{fig['achieved_concurrency']:.1f} of {fig['concurrency']}")
        print(f"  saved to {path}; later runs warn when they come within 70% of it")
        return 0

    values, other = _settings(args)
    go = _execute_with(sys.stderr.isatty())
    if cmd == "compare":
        from qwen_serve.bench.compare import compare, parse_target, table

        targets = [parse_target(t) for t in other.get("targets") or []]
        if targets:
            values.setdefault("url", targets[0].url)
            values.setdefault("model", targets[0].model or values.get("model"))
        cfg = build(values)
        out = _out_dir(other, "compare")
        summary = run_async(compare(cfg, targets, out, go, rounds=int(other.get("rounds") or 3)))
        print("\n".join(table(summary)))
        print(f"report: {out / 'report.html'}")
        return 0
    cfg = build(values)
    if cmd == "sweep":
        from qwen_serve.bench.sweep import sweep

        out = _out_dir(other, "sweep")
        results = run_async(sweep(cfg, out, go, rates=other.get("rates") or (),
                                  concurrencies=other.get("concurrencies") or (), points=other.get("points"),
                                  stop_at_saturation=not other.get("no_stop")))
        print(f"{len(results)} points; report: {out / 'report.html'}")
        return 0
    from qwen_serve.bench.persist import save_run

    out = _out_dir(other, "run")
    outcome = run_async(go(cfg))
    result = save_run(outcome, out)
    print("\n".join(summary_lines(result)))
    print(f"report: {out / 'report.html'}")
    return 0

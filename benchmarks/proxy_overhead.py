#!/usr/bin/env python3
"""Gateway hot-path benchmark: added latency, stream throughput, CPU per request, upstream client.

Measures what the gateway adds on top of the engine (issue 2's targets: <= 1 ms added latency at p50,
<= 5 ms at p99, >= 0.97 of the engine's streamed tokens/s) and compares the two upstream clients
(``gateway.upstream_client: aiohttp | httpx``).

Processes (all on 127.0.0.1, each its own subprocess of this script):

* ``fake``: a fast fake vLLM (``_harness.serve_fake``, style ``vllm``: raw asyncio + uvloop + httptools)
  answering ``/health``, non-streaming chat completions (fixed JSON with ``usage``; after the request
  field ``fake_delay_ms``, if any) and streaming ones: ``max_tokens`` SSE events in vLLM's chunk format
  (role chunk, content chunks, usage chunk when ``stream_options.include_usage``, ``data: [DONE]``), one
  HTTP chunk per event, as fast as possible (yielding to the loop between events) or paced by the request
  field ``fake_interval_ms``.
* ``gateway``: ``build_app(config)`` with auth off under uvicorn (uvloop, httptools), one per
  upstream client, both in front of the same fake.

The load generator (this process: asyncio + aiohttp) runs the scenarios against ``direct`` (the fake
itself), ``aiohttp`` and ``httpx``, rotating the order every round, and reports medians over rounds of
per-round figures (gateway minus direct, gateway / direct). Gateway CPU comes from
``/proc/<pid>/stat`` (utime + stime) around each scenario.

Optionally (``--real-stack /tmp/dev/stack.json`` or ``--engine-url/--gateway-url/--api-key``) it
streams the same seeded requests through a running gateway and directly against its vLLM engine,
alternating, and reports streamed tokens/s (ratio) and first-token latency.

Run::

    .venv/bin/python benchmarks/proxy_overhead.py                 # full run (~6 min on a busy 2-core box)
    .venv/bin/python benchmarks/proxy_overhead.py --quick         # smoke run (1-3 min)
    .venv/bin/python benchmarks/proxy_overhead.py --real-stack /tmp/dev/stack.json --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import (MODEL, Proc, cpu_seconds, free_port, gateway_app, pct, serve_app, serve_fake, spawn, stop,
                      wait_ready)

CLIENTS = ("aiohttp", "httpx")
TARGETS = ("direct", *CLIENTS)


# ============================================================================ load generator
def _chat(stream: bool, n: int = 4, interval_ms: float = 0, delay_ms: float = 0) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": n}
    if stream:
        # include_usage on both paths: the gateway then forwards the body unchanged and the client sees
        # byte-identical streams direct and through the gateway.
        body.update(stream=True, stream_options={"include_usage": True})
    if interval_ms:
        body["fake_interval_ms"] = interval_ms
    if delay_ms:
        body["fake_delay_ms"] = delay_ms
    return json.dumps(body).encode()


_HEADERS = {"content-type": "application/json"}


async def _pool(concurrency: int, total: int, one: Callable[[], Awaitable[Any]]) -> list[Any]:
    results: list[Any] = []
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            results.append(await one())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


@dataclass
class Sample:
    """One scenario against one target in one round."""

    lat_ms: list[float] = field(default_factory=list)   # non-streaming latencies
    ttfe_ms: list[float] = field(default_factory=list)  # streaming: time to first event
    events: int = 0
    wall_s: float = 0.0
    requests: int = 0
    errors: int = 0
    cpu_s: float | None = None  # gateway process CPU during the scenario

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_ms_per_req(self) -> float | None:
        return None if self.cpu_s is None else 1000 * self.cpu_s / self.requests


async def run_nonstream(session: Any, url: str, concurrency: int, total: int, delay_ms: float = 0) -> Sample:
    body = _chat(False, delay_ms=delay_ms)
    sample = Sample()

    async def one() -> None:
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", data=body, headers=_HEADERS) as r:
            data = await r.read()
            ok = r.status == 200 and b'"usage"' in data
        sample.lat_ms.append(1000 * (time.perf_counter() - t0))
        sample.errors += not ok

    t0 = time.perf_counter()
    await _pool(concurrency, total, one)
    sample.wall_s = time.perf_counter() - t0
    sample.requests = total
    return sample


async def run_stream(session: Any, url: str, concurrency: int, total: int, n: int, interval_ms: float) -> Sample:
    body = _chat(True, n, interval_ms)
    expected = n + 3  # role chunk, n content chunks, usage chunk, [DONE]
    sample = Sample()

    async def one() -> None:
        t0 = time.perf_counter()
        count = 0
        prev_nl = False
        async with session.post(url + "/v1/chat/completions", data=body, headers=_HEADERS) as r:
            async for chunk in r.content.iter_any():
                c = chunk.count(b"\n\n") + (prev_nl and chunk[:1] == b"\n")
                if c and not count:
                    sample.ttfe_ms.append(1000 * (time.perf_counter() - t0))
                count += c
                prev_nl = chunk[-1:] == b"\n"
            status = r.status
        sample.events += count
        sample.errors += status != 200 or count != expected

    t0 = time.perf_counter()
    await _pool(concurrency, total, one)
    sample.wall_s = time.perf_counter() - t0
    sample.requests = total
    return sample


@dataclass
class Scenario:
    key: str
    label: str
    kind: str  # nonstream | stream
    concurrency: int
    total: int
    n: int = 0
    interval_ms: float = 0  # streams: fake engine pacing (0 = as fast as possible)
    delay_ms: float = 0  # non-stream: fake engine service time


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    q = 4 if args.quick else 1
    n = args.events
    return [
        Scenario("ns_c1", "non-stream c=1", "nonstream", 1, 600 // q),
        Scenario("ns_c16_d10", "non-stream c=16 10ms", "nonstream", 16, 800 // q, delay_ms=10),
        Scenario("ns_c16", "non-stream c=16 sat", "nonstream", 16, 2000 // q),
        Scenario("st_c1", f"stream c=1 N={n} asap", "stream", 1, 24 // q, n),
        Scenario("st_c16", f"stream c=16 N={n} asap", "stream", 16, 64 // q, n),
        Scenario("st_c64", f"stream c=64 N={n} asap", "stream", 64, 128 // q, n),
        Scenario("st_c1p", f"stream c=1 N={n} 1ev/ms", "stream", 1, 8 // q, n, 1.0),
        Scenario("st_c16p", f"stream c=16 N={n} 1ev/ms", "stream", 16, 32, n, 1.0),
        Scenario("st_c64p", f"stream c=64 N={n} 1ev/ms", "stream", 64, 64, n, 1.0),
        Scenario("st_c64p10", f"stream c=64 N={n} 10ms/ev", "stream", 64, 64, n, 10.0),
    ]


async def run_fake_suite(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    fake_port = free_port()
    procs = [spawn(__file__, "fake", ["_fake", "--port", str(fake_port)], fake_port)]
    fake = procs[0]
    gws: dict[str, Proc] = {}
    for client in CLIENTS:
        port = free_port()
        gws[client] = spawn(__file__, f"gateway-{client}",
                            ["_gateway", "--port", str(port), "--upstream", fake.url, "--client", client], port)
        procs.append(gws[client])
    urls = {"direct": fake.url, **{c: p.url for c, p in gws.items()}}
    pids = {"direct": fake.pid, **{c: p.pid for c, p in gws.items()}}
    results: dict[str, dict[str, list[Sample]]] = {}
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, fake, "/health", timeout=30)
            for p in gws.values():
                await wait_ready(s, p, "/ready", timeout=30)
        plan = scenarios(args)
        for r in range(args.rounds):
            order = TARGETS[r % 3:] + TARGETS[:r % 3]
            print(f"round {r + 1}/{args.rounds} (order: {', '.join(order)})", flush=True)
            for sc in plan:
                for target in order:
                    conn = aiohttp.TCPConnector(limit=0)
                    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300),
                                                     skip_auto_headers=("User-Agent",)) as s:
                        url = urls[target]
                        # Warm-up: open `concurrency` keep-alive connections on both hops.
                        await _pool(sc.concurrency, max(8, sc.concurrency), lambda: _warm(s, url))
                        cpu0 = cpu_seconds(pids[target])
                        if sc.kind == "nonstream":
                            sample = await run_nonstream(s, url, sc.concurrency, sc.total, sc.delay_ms)
                        else:
                            sample = await run_stream(s, url, sc.concurrency, sc.total, sc.n, sc.interval_ms)
                        sample.cpu_s = cpu_seconds(pids[target]) - cpu0
                    results.setdefault(sc.key, {}).setdefault(target, []).append(sample)
                    if sample.errors:
                        print(f"  !! {sc.label} {target}: {sample.errors} errors", flush=True)
    finally:
        stop(procs)
    return {"plan": plan, "results": results}


async def _warm(session: Any, url: str) -> None:
    async with session.post(url + "/v1/chat/completions", data=_chat(False), headers=_HEADERS) as r:
        await r.read()


# ============================================================================ reporting
def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(suite: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in suite["plan"]:
        res = suite["results"][sc.key]
        rounds = len(res["direct"])
        row: dict[str, Any] = {"label": sc.label, "concurrency": sc.concurrency, "requests": sc.total,
                               "rounds": rounds, "events_per_req": sc.n + 3 if sc.kind == "stream" else 0}
        for t in TARGETS:
            samples = res[t]
            d: dict[str, Any] = {"errors": sum(s.errors for s in samples),
                                 "cpu_ms_per_req": med([s.cpu_ms_per_req or 0 for s in samples])}
            if sc.kind == "nonstream":
                d["p50_ms"] = med([pct(s.lat_ms, 50) for s in samples])
                d["p99_ms"] = med([pct(s.lat_ms, 99) for s in samples])
                d["req_per_s"] = med([s.requests / s.wall_s for s in samples])
                d["per_round"] = [{"p50_ms": pct(s.lat_ms, 50), "p99_ms": pct(s.lat_ms, 99),
                                   "cpu_ms_per_req": s.cpu_ms_per_req} for s in samples]
            else:
                d["ttfe_p50_ms"] = med([pct(s.ttfe_ms, 50) for s in samples])
                d["events_per_s"] = med([s.events_per_s for s in samples])
                d["per_round"] = [{"events_per_s": s.events_per_s, "ttfe_p50_ms": pct(s.ttfe_ms, 50),
                                   "cpu_ms_per_req": s.cpu_ms_per_req} for s in samples]
            row[t] = d
        for c in CLIENTS:
            if sc.kind == "nonstream":
                row[c]["added_p50_ms"] = med([pct(g.lat_ms, 50) - pct(d.lat_ms, 50)
                                              for g, d in zip(res[c], res["direct"])])
                row[c]["added_p99_ms"] = med([pct(g.lat_ms, 99) - pct(d.lat_ms, 99)
                                              for g, d in zip(res[c], res["direct"])])
            else:
                row[c]["ratio"] = med([g.events_per_s / d.events_per_s for g, d in zip(res[c], res["direct"])])
                row[c]["added_ttfe_ms"] = med([pct(g.ttfe_ms, 50) - pct(d.ttfe_ms, 50)
                                               for g, d in zip(res[c], res["direct"])])
        out[sc.key] = row
    return out


def _print_table(summary: dict[str, Any], title: str, key: str, width: int, direct_head: str,
                 client_head: Callable[[str], str], direct: Callable[[dict[str, Any]], str],
                 client: Callable[[dict[str, Any]], str]) -> None:
    """One table: a line per scenario that has ``key`` in its ``direct`` figures, direct then each client."""
    print(title)
    print(f"{'scenario':<{width}}{direct_head}" + "".join(client_head(c) for c in CLIENTS))
    for row in summary.values():
        if key in row["direct"]:
            print(f"{row['label']:<{width}}{direct(row['direct'])}" + "".join(client(row[c]) for c in CLIENTS))


def print_tables(summary: dict[str, Any]) -> None:
    _print_table(
        summary, "\nNon-streaming latency (ms; medians over rounds of per-round p50/p99; added = gateway - direct)",
        "p50_ms", 18, f"{'direct p50/p99':>16}", lambda c: f"{c + ' p50/p99':>18}{c + ' added p50/p99':>22}",
        lambda d: f"{d['p50_ms']:>8.2f}/{d['p99_ms']:<7.2f}",
        lambda d: f"{d['p50_ms']:>10.2f}/{d['p99_ms']:<7.2f}{d['added_p50_ms']:>+13.2f}/{d['added_p99_ms']:<+8.2f}")
    _print_table(
        summary, "\nStreaming (events/s summed over streams; ratio = gateway / direct, median of per-round ratios)",
        "events_per_s", 26, f"{'direct ev/s':>12}{'ttfe':>7}", lambda c: f"{c + ' ev/s':>14}{'ratio':>7}{'+ttfe':>7}",
        lambda d: f"{d['events_per_s']:>12.0f}{d['ttfe_p50_ms']:>7.2f}",
        lambda d: f"{d['events_per_s']:>14.0f}{d['ratio']:>7.3f}{d['added_ttfe_ms']:>+7.2f}")
    print("\nGateway process CPU per request (ms; /proc utime+stime; 'direct' = the fake upstream itself)")
    print(f"{'scenario':<26}" + "".join(f"{t:>10}" for t in TARGETS) + f"{'httpx/aiohttp':>15}"
          + f"{'us/event aiohttp/httpx':>24}")
    for row in summary.values():
        a, h = row["aiohttp"]["cpu_ms_per_req"], row["httpx"]["cpu_ms_per_req"]
        per_event = ""
        if row["events_per_req"]:
            per_event = f"{1000 * a / row['events_per_req']:>16.1f}/{1000 * h / row['events_per_req']:<7.1f}"
        print(f"{row['label']:<26}" + "".join(f"{row[t]['cpu_ms_per_req']:>10.3f}" for t in TARGETS)
              + f"{(h / a if a else float('nan')):>15.2f}" + per_event)
    errors = {f"{k}/{t}": row[t]["errors"] for k, row in summary.items() for t in TARGETS if row[t]["errors"]}
    if errors:
        print(f"\nERRORS: {errors}")


# ============================================================================ real engine (optional)
async def run_real(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    gw_url, engine_url, key, gw_pid = args.gateway_url, args.engine_url, args.api_key, args.gateway_pid
    if args.real_stack:
        stack = json.loads(Path(args.real_stack).read_text())
        gw_url = gw_url or stack["url"]
        engine_url = engine_url or stack["engine_url"]
        key = key or stack["keys"]["admin"]
        gw_pid = gw_pid or stack.get("pid")  # the `qwen-serve up` process: gateway + supervisor
    gw_cpu = 0.0
    gw_tokens = 0
    targets = {"direct": (engine_url.rstrip("/"), {}),
               "gateway": (gw_url.rstrip("/"), {"authorization": f"Bearer {key}"} if key else {})}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.get(engine_url.rstrip("/") + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]

        def body(i: int, max_tokens: int) -> bytes:
            return json.dumps({
                "model": model, "messages": [{"role": "user", "content": f"Count with me, request {i}."}],
                "max_tokens": max_tokens, "temperature": 0, "seed": 1234 + i, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }).encode()

        async def one(target: str, i: int, max_tokens: int) -> tuple[int, float, float, float, str]:
            """One stream: (completion tokens, first-token s, last-token s, total s, text)."""
            url, headers = targets[target]
            t0 = time.perf_counter()
            first = last = float("nan")
            tokens = 0
            text: list[str] = []
            buf = b""
            async with s.post(url + "/v1/chat/completions", data=body(i, max_tokens),
                              headers={**_HEADERS, **headers}) as r:
                if r.status != 200:
                    raise SystemExit(f"{target}: HTTP {r.status}: {(await r.read())[:300]!r}")
                async for chunk in r.content.iter_any():
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        if not ev.startswith(b"data: {"):
                            continue
                        obj = json.loads(ev[6:])
                        for ch in obj.get("choices") or ():
                            piece = (ch.get("delta") or {}).get("content")
                            if piece:
                                last = time.perf_counter() - t0
                                if first != first:
                                    first = last
                                text.append(piece)
                        if obj.get("usage"):
                            tokens = int(obj["usage"]["completion_tokens"])
            return tokens, first, last, time.perf_counter() - t0, "".join(text)

        # Warm-up (and the seeded-equality check) on both paths.
        texts = {t: (await one(t, 0, 32))[4] for t in targets}
        same_text = texts["direct"] == texts["gateway"]

        tps: dict[str, list[float]] = {"direct": [], "gateway": []}
        ratios: list[float] = []
        for rnd in range(args.real_rounds):
            order = ("direct", "gateway") if rnd % 2 == 0 else ("gateway", "direct")
            got: dict[str, float] = {}
            for t in order:
                cpu0 = cpu_seconds(gw_pid) if gw_pid and t == "gateway" else 0.0
                t0 = time.perf_counter()
                res = await asyncio.gather(*(one(t, 100 + i, args.real_tokens) for i in range(args.real_concurrency)))
                got[t] = sum(x[0] for x in res) / (time.perf_counter() - t0)
                if gw_pid and t == "gateway":
                    gw_cpu += cpu_seconds(gw_pid) - cpu0
                    gw_tokens += sum(x[0] for x in res)
                tps[t].append(got[t])
            ratios.append(got["gateway"] / got["direct"])
            print(f"  real round {rnd + 1}: direct {got['direct']:.1f} tok/s, gateway {got['gateway']:.1f} tok/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        # Mixed batches: half the streams direct, half through the gateway, in the same engine batch, so
        # the engine's speed (noisy on a shared box) cancels out; per-stream tokens / stream duration.
        mixed: list[float] = []
        for rnd in range(args.real_rounds):
            who = [("gateway", "direct")[(i + rnd) % 2] for i in range(args.real_concurrency)]
            res = await asyncio.gather(*(one(t, 200 + i, args.real_tokens) for i, t in enumerate(who)))
            rate = {t: statistics.mean(x[0] / x[3] for x, w in zip(res, who) if w == t) for t in targets}
            mixed.append(rate["gateway"] / rate["direct"])
        print(f"  mixed batches, per-round ratio: {' '.join(f'{x:.3f}' for x in mixed)}", flush=True)
        ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
        for rnd in range(args.real_ttft_pairs):
            for t in (("direct", "gateway") if rnd % 2 == 0 else ("gateway", "direct")):
                ttft[t].append(1000 * (await one(t, 7, 8))[1])
    return {
        "model": model, "concurrency": args.real_concurrency, "max_tokens": args.real_tokens,
        "rounds": args.real_rounds, "same_seeded_text": same_text,
        "direct_tok_s": med(tps["direct"]), "gateway_tok_s": med(tps["gateway"]), "ratio": med(ratios),
        "ratio_q1": pct(ratios, 25), "ratio_q3": pct(ratios, 75),
        "ratio_sum": sum(tps["gateway"]) / sum(tps["direct"]),
        "ttft_direct_ms": med(ttft["direct"]), "ttft_gateway_ms": med(ttft["gateway"]),
        "ttft_added_ms": med([g - d for g, d in zip(ttft["gateway"], ttft["direct"])]),
        "ttft_pairs": args.real_ttft_pairs,
        "gateway_cpu_us_per_token": 1e6 * gw_cpu / gw_tokens if gw_tokens else None,
        "mixed_ratio": med(mixed), "mixed_q1": pct(mixed, 25), "mixed_q3": pct(mixed, 75),
    }


# ============================================================================ main
def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("role", nargs="?", default="bench", choices=("bench", "_fake", "_gateway"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    p.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=5, help="A/B/C rounds (order rotates each round); default 5")
    p.add_argument("--events", type=int, default=256, help="SSE content events per stream; default 256")
    p.add_argument("--quick", action="store_true", help="a quarter of the requests, 2 rounds (smoke run)")
    p.add_argument("--skip-fake", action="store_true", help="only the real-engine part")
    p.add_argument("--real-stack", help="stack.json of a running dev stack (url, engine_url, keys.admin)")
    p.add_argument("--gateway-url", help="real gateway URL (with --engine-url)")
    p.add_argument("--engine-url", help="real vLLM URL behind that gateway")
    p.add_argument("--api-key", help="API key for the real gateway")
    p.add_argument("--real-concurrency", type=int, default=4)
    p.add_argument("--real-tokens", type=int, default=256, help="max_tokens per real request (ignore_eos)")
    p.add_argument("--gateway-pid", type=int, help="pid of the real gateway, for its CPU per token")
    p.add_argument("--real-rounds", type=int, default=16, help="alternating direct/gateway rounds")
    p.add_argument("--real-ttft-pairs", type=int, default=10)
    p.add_argument("--json", help="write raw summary JSON here")
    args = p.parse_args(argv)
    if args.quick and args.rounds == 5:
        args.rounds = 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.role == "_fake":
        serve_fake(args.port, "vllm")
        return 0
    if args.role == "_gateway":
        serve_app(gateway_app(args.port, args.upstream, {"enabled": False}, upstream_client=args.client), args.port)
        return 0

    import uvloop

    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                                       "python": sys.version.split()[0]}}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    if not args.skip_fake:
        suite = uvloop.run(run_fake_suite(args))
        summary = summarize(suite)
        print_tables(summary)
        out["fake"] = summary
    if args.real_stack or args.gateway_url:
        print("\nReal engine: streamed tokens/s and first-token latency, gateway vs direct (alternating)")
        real = uvloop.run(run_real(args))
        out["real"] = real
        print(f"  model {real['model']}, c={real['concurrency']}, max_tokens={real['max_tokens']}, "
              f"{real['rounds']} rounds: direct {real['direct_tok_s']:.1f} tok/s, gateway "
              f"{real['gateway_tok_s']:.1f} tok/s (medians); per-round ratio median {real['ratio']:.3f} "
              f"(IQR {real['ratio_q1']:.3f}-{real['ratio_q3']:.3f}), ratio of sums {real['ratio_sum']:.3f}; "
              f"seeded text identical: {real['same_seeded_text']}")
        print(f"  mixed batches (half direct, half gateway, same engine batch): per-stream tokens/s ratio "
              f"median {real['mixed_ratio']:.3f} (IQR {real['mixed_q1']:.3f}-{real['mixed_q3']:.3f})")
        if real["gateway_cpu_us_per_token"] is not None:
            print(f"  gateway process CPU per streamed token: {real['gateway_cpu_us_per_token']:.1f} us")
        print(f"  first token (median of {real['ttft_pairs']} alternating pairs): direct {real['ttft_direct_ms']:.1f} "
              f"ms, gateway {real['ttft_gateway_ms']:.1f} ms, added {real['ttft_added_ms']:+.1f} ms")
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["machine"].update(loadavg_end=os.getloadavg(), wall_s=time.monotonic() - t0,
                          loadgen_cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime))
    print(f"\nwall {out['machine']['wall_s']:.0f} s; load average start {out['machine']['loadavg_start'][0]:.2f}, "
          f"end {out['machine']['loadavg_end'][0]:.2f}; load generator CPU {out['machine']['loadgen_cpu_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

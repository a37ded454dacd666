"""The gateway's garbage-collector settings: tuned (``qwen_serve.gc_tuning``) vs CPython's defaults.

Two gateway processes (auth off, default config) in front of one fast fake upstream, loaded in turn by
this process (asyncio + aiohttp, keep-alive, ``--concurrency`` workers), rounds alternating ABBA. Each
gateway records the time its collector runs (``gc.callbacks``) and reports it on SIGUSR1, so every round
gives: req/s, the gateway's CPU per request (from /proc) and the share of it spent collecting, with the
collections per generation.

    .venv/bin/python benchmarks/gc_tuning.py --rounds 12 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import (  # noqa: E402
    cpu_seconds,
    free_port,
    gateway_app,
    serve_app,
    serve_fake,
    spawn,
    stop,
    wait_ready,
)

CONFIGS = ("tuned", "default")
BODY = json.dumps({"model": "qwen2-random", "messages": [{"role": "user", "content": "Say hi."}],
                   "max_tokens": 4}).encode()


def serve_gateway(port: int, upstream: str, config: str, stats_file: str) -> None:
    """Gateway process: record the collector's time per generation; write it to ``stats_file`` on SIGUSR1."""
    import gc

    totals = {g: [0, 0.0] for g in range(3)}  # generation: [collections, seconds]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            total = totals[info["generation"]]
            total[0] += 1
            total[1] += time.perf_counter() - started[0]

    def dump(*_: object) -> None:
        Path(stats_file).write_text(json.dumps({"gc": totals, "threshold": gc.get_threshold(),
                                                "frozen": gc.get_freeze_count()}))

    gc.callbacks.append(on_gc)
    signal.signal(signal.SIGUSR1, dump)
    serve_app(gateway_app(port, upstream, {"enabled": False}), port, tune_gc=config == "tuned")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    work = Path(tempfile.mkdtemp(prefix="gc-tuning-"))
    fake_port = free_port()
    fake = spawn(__file__, "fake", ["_fake", "--port", str(fake_port)], fake_port)
    gateways, stats_files = {}, {}
    for cfg in CONFIGS:
        port = free_port()
        stats_files[cfg] = work / f"{cfg}.json"
        gateways[cfg] = spawn(__file__, cfg, ["_gateway", "--port", str(port), "--upstream", fake.url,
                                              "--config", cfg, "--stats", str(stats_files[cfg])], port)
    rows: list[dict[str, Any]] = []

    async def gc_totals(cfg: str) -> dict[str, Any]:
        stats_files[cfg].unlink(missing_ok=True)
        gateways[cfg].popen.send_signal(signal.SIGUSR1)
        for _ in range(100):
            await asyncio.sleep(0.02)
            try:
                return dict(json.loads(stats_files[cfg].read_text()))
            except (OSError, ValueError):
                continue
        raise SystemExit(f"{cfg} gateway did not report its collector totals")

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_ready(session, fake, "/health")
            for gw in gateways.values():
                await wait_ready(session, gw, "/ready")

            async def load(cfg: str, seconds: float) -> int:
                url = gateways[cfg].url + "/v1/chat/completions"
                end = time.monotonic() + seconds
                done = [0]

                async def worker() -> None:
                    while time.monotonic() < end:
                        async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                            await r.read()
                            if r.status != 200:
                                raise SystemExit(f"{cfg} gateway answered {r.status}")
                            done[0] += 1

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                return done[0]

            for cfg in CONFIGS:  # warm-up: imports, pools, label children
                await load(cfg, 1.0)
            for i in range(args.rounds):
                order = CONFIGS if i % 4 in (0, 3) else CONFIGS[::-1]  # ABBA
                for cfg in order:
                    before, cpu0 = await gc_totals(cfg), cpu_seconds(gateways[cfg].pid)
                    t0 = time.monotonic()
                    n = await load(cfg, args.duration)
                    elapsed = time.monotonic() - t0
                    after, cpu1 = await gc_totals(cfg), cpu_seconds(gateways[cfg].pid)
                    gc_s = sum(after["gc"][g][1] - before["gc"][g][1] for g in "012")
                    rows.append({
                        "round": i, "config": cfg, "requests": n, "rps": n / elapsed,
                        "cpu_ms_per_req": 1000 * (cpu1 - cpu0) / n,
                        "gc_share": gc_s / max(cpu1 - cpu0, 1e-9),
                        "collections_per_1000": [1000 * (after["gc"][g][0] - before["gc"][g][0]) / n for g in "012"],
                        "threshold": after["threshold"], "frozen": after["frozen"],
                    })
                    r = rows[-1]
                    print(f"{i:3d} {cfg:8s} {r['rps']:7.0f} req/s  {r['cpu_ms_per_req']:.3f} ms CPU/req  "
                          f"GC {100 * r['gc_share']:4.1f}% of CPU  collections/1000 req "
                          f"{[round(c, 1) for c in r['collections_per_1000']]}", flush=True)
    finally:
        stop([fake, *gateways.values()])
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {cfg: [r for r in rows if r["config"] == cfg] for cfg in CONFIGS}
    ratios = [t["rps"] / d["rps"] for t, d in zip(by["tuned"], by["default"], strict=True)]
    blocks = [(ratios[i] + ratios[i + 1]) / 2 for i in range(0, len(ratios) - 1, 2)]
    mean = statistics.fmean(blocks)
    half = 1.96 * statistics.stdev(blocks) / len(blocks) ** 0.5 if len(blocks) > 1 else float("nan")
    out: dict[str, Any] = {"blocks": len(blocks), "tuned_over_default": {"mean": mean, "ci95": [mean - half, mean + half],
                                                                         "median": statistics.median(blocks)}}
    for cfg, rs in by.items():
        out[cfg] = {
            "median_rps": statistics.median(r["rps"] for r in rs),
            "median_cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in rs),
            "median_gc_share": statistics.median(r["gc_share"] for r in rs),
            "median_collections_per_1000": [statistics.median(r["collections_per_1000"][g] for r in rs)
                                            for g in range(3)],
            "threshold": rs[-1]["threshold"], "frozen": rs[-1]["frozen"],
        }
    return out


def report(s: dict[str, Any]) -> None:
    r = s["tuned_over_default"]
    print(f"\ntuned/default req/s over {s['blocks']} ABBA blocks: mean {r['mean']:.3f} "
          f"(95% CI {r['ci95'][0]:.3f} to {r['ci95'][1]:.3f}), median {r['median']:.3f}")
    for cfg in CONFIGS:
        c = s[cfg]
        print(f"{cfg:8s} median {c['median_rps']:.0f} req/s, {c['median_cpu_ms_per_req']:.3f} ms CPU/req, "
              f"GC {100 * c['median_gc_share']:.1f}% of CPU, collections per 1000 requests (gen 0/1/2) "
              f"{[round(x, 1) for x in c['median_collections_per_1000']]}; threshold {c['threshold']}, "
              f"frozen objects {c['frozen']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", nargs="?", default="run", choices=["run", "_fake", "_gateway"])
    p.add_argument("--port", type=int)
    p.add_argument("--upstream")
    p.add_argument("--config", choices=CONFIGS)
    p.add_argument("--stats")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per gateway per round")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.cmd == "_fake":
        serve_fake(args.port, "minimal")
        return 0
    if args.cmd == "_gateway":
        serve_gateway(args.port, args.upstream, args.config, args.stats)
        return 0
    summary = asyncio.run(run(args))
    report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

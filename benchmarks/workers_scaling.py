#!/usr/bin/env python3
"""Relayed SSE events/s through ``gateway.workers`` = 1, 2, ... gateway processes in front of a fast upstream.

Contract:

* Upstream: the built-in stub (:func:`qwen_serve.bench.stub.start_stub`, style ``vllm``: one SSE event per
  token), on 127.0.0.1: as fast as its loop turns (many events then share one read), or one event every
  ``--interval-ms`` per stream (each event its own read, as a GPU engine's steps arrive).
* Gateways: for each ``--workers`` value, ``python -m qwen_serve gateway --upstream <stub>`` with auth off,
  ``gateway.workers`` set to it (1: the single-process path), started once and kept for the whole run.
* Load: this script's ``_client`` subcommand in a subprocess: an aiohttp loop (uvloop) keeping
  ``--concurrency`` streamed chat completions of ``--tokens`` tokens in flight for ``--duration`` s on
  keep-alive connections (one per stream slot, so ``SO_REUSEPORT`` spreads them over the workers), counting
  the ``data:`` events it receives. Rounds rotate the order of the gateways.
* Figures per leg: events/s (events received ÷ the client's measured wall time), the CPU time of the
  gateway's processes (the supervisor and its workers; ``/proc/<pid>/task/*/schedstat``, exact) per event,
  and the CPU utilisation (cores) of the gateway, the stub and the client over the leg. Summary: medians over
  rounds per gateway and the ratio of each to the first.
* All processes are unpinned unless ``--pin`` (gateway on the last CPU set, stub and client on the others;
  with 2 CPUs one worker then cannot use a second core, which is the point of having more than one, so
  pinning only makes sense on bigger machines). On a 2-core machine the client and the stub compete with
  the gateway for the same two cores: what N workers can do there is bounded by the cores left to them.
* Every loop is bounded (``--rounds`` x gateways x ``--duration``, a 120 s timeout per leg); exit status 1
  when a leg failed.
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

from _harness import MODEL, ROOT, free_port, markdown_table


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of every thread of ``pid`` (0 when it is gone)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        grew = bool(more)
        found |= more
    return sorted(found)


def client_main(url: str, concurrency: int, tokens: int, duration: float, interval_ms: float, out: Path) -> None:
    import aiohttp
    import uvloop

    request: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "w1 w2 w3"}],
                               "max_tokens": tokens, "stream": True}
    if interval_ms > 0:
        request["fake_interval_ms"] = interval_ms
    body = json.dumps(request).encode()
    headers = {"content-type": "application/json"}
    events = streams = errors = 0

    async def slot(deadline: float) -> None:
        nonlocal events, streams, errors
        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:  # one connection per slot
            while time.perf_counter() < deadline:
                try:
                    async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
                        async for chunk in resp.content.iter_any():
                            events += chunk.count(b"data: ")
                        streams += resp.status == 200
                        errors += resp.status != 200
                except aiohttp.ClientError:
                    errors += 1

    async def main() -> dict[str, float]:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(slot(t0 + duration) for _ in range(concurrency)))
        return {"events": events, "streams": streams, "errors": errors, "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu0}

    out.write_text(json.dumps(uvloop.run(main())))


def start_gateway(workers: int, upstream: str, work: Path,
                  cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = work / f"gateway-{workers}.yaml"
    cfg.write_text(json.dumps({"model": {"source": MODEL}, "auth": {"enabled": False},
                               "gateway": {"host": "127.0.0.1", "port": port, "workers": workers, "ui": False}}))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "gateway", "--config", str(cfg), "--upstream",
                             upstream], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200 and len(tree(proc.pid)) >= workers + (workers > 1):
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the gateway with {workers} worker(s) did not start")


def main() -> int:
    if sys.argv[1:2] == ["_client"]:
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]),
                    Path(sys.argv[7]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="comma-separated gateway.workers values")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--interval-ms", type=float, default=0.0, help="stub pacing per stream (0: as fast as it can)")
    p.add_argument("--pin", action="store_true", help="gateway on the last CPU set, stub and client on the rest")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    gw_cpus = client_cpus = None
    if args.pin and len(cpus) > 2:
        half = len(cpus) // 2
        gw_cpus, client_cpus = set(cpus[half:]), set(cpus[:half])
    load0 = os.getloadavg()[0]
    from qwen_serve.bench.stub import start_stub

    rows: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="workers-scaling-") as tmp, start_stub(style="vllm") as stub:
        work = Path(tmp)
        gateways: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for n in counts:
                gateways[n] = start_gateway(n, stub.url, work, gw_cpus)
            for rnd in range(args.rounds):
                order = counts[rnd % len(counts):] + counts[:rnd % len(counts)]
                for n in order:
                    proc, url = gateways[n]
                    pids = tree(proc.pid)
                    out = work / f"client-{rnd}-{n}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "_client", url, str(args.concurrency),
                           str(args.tokens), str(args.duration), str(args.interval_ms), str(out)]
                    pin = (lambda: os.sched_setaffinity(0, client_cpus)) if client_cpus else None
                    g0, s0, t0 = sum(cpu_ns(pid) for pid in pids), cpu_ns(stub.pid), time.perf_counter()
                    rc = subprocess.run(cmd, cwd=ROOT, preexec_fn=pin, timeout=args.duration + 120).returncode
                    wall = time.perf_counter() - t0
                    g1, s1 = sum(cpu_ns(pid) for pid in pids), cpu_ns(stub.pid)
                    if rc != 0 or not out.exists():
                        bad += 1
                        continue
                    r = json.loads(out.read_text())
                    bad += r["errors"] > 0
                    row = {"events_per_s": r["events"] / r["wall_s"], "errors": r["errors"],
                           "gateway_us_per_event": (g1 - g0) / 1e3 / max(1, r["events"]),
                           "gateway_cores": (g1 - g0) / 1e9 / wall, "stub_cores": (s1 - s0) / 1e9 / wall,
                           "client_cores": r["cpu_s"] / r["wall_s"]}
                    rows[n].append(row)
                    print(f"round {rnd + 1}, {n} worker(s): {row['events_per_s']:,.0f} events/s, "
                          f"{row['gateway_us_per_event']:.1f} µs gateway CPU/event, cores: gateway "
                          f"{row['gateway_cores']:.2f} stub {row['stub_cores']:.2f} client {row['client_cores']:.2f}",
                          flush=True)
        finally:
            for proc, _ in gateways.values():
                proc.terminate()
            for proc, _ in gateways.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}; load "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}; concurrency {args.concurrency}, {args.tokens} tokens/stream, "
          f"interval {args.interval_ms:g} ms, "
          f"{args.rounds} rounds x {args.duration:g} s" + ("; pinned" if gw_cpus else "; unpinned"))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items() if rs}
    base = med.get(counts[0], {}).get("events_per_s")
    table = [[n, f"{m['events_per_s']:,.0f}", f"{m['events_per_s'] / base:.2f}" if base else "-",
              f"{m['gateway_us_per_event']:.1f}", f"{m['gateway_cores']:.2f}", f"{m['stub_cores']:.2f}",
              f"{m['client_cores']:.2f}"] for n, m in med.items()]
    print("\n".join(markdown_table(["workers", "events/s", "× first", "gateway µs CPU/event", "gateway cores",
                                    "stub cores", "client cores"], table)))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rows,
                                         "medians": med}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Gateway overhead against a fake engine: the gateway's own cost, with the engine's noise removed.

Contract:

* Everything runs on 127.0.0.1: the built-in stub (:func:`qwen_serve.bench.stub.start_stub`, style
  ``vllm``, one SSE event per token and loop turn) and two gateway processes in front of it
  (``_harness.gateway_app`` + ``serve_app``, the settings ``qwen-serve`` serves with): ``gateway`` with
  auth off, ``gateway-stock-http`` the same app on uvicorn's stock httptools protocol (no head cap or
  timeouts: the A/B of the gateway's HTTP protocol), ``gateway-auth`` with auth on and a keys file of one key without limits, made with
  :func:`qwen_serve.keys.create_key` in a temporary directory (its secret reaches ``bench compare`` on its
  command line only; it is never printed or written to a file).
* Pinning (``os.sched_setaffinity``): the stub and both gateways on ``--server-cpu`` (default: the last
  CPU), the load generator on ``--client-cpu`` (default: CPU 0). The client's core is then the same
  for every target, and the server core does the stub's work alone (``direct``) or the stub's plus one
  gateway's: what changes between targets is the gateway's work (in a closed loop ``direct`` may be
  limited by the client instead; its client CPU utilisation shows it). With one CPU nothing is pinned.
* It runs ``python -m qwen_serve bench compare`` as a subprocess with the targets ``direct`` (the stub),
  ``gateway`` and ``gateway-auth``, model :data:`_harness.MODEL`, streaming, ``--rate`` (default ``inf``:
  a closed loop) with at most ``--concurrency`` in flight, ``--rounds`` rounds of ``--duration`` s (the
  order rotates every round), its engine-metrics polling off, and prints its table. It adds each
  gateway's CPU time per request: its ``/proc`` CPU seconds over the whole compare run ÷ the requests it
  served (warm-up included).
* ``--write`` puts the figures into ``benchmarks/RESULTS.md`` as the section "Gateway overhead against the
  fake engine", dated today (UTC). Exit status: that of ``bench compare`` (1 if it wrote no summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _harness import (MODEL, RESULTS, ROOT, cpu_seconds, free_port, gateway_app, markdown_table, serve_app,
                      write_section)

TITLE = "Gateway overhead against the fake engine"
TARGETS = ("direct", "gateway", "gateway-stock-http", "gateway-auth")
ROWS = (("request_throughput", "req/s", 0), ("output_token_throughput", "output tok/s", 0),
        ("ttft_ms.p50", "TTFT p50 ms", 2), ("ttft_ms.p99", "TTFT p99 ms", 2), ("e2el_ms.p50", "E2E p50 ms", 2),
        ("e2el_ms.p99", "E2E p99 ms", 2), ("client.cpu_util", "client CPU util", 2))


def start_gateway(port: int, upstream: str, keys_file: Path | None, cpu: int | None,
                  http: str = "gateway") -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_gateway", str(port), upstream, str(keys_file or ""),
           http]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=pin)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and popen.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return popen
        except OSError:
            pass
        time.sleep(0.1)
    popen.kill()
    popen.wait()
    raise SystemExit(f"gateway on port {port} did not start")


def count(out: Path, target: str, keys: tuple[str, ...]) -> int:
    """The sum of ``keys`` over the target's ``result.json`` of every round."""
    return sum(int(json.loads(f.read_text()).get(k) or 0) for f in out.glob(f"round-*/{target}/result.json")
               for k in keys)


def served(out: Path, target: str) -> int:
    return count(out, target, ("requests_completed", "requests_failed", "requests_warmup"))


def failed(out: Path, target: str) -> int:
    return count(out, target, ("requests_failed",))


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(summary: dict[str, Any], cpu_us: dict[str, float], args: argparse.Namespace, command: str) -> str:
    pin = (f"stub and gateways pinned to CPU {args.server_cpu}, `bench compare` to CPU {args.client_cpu}"
           if args.server_cpu is not None else "nothing pinned (one CPU)")
    git = [subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
           for a in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain"])]
    lines = ["Command:", "```sh", command, "```", "",
             f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), kernel "
             f"{platform.release()}, Python {platform.python_version()}; {pin}. Load average (1 min) before / "
             f"after: {args.load} / {os.getloadavg()[0]:.2f}. Measured {time.strftime('%H:%M UTC', time.gmtime())}.",
             f"Commit: `{git[0] or 'unknown'}`" + (" plus uncommitted changes." if git[1] else "."), "",
             f"The built-in stub (style `vllm`) direct, behind a gateway with auth off, the same on uvicorn's stock "
             f"httptools protocol (`gateway-stock-http`), and behind one with auth on (one key, no limits); `bench compare`: streaming chat, {args.input_len} prompt tokens, "
             f"{args.output_len} output tokens, rate {args.rate}, concurrency {args.concurrency}, {args.rounds} rounds "
             f"of {args.duration:g} s, order rotated every round. Figures: medians over rounds; ratio = target ÷ "
             "direct per round, median [bootstrap 95% interval] (min-max). Failed requests: "
             f"{sum(failed(args.out_dir, t) for t in TARGETS)}.", ""]
    head = ["metric", *TARGETS] + [f"{t}/direct" for t in TARGETS[1:]]
    rows = []
    for key, label, digits in ROWS:
        e = summary["metrics"][key]
        rows.append([label, *(fmt(e["median"][t]["median"], digits) for t in TARGETS)] + [
            f"{fmt(r['median'], 3)} [{fmt(r['ci_low'], 3)}-{fmt(r['ci_high'], 3)}] "
            f"({fmt(r['min'], 3)}-{fmt(r['max'], 3)})"
            for t in TARGETS[1:] for r in [e["ratio"][t]]])
    rows.append(["gateway CPU per request, µs", "-", *(fmt(cpu_us[t], 0) for t in TARGETS[1:]),
                 *([""] * len(TARGETS[1:]))])
    return "\n".join(lines + markdown_table(head, rows)) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["_gateway"]:
        port, upstream, keys, http = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
        auth = {"enabled": True, "keys_file": keys} if keys else {"enabled": False}
        serve_app(gateway_app(port, upstream, auth), port, http)
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per target per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", default="inf", help="requests/s, or inf (closed loop at --concurrency)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16, help="streamed tokens (events) per request")
    p.add_argument("--warmup", type=int, default=32, help="requests per run left out of the figures")
    p.add_argument("--server-cpu", type=int, default=cpus[-1] if len(cpus) > 1 else None)
    p.add_argument("--client-cpu", type=int, default=cpus[0] if len(cpus) > 1 else None)
    p.add_argument("--out", type=Path, default=None,
                   help="keep bench compare's output here (default: a temporary directory, removed at exit)")
    p.add_argument("--write", action="store_true", help="add the figures to benchmarks/RESULTS.md")
    args = p.parse_args()
    args.load = f"{os.getloadavg()[0]:.2f}"
    from qwen_serve.bench.stub import start_stub
    from qwen_serve.keys import create_key

    with tempfile.TemporaryDirectory(prefix="gw-overhead-") as tmp:
        keys_file, out = Path(tmp) / "keys.yaml", args.out or Path(tmp) / "compare"
        args.out_dir = out
        secret = create_key(keys_file, "bench")
        gws: dict[str, subprocess.Popen[bytes]] = {}
        with start_stub(chunks_default=args.output_len, style="vllm", cpu=args.server_cpu) as stub:
            try:
                ports = {t: free_port() for t in TARGETS[1:]}
                gws["gateway"] = start_gateway(ports["gateway"], stub.url, None, args.server_cpu)
                gws["gateway-stock-http"] = start_gateway(ports["gateway-stock-http"], stub.url, None,
                                                          args.server_cpu, http="stock")
                gws["gateway-auth"] = start_gateway(ports["gateway-auth"], stub.url, keys_file, args.server_cpu)
                cmd = [sys.executable, "-m", "qwen_serve", "bench", "compare", "--target", f"direct={stub.url}",
                       "--target", f"gateway=http://127.0.0.1:{ports['gateway']}",
                       "--target", f"gateway-stock-http=http://127.0.0.1:{ports['gateway-stock-http']}",
                       "--target", f"gateway-auth=http://127.0.0.1:{ports['gateway-auth']},api_key={secret}",
                       "--model", MODEL, "--workload", "random", "--input-len", str(args.input_len),
                       "--output-len", str(args.output_len), "--rate", args.rate,
                       "--concurrency", str(args.concurrency), "--duration", str(args.duration),
                       "--warmup", str(args.warmup), "--rounds", str(args.rounds),
                       "--no-engine-metrics", "--no-progress", "--out", str(out)]
                print("running:", shlex.join(cmd).replace(secret, "qs-..."), flush=True)
                cpu0 = {t: cpu_seconds(g.pid) for t, g in gws.items()}
                pin = (lambda: os.sched_setaffinity(0, {args.client_cpu})) if args.client_cpu is not None else None
                rc = subprocess.run(cmd, cwd=ROOT, preexec_fn=pin).returncode
                cpu_us = {t: (cpu_seconds(g.pid) - cpu0[t]) * 1e6 / max(1, served(out, t)) for t, g in gws.items()}
            finally:
                for g in gws.values():
                    g.terminate()
                    g.wait(10)
        if rc != 0 or not (out / "compare.json").exists():
            return rc or 1
        print("gateway CPU per request (µs): " + ", ".join(f"{t} {v:,.0f}" for t, v in cpu_us.items()))
        if args.write:
            argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--write" and not a.startswith("--out")
                    and sys.argv[i] != "--out"]  # sys.argv[i] is the argument before a
            command = " ".join([".venv/bin/python benchmarks/gateway_overhead.py", *map(shlex.quote, argv)])
            summary = json.loads((out / "compare.json").read_text())
            print("wrote", write_section(TITLE, markdown(summary, cpu_us, args, command)), "to", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

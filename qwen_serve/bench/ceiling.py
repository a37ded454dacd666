"""``bench ceiling``: the load generator's own limit, against the built-in trivial upstream.

:func:`measure` starts :mod:`qwen_serve.bench.stub` in a subprocess (pinned to another core when there
is one), runs the client closed-loop against it in this process (pinned to ``client_cpu``), and returns
requests/s and events ("chunks") per second, both as measured and per core of client CPU. The figures
are cached (:func:`save_cached`, ``$XDG_CACHE_HOME/qwen-serve/bench-ceiling.json``) so every later run
can warn when it comes near them (:func:`load_cached`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qwen_serve.bench.config import RunConfig
from qwen_serve.bench.result import build_result
from qwen_serve.bench.run import execute
from qwen_serve.bench.stub import start_stub

__all__ = ["measure", "cache_path", "load_cached", "save_cached"]

T = TypeVar("T")


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen-serve" / "bench-ceiling.json"


def load_cached() -> dict[str, Any] | None:
    """The last ``bench ceiling`` figures of this machine, or ``None``."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_cached(figures: dict[str, Any]) -> Path:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    return path


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run this process on ``cpu`` inside the block (no-op when ``None`` or unsupported)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def default_cpus() -> tuple[int | None, int | None]:
    """(client CPU, stub CPU): the first and the last usable CPU when there are two or more."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[-1]) if len(cpus) >= 2 else (None, None)


def measure(runner: Callable[[Awaitable[T]], T], *, concurrency: int = 16, chunks: int = 16,
            duration: float = 10.0, client_cpu: int | None = None, stub_cpu: int | None = None) -> dict[str, Any]:
    """Measure the client against the stub; ``runner`` runs a coroutine to completion (uvloop or asyncio)."""
    with start_stub(chunks_default=chunks, cpu=stub_cpu) as stub:
        cfg = RunConfig(url=stub.url, model="stub", workload="random", tokenizer="estimate", input_len=32,
                        output_len=chunks, rate=math.inf, concurrency=concurrency, duration=duration,
                        warmup=2 * concurrency, engine_metrics=False, progress=False, label="ceiling")
        with pinned(client_cpu):
            outcome = runner(execute(cfg))  # type: ignore[arg-type]
    result = build_result(outcome)  # type: ignore[arg-type]
    cpu = max(result["client"]["cpu_util"], 1e-9)
    rps, eps = result["request_throughput"], result["client"]["events_per_s"]
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "concurrency": concurrency, "chunks_per_request": chunks, "duration_s": result["duration_s"],
        "client_cpu": client_cpu, "stub_cpu": stub_cpu,
        "requests_per_s": rps, "chunks_per_s": eps, "client_cpu_util": cpu,
        "requests_per_s_per_core": rps / min(cpu, 1.0), "chunks_per_s_per_core": eps / min(cpu, 1.0),
        "achieved_concurrency": result["concurrency"]["achieved_mean"],
        "requests_failed": result["requests_failed"],
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }

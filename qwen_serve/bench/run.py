"""One load against one target: build the workload, send it on schedule, collect the records.

:func:`execute` is the whole of ``bench run`` without the files: it returns a :class:`RunOutcome`
(records, timing, the engine's view) and never writes anything. Its caller turns that into
``result.json`` (:func:`qwen_serve.bench.result.build_result`) and the report.

Scheduling, with ``t0`` the start of the measured phase:

* **open loop** (a finite ``--rate``): request ``i`` is due at ``t0 + offsets[i]`` from
  :func:`~qwen_serve.bench.arrivals.schedule`, whether or not earlier ones have finished. With
  ``--concurrency C`` a due request waits for a free slot; that wait is schedule lag and counts in its
  TTFT and E2EL, so a stalled server or a too-small cap cannot hide (no coordinated omission).
* **closed loop** (``--rate inf --concurrency C``): C slots, each sends its next request as soon as
  its previous one ended; a request is due when its slot frees.
* ``--rate inf`` without a cap: every request is due at ``t0`` (a burst).

``--warmup N`` requests run first (closed loop at the run's concurrency, default 1) and are recorded with
``warmup=True``; nothing about them enters the statistics. They use the first N requests of the pool and
the measured ones start after them, so warm-up does not pre-fill the prefix cache for what is measured. Stop conditions (``--num-requests``,
``--duration``) bound what is *sent*; requests in flight at the end are waited for (up to ``--timeout``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from qwen_serve.bench.arrivals import schedule
from qwen_serve.bench.client import Client, encode_body
from qwen_serve.bench.config import RunConfig
from qwen_serve.bench.engine_metrics import EngineWatch
from qwen_serve.bench.exporter import Exporter, NullExporter
from qwen_serve.bench.records import RequestRecord, RequestSpec
from qwen_serve.bench.tokenizer import EstimateTokenizer, ServerTokenizer, Tokenizer
from qwen_serve.bench.workloads import build_workload

__all__ = ["RunOutcome", "Progress", "execute", "build_specs", "pool_size", "DEFAULT_INPUT_LEN"]

DEFAULT_INPUT_LEN = 256

@dataclass
class Progress:
    """Live counters the display reads (updated once per request, never per event)."""

    started: float = 0.0
    scheduled: int = 0
    sent: int = 0
    done: int = 0
    failed: int = 0
    output_tokens: int = 0
    last_lag_ms: float = 0.0
    phase: str = "building workload"
    total: int | None = None


@dataclass
class RunOutcome:
    config: RunConfig
    specs: list[RequestSpec]
    records: list[RequestRecord]
    warmup: list[RequestRecord]
    duration_s: float
    cpu_s: float
    engine: dict[str, object] | None
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    tokenizer_exact: bool = False


async def build_specs(cfg: RunConfig, session: aiohttp.ClientSession, n: int) -> tuple[list[RequestSpec], bool]:
    """The request pool (``n`` specs, cycled when the run needs more) and whether token counts are exact."""
    tokenizer: Tokenizer
    if cfg.tokenizer == "server":
        tokenizer = ServerTokenizer(session, cfg.url, cfg.model, api_key=cfg.api_key)
    else:
        tokenizer = EstimateTokenizer()
    name = cfg.workload_name
    input_len = cfg.input_len if cfg.input_len is not None or name == "long-context" else DEFAULT_INPUT_LEN
    options: dict[str, object] = {}
    if name == "multi-turn":
        options["turns"] = cfg.turns
    if cfg.workload_path:
        options["path"] = cfg.workload_path
    if cfg.shared_prefix_len is not None:
        options["shared_prefix_len"] = cfg.shared_prefix_len
    specs = await build_workload(name, tokenizer=tokenizer, n=n, input_len=input_len, output_len=cfg.output_len,
                                 seed=cfg.seed, ignore_eos=cfg.ignore_eos, max_model_len=cfg.max_model_len,
                                 **options)
    for s in specs:
        s.body.setdefault("temperature", cfg.temperature)
    return specs, bool(getattr(tokenizer, "exact", False))


def pool_size(cfg: RunConfig) -> int:
    if cfg.num_requests is not None:
        return max(1, min(cfg.num_requests + cfg.warmup, cfg.pool_size))
    return cfg.pool_size


async def execute(cfg: RunConfig, *, progress: Progress | None = None,
                  exporter: Exporter | None = None,
                  specs: tuple[list[RequestSpec], bool] | None = None) -> RunOutcome:
    """Run ``cfg`` once against its target; see the module docstring for the timing rules.

    ``specs`` (the pool and whether its token counts are exact) skips building the workload, so the
    targets of a compare get the very same requests.
    """
    progress = progress or Progress()
    exporter = exporter or NullExporter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if specs is None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as session:
            specs = await build_specs(cfg, session, pool_size(cfg))
    pool, exact = specs
    if not pool:
        raise ValueError(f"workload: {cfg.workload} produced no requests")
    bodies = [encode_body(s, cfg.model, api=cfg.api) for s in pool]
    watch = EngineWatch(cfg.metrics_url or cfg.url.rstrip("/") + "/metrics") if cfg.engine_metrics else None
    notes: list[str] = []
    async with Client(cfg.url, api_key=cfg.api_key, timeout_s=cfg.timeout, exporter=exporter, api=cfg.api) as client:
        warm: list[RequestRecord] = []
        if watch is not None:
            await watch.open()
        if cfg.warmup:
            progress.phase = "warm-up"
            warm = await _closed_loop(client, bodies, cfg.concurrency or 1, cfg.warmup, None, progress, exporter)
            for r in warm:
                r.warmup = True
        if watch is not None:
            await watch.start(sum(r.error is None for r in warm))
            if watch.before is None:
                notes.append(f"engine metrics not available ({watch.error}); engine figures left out")
        progress.phase = "running"
        cpu0 = time.process_time()
        if cfg.closed_loop:
            assert cfg.concurrency is not None
            records = await _closed_loop(client, bodies, cfg.concurrency, cfg.num_requests, cfg.duration,
                                         progress, exporter, first=cfg.warmup)
        else:
            offsets = schedule(cfg.num_requests, cfg.rate, burstiness=cfg.burstiness, seed=cfg.seed,
                               duration=cfg.duration, ramp_up_s=cfg.ramp_up, kind=cfg.arrival)
            records = await _open_loop(client, bodies, offsets, cfg.concurrency, progress, exporter,
                                       first=cfg.warmup)
        cpu_s = time.process_time() - cpu0
        if watch is not None:
            await watch.stop(sum(r.error is None for r in records))
    duration = max((r.end for r in records), default=0.0)
    for r in itertools.chain(warm, records):
        spec = pool[r.spec_index]
        r.kind, r.conversation, r.turn = spec.kind, spec.conversation, spec.turn
        r.target_output_tokens = spec.output_tokens
    return RunOutcome(config=cfg, specs=pool, records=records, warmup=warm, duration_s=duration, cpu_s=cpu_s,
                      engine=watch.summary() if watch is not None else None, notes=notes, started_at=started_at,
                      tokenizer_exact=exact)


async def _open_loop(client: Client, bodies: Sequence[bytes], offsets: Sequence[float], cap: int | None,
                     progress: Progress, exporter: Exporter,
                     first: int = 0) -> list[RequestRecord]:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(cap) if cap else None
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    nb = len(bodies)
    progress.total = len(offsets)

    async def one(rec: RequestRecord, body: bytes) -> None:
        try:
            await client.send(body, rec, t0)
        finally:
            if slots is not None:
                slots.release()
            _count(progress, rec)

    t0 = time.perf_counter()
    progress.started = t0
    for i, due in enumerate(offsets):
        # A loop, not one sleep: event-loop timers may fire up to a millisecond early (uvloop rounds to
        # ms), and a request must never leave before its scheduled time (no negative schedule lag).
        while (wait := t0 + due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        spec = (first + i) % nb
        rec = RequestRecord(index=i, spec_index=spec, scheduled=due)
        records.append(rec)
        progress.scheduled += 1
        exporter.request_scheduled()
        if slots is not None:
            await slots.acquire()
        progress.sent += 1
        task = loop.create_task(one(rec, bodies[spec]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return records


async def _closed_loop(client: Client, bodies: Sequence[bytes], slots: int, count: int | None,
                       duration: float | None, progress: Progress,
                       exporter: Exporter, first: int = 0) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    nb = len(bodies)
    counter = itertools.count()
    t0 = time.perf_counter()
    progress.started = t0
    progress.total = count
    stop_at = t0 + duration if duration is not None else math.inf

    async def slot() -> None:
        while True:
            i = next(counter)
            now = time.perf_counter()
            if (count is not None and i >= count) or now >= stop_at:
                return
            rec = RequestRecord(index=i, spec_index=(first + i) % nb, scheduled=now - t0)
            records.append(rec)
            progress.scheduled += 1
            progress.sent += 1
            exporter.request_scheduled()
            await client.send(bodies[rec.spec_index], rec, t0)
            _count(progress, rec)

    await asyncio.gather(*(slot() for _ in range(slots)))
    records.sort(key=lambda r: r.index)
    return records


def _count(progress: Progress, rec: RequestRecord) -> None:
    progress.done += 1
    if not rec.ok:
        progress.failed += 1
    if rec.output_tokens:
        progress.output_tokens += rec.output_tokens
    progress.last_lag_ms = (rec.sent - rec.scheduled) * 1000.0

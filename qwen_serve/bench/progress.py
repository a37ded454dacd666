"""The live display of a run (rich): phase, sent, done, failed, in flight, rates, schedule lag.

:func:`live` is an async context manager that redraws twice a second from a
:class:`~qwen_serve.bench.run.Progress` while the body runs; it draws nothing when ``enabled`` is false or
stderr is not a terminal. Redraws happen on the event loop (no refresh thread contending for the GIL
with the load generator) and read counters only, so the display costs the run almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from qwen_serve.bench.run import Progress

__all__ = ["live"]


def _table(p: Progress, label: str, rates: tuple[float, float]) -> Table:
    t = Table.grid(padding=(0, 2))
    for _ in range(8):
        t.add_column()
    elapsed = time.perf_counter() - p.started if p.started else 0.0
    total = f"/{p.total}" if p.total else ""
    inflight = p.sent - p.done
    lag_style = "bold red" if p.last_lag_ms > 1000 else ("yellow" if p.last_lag_ms > 100 else "green")
    t.add_row(f"[bold]{label}[/]", f"{p.phase} {elapsed:5.1f}s", f"sent {p.sent}{total}", f"done {p.done}",
              f"[red]failed {p.failed}[/]" if p.failed else "failed 0", f"in flight {inflight}",
              f"{rates[0]:.1f} req/s · {rates[1]:.0f} tok/s", f"[{lag_style}]lag {p.last_lag_ms:.0f} ms[/]")
    return t


@contextlib.asynccontextmanager
async def live(progress: Progress, label: str, enabled: bool = True) -> AsyncIterator[None]:
    """Show ``progress`` while the ``async with`` body runs."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield
        return
    window: deque[tuple[float, int, int]] = deque(maxlen=11)  # 5 s of (time, done, tokens)

    def rates() -> tuple[float, float]:
        window.append((time.perf_counter(), progress.done, progress.output_tokens))
        if len(window) < 2:
            return 0.0, 0.0
        (t0, d0, k0), (t1, d1, k1) = window[0], window[-1]
        dt = max(t1 - t0, 1e-9)
        return (d1 - d0) / dt, (k1 - k0) / dt

    with Live(_table(progress, label, (0.0, 0.0)), console=console, auto_refresh=False, transient=True) as view:
        async def redraw() -> None:
            while True:
                await asyncio.sleep(0.5)
                view.update(_table(progress, label, rates()), refresh=True)

        task = asyncio.get_running_loop().create_task(redraw())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

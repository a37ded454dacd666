"""Plumbing shared by the benchmark scripts: processes, CPU time, a fake upstream, the gateway, reports.

The scripts import it as ``from _harness import ...``: they run as ``python benchmarks/X.py``, so this
folder is first on ``sys.path``. Each script spawns itself for its subprocesses (``X.py _fake ...``,
``X.py _gateway ...``) and calls the matching server function of this module there.

Contracts:

* :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago (the caller binds it soon).
* :func:`cpu_seconds`: user + system CPU seconds of one live process so far, from ``/proc/<pid>/stat``
  (resolution ``1 / SC_CLK_TCK``); raises ``OSError`` when the process is gone.
* :func:`process_tree`: ``{pid: CPU seconds}`` of a process and all its live descendants, from one pass
  over ``/proc``; processes that exit during the pass are left out. :func:`tree_cpu_s` sums it (0.0 for
  ``None``).
* :class:`Proc`, :func:`spawn`, :func:`wait_ready`, :func:`stop`: ``spawn`` starts ``python <script>
  <args>`` (optionally behind a ``prefix`` command such as valgrind) with stdout discarded, stderr piped
  unless told otherwise, cwd the repository root; the :class:`Proc` holds the ``Popen`` and the URL
  ``http://127.0.0.1:<port>`` it will serve.
  ``wait_ready`` polls ``GET url+path`` until 200 and raises ``SystemExit`` (with the tail of stderr) if
  the process exits first or the timeout passes. ``stop`` sends SIGTERM to every live process, then
  waits up to 10 s for each and kills (and reaps) the ones still running.
* :func:`pct`: the nearest-rank percentile ``q`` (0-100) of ``values``; NaN when empty.
* :func:`reject_constant`: a ``json.loads(parse_constant=...)`` hook that raises ``ValueError`` for
  ``NaN``, ``Infinity`` and ``-Infinity`` (strict JSON).
* :func:`markdown_table`: the lines of a Markdown table (header, ``|---|`` rule, one line per row; each
  cell rendered with ``str``). :func:`write_section` replaces the section of ``RESULTS.md`` that
  starts with the line ``heading`` (up to the next ``## `` heading) with ``text``, or appends it; a
  hand-written ``### Reading these figures`` block at the end of the old section is kept after it.
  The other sections are kept as they are; a missing file starts as ``# qwen-serve benchmark results``.
* :func:`gateway_app`, :func:`uvicorn_config`, :func:`serve_app`: ``build_app`` for a config of model
  :data:`MODEL` with the given ``auth`` section and ``gateway`` fields (UI off, 127.0.0.1, ``port``) in
  front of ``upstream``; served by uvicorn with the settings of ``qwen_serve/serve.py``
  (``_uvicorn_config``: uvloop, httptools, lifespan on, keep-alive 75 s, no server header) but quiet
  logs (warnings only, no access log). ``serve_app`` blocks until SIGINT/SIGTERM.
* :func:`serve_fake`, :func:`sse_events`, :data:`FakeStyle`: the fast fake OpenAI/vLLM upstream (raw asyncio
  + uvloop + httptools) on 127.0.0.1:port until SIGTERM, re-exported from :mod:`qwen_serve.bench.stub`
  (the built-in stub of ``qwen-serve bench``), whose docstring states what it answers. It echoes the
  request's ``model``, so the scripts' requests for :data:`MODEL` (the gateway's configured model) come
  back as :data:`MODEL`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import aiohttp
    import uvicorn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from qwen_serve.bench.stub import FakeStyle, serve_fake, sse_events  # noqa: E402  (re-exported)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
NOTES = "### Reading these figures"
MODEL = "qwen2-random"  # the gateway's configured model; the stub echoes it
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = ["CLK_TCK", "MODEL", "NOTES", "RESULTS", "ROOT", "FakeStyle", "Proc", "cpu_seconds", "free_port",
           "gateway_app", "markdown_table", "pct", "process_tree", "reject_constant", "serve_app", "serve_fake",
           "spawn", "sse_events", "stop", "tree_cpu_s", "uvicorn_config", "wait_ready", "write_section"]


# ============================================================================ processes and CPU time
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(root: int) -> dict[int, float]:
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent pid, CPU s)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = _stat(d.name)
            except OSError:
                continue
            stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        grew = bool(more)
        tree |= more
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def tree_cpu_s(root: int | None) -> float:
    return 0.0 if root is None else sum(process_tree(root).values())


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn(script: str | Path, name: str, args: Sequence[str], port: int, prefix: Sequence[str] = (),
          stderr: Any = subprocess.PIPE) -> Proc:
    popen = subprocess.Popen([*prefix, sys.executable, str(Path(script).resolve()), *args],
                             stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
    return Proc(name, f"http://127.0.0.1:{port}", popen)


async def wait_ready(session: aiohttp.ClientSession, proc: Proc, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            err = proc.popen.stderr.read().decode() if proc.popen.stderr else ""
            raise SystemExit(f"{proc.name} exited early:\n{err[-2000:]}")
        try:
            async with session.get(proc.url + path) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{proc.name} not ready at {proc.url}{path} after {timeout}s")


def stop(procs: Sequence[Proc]) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.popen.wait(10)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


# ============================================================================ figures and reports
def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    current = path.read_text() if path.exists() else "# qwen-serve benchmark results\n"
    start = current.find(heading + "\n")
    if start < 0:
        new = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = current.find("\n## ", start + len(heading))
        old = current[start:end if end >= 0 else len(current)]
        notes = old[old.find(NOTES):].rstrip("\n") if NOTES in old else ""
        tail = current[end + 1:] if end >= 0 else ""
        body = text.rstrip("\n") + ("\n\n" + notes if notes else "")
        new = current[:start] + body + "\n" + ("\n" + tail if tail else "")
    path.write_text(new)


# ============================================================================ gateway (subprocess side)
def gateway_app(port: int, upstream: str, auth: dict[str, Any], **gateway: Any) -> Any:
    sys.path.insert(0, str(ROOT))
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app

    config = parse_config({
        "model": {"source": MODEL},
        "auth": auth,
        "gateway": {**gateway, "ui": False, "host": "127.0.0.1", "port": port},
    })
    return build_app(config, upstream_url=upstream)


def uvicorn_config(app: Any, port: int) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="on",
                          access_log=False, log_level="warning", timeout_keep_alive=75, server_header=False)


def serve_app(app: Any, port: int, *, tune_gc: bool = True) -> None:
    """Serve ``app`` as ``qwen-serve`` does: uvicorn with uvloop and httptools, the collector tuned
    (:func:`qwen_serve.gc_tuning.tune_for_serving`) unless ``tune_gc`` is false."""
    import uvicorn

    from qwen_serve.gc_tuning import tune_for_serving

    server = uvicorn.Server(uvicorn_config(app, port))
    if tune_gc:
        tune_for_serving()
    server.run()

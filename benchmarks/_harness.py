"""Plumbing shared by the benchmark scripts: CPU time, the gateway, RESULTS.md sections.

The scripts import it as ``from _harness import ...``: they run as ``python benchmarks/X.py``, so this
folder is first on ``sys.path``; importing it also puts the repository root on ``sys.path``.

Contracts:

* :func:`free_port`: a TCP port on 127.0.0.1 that was free a moment ago (the caller binds it soon).
* :func:`cpu_seconds`: user + system CPU seconds of one live process so far, from ``/proc/<pid>/stat``
  (resolution ``1 / SC_CLK_TCK``); raises ``OSError`` when the process is gone.
* :func:`process_tree`: ``{pid: CPU seconds}`` of a process and all its live descendants, from one pass
  over ``/proc``; processes that exit during the pass are left out. :func:`tree_cpu_s` sums it (0.0 for
  ``None``).
* :func:`reject_constant`: a ``json.loads(parse_constant=...)`` hook that raises ``ValueError`` for
  ``NaN``, ``Infinity`` and ``-Infinity`` (strict JSON).
* :func:`markdown_table`: the lines of a Markdown table (header, ``|---|`` rule, one line per row; each
  cell rendered with ``str``).
* :func:`write_section`: puts ``body`` into ``RESULTS.md`` (newest first) under the heading
  ``## <date> · <title>``, the date today's in UTC unless given (``YYYY-MM-DD``). A section with that
  exact heading (same title, same date) is replaced, keeping a hand-written ``### Reading these
  figures`` block from the end of the old one after the new body (unless ``body`` has its own);
  otherwise the new section goes before the first dated section of the same date or older (at the end
  if there is none), so the file stays newest first and older sections stay as they are. A missing file starts as ``# qwen-serve
  benchmark results``. Returns the heading.
* :func:`gateway_app`, :func:`serve_app`: ``build_app`` for a config of model :data:`MODEL` with the
  given ``auth`` section and ``gateway`` fields (UI off, 127.0.0.1, ``port``) in front of ``upstream``;
  served by uvicorn with the settings of ``qwen_serve/serve.py`` (uvloop, httptools, lifespan on,
  keep-alive 75 s, no server header) but quiet logs (warnings only, no access log), the collector tuned
  as ``qwen-serve`` tunes it (:func:`qwen_serve.gc_tuning.tune_for_serving`). ``serve_app`` blocks until
  SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
NOTES = "### Reading these figures"
MODEL = "qwen2-random"  # the gateway's configured model; the bench stub echoes any model
CLK_TCK = os.sysconf("SC_CLK_TCK")
_HEADING = re.compile(r"^## .*$", re.M)
_DATED = re.compile(r"## (\d{4}-\d{2}-\d{2}) · ")

__all__ = ["MODEL", "RESULTS", "ROOT", "cpu_seconds", "free_port", "gateway_app", "markdown_table",
           "process_tree", "reject_constant", "serve_app", "tree_cpu_s", "write_section"]


# ============================================================================ ports and CPU time
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


# ============================================================================ figures and reports
def reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_section(title: str, body: str, path: Path = RESULTS, date: str | None = None) -> str:
    day = date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    heading = f"## {day} · {title}"
    current = path.read_text() if path.exists() else "# qwen-serve benchmark results\n"
    section = heading + "\n\n" + body.strip("\n") + "\n"
    heads = list(_HEADING.finditer(current))
    for i, m in enumerate(heads):
        if m.group(0) == heading:  # the same title measured again today: replace it
            end = heads[i + 1].start() if i + 1 < len(heads) else len(current)
            old = current[m.start():end]
            notes = old[old.find(NOTES):].strip("\n") if NOTES in old and NOTES not in body else ""
            section += ("\n" + notes + "\n") if notes else ""
            path.write_text(current[:m.start()] + section + ("\n" + current[end:] if end < len(current) else ""))
            return heading
    at = next((m.start() for m in heads if (d := _DATED.match(m.group(0))) and d.group(1) <= day), None)
    if at is None:
        path.write_text(current.rstrip("\n") + "\n\n" + section)
    else:
        path.write_text(current[:at] + section + "\n" + current[at:])
    return heading


# ============================================================================ gateway (subprocess side)
def gateway_app(port: int, upstream: str, auth: dict[str, Any], **gateway: Any) -> Any:
    from qwen_serve.config import parse_config
    from qwen_serve.gateway.app import build_app

    config = parse_config({
        "model": {"source": MODEL},
        "auth": auth,
        "gateway": {**gateway, "ui": False, "host": "127.0.0.1", "port": port},
    })
    return build_app(config, upstream_url=upstream)


def serve_app(app: Any, port: int, http: str = "gateway") -> None:
    """Serve ``app`` on 127.0.0.1:``port`` as ``qwen-serve`` does (uvloop, no access log, the gateway's GC
    settings). ``http``: ``gateway`` — the gateway's own httptools protocol with its default head/body limits
    and timeouts (:mod:`qwen_serve.gateway.http_protocol`); ``stock`` — uvicorn's httptools protocol as
    shipped (no head cap or timeouts), for A/B runs of that protocol's cost."""
    import uvicorn

    from qwen_serve.config import GatewayConfig
    from qwen_serve.gc_tuning import tune_for_serving
    from qwen_serve.gateway.http_protocol import HttpLimits, gateway_protocol

    protocol: Any = gateway_protocol(HttpLimits.from_config(GatewayConfig())) if http == "gateway" else "httptools"
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http=protocol, ws="none", lifespan="on",
        access_log=False, log_level="warning", timeout_keep_alive=75, server_header=False))
    tune_for_serving()
    server.run()

"""Process logging for ``qwen-serve up`` / ``gateway``: nothing on the event loop waits for stderr.

:func:`setup_logging` routes every record (ours, uvicorn's, the engine's output lines) through a
:class:`logging.handlers.QueueHandler`; one background thread (:class:`~logging.handlers.QueueListener`)
formats and writes them. A slow log reader — a full pipe to ``kubectl logs`` or a log shipper, a
stalled disk — then delays log lines, never requests. Records are rendered to text when queued, so
arguments are not kept alive or mutated later.

Engine output lines are logged to :data:`ENGINE_LOGGER` and written as ``[engine] <line>`` (the
engine's own timestamps and levels are in the line); everything else as
``<time> <LEVEL> <logger>: <message>``. Prompts and keys are never logged by qwen-serve.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from typing import TextIO

__all__ = ["ENGINE_LOGGER", "setup_logging", "stop_logging"]

ENGINE_LOGGER = "qwen_serve.engine.output"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_listener: logging.handlers.QueueListener | None = None


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == ENGINE_LOGGER:
            return f"[engine] {record.getMessage()}"
        return super().format(record)


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Install the queued root handler writing to ``stream`` (default stderr); idempotent until
    :func:`stop_logging`, which also runs at exit and writes what is still queued."""
    global _listener
    if _listener is not None:
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
    writer.setFormatter(_Formatter(_FORMAT))
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=True)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(records))
    root.setLevel(level)
    _listener.start()
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write what is queued, stop the writer thread and detach the queue handler from the root logger."""
    global _listener
    if _listener is None:
        return
    _listener.stop()
    _listener = None
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logging.handlers.QueueHandler):
            root.removeHandler(handler)

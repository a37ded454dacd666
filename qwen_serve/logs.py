"""Process logging for ``qwen-serve up`` / ``gateway``: nothing on the event loop waits for stderr.

:func:`setup_logging` routes every record (ours, uvicorn's, the engine's output lines) through a
:class:`logging.handlers.QueueHandler`; one background thread (:class:`~logging.handlers.QueueListener`)
formats and writes them. A slow log reader — a full pipe to ``kubectl logs`` or a log shipper, a
stalled disk — then delays log lines, never requests. Records are rendered to text when queued, so
arguments are not kept alive or mutated later.

The queue holds at most :data:`MAX_QUEUED_RECORDS` records: while it is full (the writer is stuck or far
behind) new records are dropped, never waited for, and counted (:func:`dropped_records`, exported by the
gateway as ``qwen_serve_log_records_dropped_total``). Once the writer catches up it writes one line saying
how many records were dropped since the last such line.

Engine output lines are logged to :data:`ENGINE_LOGGER` and written as ``[engine] <line>`` (the
engine's own timestamps and levels are in the line); everything else as
``<time> <LEVEL> <logger>: <message>``. Prompts and keys are never logged by qwen-serve.

Errors of the gateway itself go through :func:`log_server_error`: a full traceback at most once per
:data:`TRACEBACK_INTERVAL_S` per exception type, one line otherwise, so a fault every request hits cannot
flood the log (or fill the queue). Errors a client causes (it hung up, sent too much, too slowly) are one
line each, never a traceback.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ENGINE_LOGGER", "MAX_QUEUED_RECORDS", "TRACEBACK_INTERVAL_S", "TracebackLimiter", "dropped_records",
           "log_server_error", "setup_logging", "stop_logging"]

ENGINE_LOGGER = "qwen_serve.engine.output"
MAX_QUEUED_RECORDS = 10_000  # records waiting for the writer; beyond this new ones are dropped
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_listener: logging.handlers.QueueListener | None = None
_dropped = 0  # records dropped because the queue was full, since the process started
_dropped_lock = threading.Lock()
TRACEBACK_INTERVAL_S = 60.0  # per exception type: at most one full traceback this often
_MAX_LINE_CHARS = 300  # an exception's text in a one-line record is cut here


def dropped_records() -> int:
    """Log records dropped so far (the queue was full); monotonic for the life of the process."""
    return _dropped


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A :class:`~logging.handlers.QueueHandler` that drops and counts a record when its bounded queue is
    full, instead of blocking the caller or reporting an error."""

    def enqueue(self, record: logging.LogRecord) -> None:
        global _dropped
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with _dropped_lock:
                _dropped += 1


class _Listener(logging.handlers.QueueListener):
    """The writer thread: before each record it reports the drops not yet reported, as one line."""

    def __init__(self, records: queue.Queue[logging.LogRecord], handler: logging.Handler) -> None:
        super().__init__(records, handler, respect_handler_level=True)
        self._reported = _dropped

    def handle(self, record: logging.LogRecord) -> None:
        dropped = _dropped
        if dropped > self._reported:
            note = logging.LogRecord("qwen_serve.logs", logging.WARNING, __file__, 0,
                                     "%d log records dropped: the log queue was full (a slow log reader)",
                                     (dropped - self._reported,), None)
            self._reported = dropped
            super().handle(note)
        super().handle(record)

    def enqueue_sentinel(self) -> None:
        """Wait for room (the writer is draining) instead of failing on a full queue."""
        self.queue.put(self._sentinel)  # type: ignore[attr-defined]


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
    records: queue.Queue[logging.LogRecord] = queue.Queue(MAX_QUEUED_RECORDS)
    writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
    writer.setFormatter(_Formatter(_FORMAT))
    _listener = _Listener(records, writer)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_DroppingQueueHandler(records))
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


class TracebackLimiter:
    """Decides which server errors are logged with their traceback: the first of each exception type, then
    at most one per ``interval_s`` per type; the others are one line. Remembers at most ``max_types``
    types (then starts afresh). Not thread-safe: one per event loop (the gateway has one)."""

    def __init__(self, interval_s: float = TRACEBACK_INTERVAL_S, max_types: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_types = max_types
        self._clock = clock
        self._last: dict[type[BaseException], float] = {}

    def allow(self, exc: BaseException) -> bool:
        """True when ``exc`` should be logged with its traceback now (and records that it was)."""
        now = self._clock()
        kind = type(exc)
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            return False
        if last is None and len(self._last) >= self.max_types:
            self._last.clear()
        self._last[kind] = now
        return True


_tracebacks = TracebackLimiter()


def log_server_error(logger: logging.Logger, what: str, exc: BaseException,
                     limiter: TracebackLimiter | None = None) -> None:
    """Log an unexpected error of the gateway at error level as ``<what>: <Type>: <text>``: with the
    traceback when ``limiter`` (default: the process's, :data:`TRACEBACK_INTERVAL_S`) allows it, else as
    that one line (the exception's text cut to a few hundred characters)."""
    limiter = limiter or _tracebacks
    text = str(exc)
    if len(text) > _MAX_LINE_CHARS:
        text = text[:_MAX_LINE_CHARS] + "..."
    if limiter.allow(exc):
        logger.error("%s: %s: %s", what, type(exc).__name__, text, exc_info=exc)
    else:
        logger.error("%s: %s: %s (traceback logged at most once per %g s per type)", what, type(exc).__name__,
                     text, limiter.interval_s)

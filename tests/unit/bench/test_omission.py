"""Coordinated omission: a server that stalls under a capped open-loop load must show in the figures.

The built-in stub freezes for 2 s (it neither reads nor writes) on one request of a constant 40 req/s
schedule capped at 4 in flight. Requests due during the stall wait for a slot; timed from their
*scheduled* send they are slow (``ttft_ms``), and ``schedule_lag_ms`` says why. Timed from the actual
send, as a tool that starts its clock after the concurrency semaphore does, most of them look fast:
``ttft_from_send_ms`` is that figure, kept beside the others, and the test shows the gap.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qwen_serve.bench.config import build
from qwen_serve.bench.records import RequestSpec
from qwen_serve.bench.result import build_result
from qwen_serve.bench.run import execute
from qwen_serve.bench.stub import StubProcess, start_stub

FREEZE_S = 2.0
RATE = 40.0
N = 200
FROZEN_AT = 40  # due at 1.0 s


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProcess]:
    with start_stub() as s:
        yield s


def _specs() -> list[RequestSpec]:
    specs = []
    for i in range(N):
        body = {"messages": [{"role": "user", "content": f"w{i} w1 w2"}], "max_tokens": 16, "fake_interval_ms": 2}
        if i == FROZEN_AT:
            body["stub_freeze_s"] = FREEZE_S
        specs.append(RequestSpec(index=i, body=body, output_tokens=16))
    return specs


async def test_a_stall_shows_in_ttft_and_schedule_lag(stub: StubProcess) -> None:
    cfg = build({"url": stub.url, "model": "stub", "rate": RATE, "arrival": "constant", "concurrency": 4,
                 "num_requests": N, "engine_metrics": False, "progress": False})
    outcome = await execute(cfg, specs=(_specs(), False))
    result = build_result(outcome)

    assert result["requests_completed"] == N and result["requests_failed"] == 0
    # The stalled requests and the queue behind them: p99 from the schedule is close to the freeze.
    assert result["ttft_ms"]["p99"] >= 0.75 * FREEZE_S * 1000
    assert result["schedule_lag_ms"]["p99"] >= 0.5 * FREEZE_S * 1000
    assert result["e2el_ms"]["p99"] >= 0.75 * FREEZE_S * 1000
    # Timed from the actual send, the queued requests look fast: p90 hides the stall entirely.
    assert result["ttft_from_send_ms"]["p90"] < 0.25 * result["ttft_ms"]["p90"]
    # Requests due in the stall window: each one's lag is most of the time left until the stall ended.
    due_in_stall = [r for r in outcome.records if 1.1 <= r.scheduled <= 1.0 + FREEZE_S - 0.5]
    assert due_in_stall and all(r.schedule_lag_ms > 300 for r in due_in_stall)

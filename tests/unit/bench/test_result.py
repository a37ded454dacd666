"""``bench.result.build_result``: figures, error tallies, token sources and the client's verdicts.

Runs are drawn by hand as :class:`RequestRecord` lists (no server); expected figures are worked out
in the comments.
"""

from __future__ import annotations

from typing import Any

import pytest

from qwen_serve.bench.config import RunConfig, build
from qwen_serve.bench.records import RequestRecord, RequestSpec
from qwen_serve.bench.result import build_result
from qwen_serve.bench.run import RunOutcome


def _cfg(**kw: Any) -> RunConfig:
    values: dict[str, Any] = {"url": "http://127.0.0.1:9", "model": "m", "num_requests": 16, "rate": 4.0,
                              "engine_metrics": False, "progress": False}
    values.update(kw)
    return build(values)


def _ok(i: int, scheduled: float, sent: float, end: float, *, ttft_s: float | None = None, out: int | None = 4,
        inp: int = 10, target: int | None = None, client_out: int = 4, spec: int | None = None,
        text: str = "") -> RequestRecord:
    """An answered request with ``client_out`` events spread evenly from its first token to ``end``."""
    first = sent + (ttft_s if ttft_s is not None else 0.1 * (end - sent))
    step = (end - first) / max(1, client_out - 1)
    times = [first + k * step for k in range(client_out)]
    return RequestRecord(index=i, spec_index=i if spec is None else spec, scheduled=scheduled, sent=sent, end=end,
                         status=200, input_tokens=inp, output_tokens=out, target_output_tokens=target,
                         finish_reason="length", chunk_times=times, chunk_tokens=[1] * client_out, text=text,
                         client_output_tokens=client_out)


def _outcome(cfg: RunConfig, records: list[RequestRecord], duration: float, *, cpu_s: float = 0.1,
             specs: list[RequestSpec] | None = None) -> RunOutcome:
    if specs is None:
        specs = [RequestSpec(index=i, body={}) for i in range(max(r.spec_index for r in records) + 1)]
    return RunOutcome(config=cfg, specs=specs, records=records, warmup=[], duration_s=duration, cpu_s=cpu_s,
                      engine=None)


# ------------------------------------------------------------------------------ counts and throughputs


def _mixed() -> list[RequestRecord]:
    return [
        _ok(0, 0.0, 0.0, 1.0, ttft_s=0.1),  # ttft 100 ms
        _ok(1, 0.5, 0.5, 1.5, ttft_s=0.3),  # ttft 300 ms
        _ok(2, 1.0, 1.0, 2.0, ttft_s=0.7),  # ttft 700 ms
        RequestRecord(index=3, spec_index=3, scheduled=1.2, sent=1.2, end=1.3, status=429,
                      error="rate_limit_exceeded", error_message="slow down"),
        RequestRecord(index=4, spec_index=4, scheduled=1.6, sent=1.6, end=1.65, status=0,
                      error="connection_error", error_message="ClientConnectorError: refused"),
    ]


def test_completed_failed_and_throughputs() -> None:
    res = build_result(_outcome(_cfg(num_requests=5), _mixed(), 2.0))
    assert res["requests_completed"] == 3
    assert res["requests_failed"] == 2
    assert res["requests_warmup"] == 0
    assert res["duration_s"] == 2.0
    # 3 ok over 2 s; 3 x 4 output tokens = 12 -> 6/s; 3 x 10 input = 30 -> 15/s; total 42/2 = 21/s
    assert res["request_throughput"] == pytest.approx(1.5)
    assert res["output_token_throughput"] == pytest.approx(6.0)
    assert res["input_token_throughput"] == pytest.approx(15.0)
    assert res["total_token_throughput"] == pytest.approx(21.0)
    assert res["ttft_ms"]["n"] == 3
    assert res["ttft_ms"]["mean"] == pytest.approx((100 + 300 + 700) / 3)
    assert res["goodput_rps"] is None and res["slo"] is None
    assert any(w == "2 of 5 requests failed (see errors)" for w in res["client"]["warnings"])


def test_goodput_with_an_slo() -> None:
    res = build_result(_outcome(_cfg(num_requests=5, slo="ttft_ms=500"), _mixed(), 2.0))
    # ttfts 100, 300 meet 500 ms, 700 does not; failed requests never count -> 2 over 2 s
    assert res["goodput_rps"] == pytest.approx(1.0)
    assert res["slo"] == {"ttft_ms": 500.0}


def test_errors_by_status_and_code() -> None:
    errors = build_result(_outcome(_cfg(num_requests=5), _mixed(), 2.0))["errors"]
    assert errors["by_status"] == {"429": 1, "0": 1}
    assert errors["by_code"] == {"rate_limit_exceeded": 1, "connection_error": 1}
    assert errors["examples"] == ["429 rate_limit_exceeded: slow down",
                                  "0 connection_error: ClientConnectorError: refused"]


def test_concurrency_achieved_and_peak() -> None:
    conc = build_result(_outcome(_cfg(num_requests=5), _mixed(), 2.0))["concurrency"]
    # intervals [0,1] [0.5,1.5] [1,2] [1.2,1.3] [1.6,1.65]:
    # busy 1 + 1 + 1 + 0.1 + 0.05 = 3.15 over 2 s -> 1.575; peak 3 during 1.2..1.3 (b, c, d)
    assert conc["achieved_mean"] == pytest.approx(1.575)
    assert conc["peak"] == 3
    assert conc["asked"] is None


# ----------------------------------------------------------------------------------------- tokens


def test_tokens_source_usage() -> None:
    recs = [_ok(0, 0.0, 0.0, 1.0), _ok(1, 0.0, 0.0, 1.0)]
    tokens = build_result(_outcome(_cfg(num_requests=2), recs, 1.0))["tokens"]
    assert tokens["source"] == "usage"
    assert tokens["output_total"] == 8
    assert tokens["input_total"] == 20
    assert tokens["client_output_estimate_total"] == 8
    assert tokens["client_estimate_mismatch_pct"] == pytest.approx(0.0)


def test_tokens_source_client_estimate_when_usage_missing() -> None:
    recs = [_ok(0, 0.0, 0.0, 1.0, out=4), _ok(1, 0.0, 0.0, 1.0, out=None, client_out=3)]
    res = build_result(_outcome(_cfg(num_requests=2), recs, 1.0))
    # 4 from usage + 3 events standing in for the missing usage
    assert res["tokens"]["source"] == "client-estimate"
    assert res["tokens"]["output_total"] == 7
    assert any("sent no usage" in w for w in res["client"]["warnings"])


def test_output_length_misses_with_ignore_eos() -> None:
    recs = [_ok(0, 0.0, 0.0, 1.0, out=4, target=4), _ok(1, 0.0, 0.0, 1.0, out=3, target=4),
            _ok(2, 0.0, 0.0, 1.0, out=4, target=4)]
    res = build_result(_outcome(_cfg(num_requests=3, output_len=4), recs, 1.0))
    assert res["tokens"]["output_length_misses"] == 1
    assert res["tokens"]["output_target_total"] == 12
    assert any(w.startswith("1 of 3 answers missed their output length target") for w in res["client"]["warnings"])


def test_output_length_not_judged_without_ignore_eos() -> None:
    recs = [_ok(0, 0.0, 0.0, 1.0, out=4, target=4), _ok(1, 0.0, 0.0, 1.0, out=3, target=4)]
    res = build_result(_outcome(_cfg(num_requests=2, output_len=4, ignore_eos=False), recs, 1.0))
    assert res["tokens"]["output_length_misses"] == 0
    assert not any("missed" in w for w in res["client"]["warnings"])


# ---------------------------------------------------------------------------------------- guided

SCHEMA = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}


def _guided_outcome(texts: list[str]) -> RunOutcome:
    specs = [RequestSpec(index=i, body={}, schema=SCHEMA, kind="json-schema") for i in range(len(texts))]
    specs.append(RequestSpec(index=len(texts), body={}))  # no schema
    recs = [_ok(i, 0.0, 0.0, 1.0, text=t) for i, t in enumerate(texts)]
    recs.append(_ok(len(texts), 0.0, 0.0, 1.0, spec=len(texts), text="not checked"))
    recs.append(RequestRecord(index=len(texts) + 1, spec_index=0, scheduled=0.0, sent=0.0, end=0.5, status=500,
                              error="http_500"))  # failed: never checked
    return _outcome(_cfg(num_requests=len(recs), workload="json-schema"), recs, 1.0, specs=specs)


def test_guided_validity_counts() -> None:
    outcome = _guided_outcome(['{"a": 1}', '{"a": "x"}', "not json"])
    res = build_result(outcome)
    # valid; wrong type for a; not JSON -> 1 valid, 2 invalid
    assert res["guided"] == {"valid": 1, "invalid": 2, "validity_rate": pytest.approx(1 / 3)}
    assert [r.guided_valid for r in outcome.records] == [True, False, False, None, None]


def test_no_guided_section_without_schemas() -> None:
    res = build_result(_outcome(_cfg(num_requests=1), [_ok(0, 0.0, 0.0, 1.0, text="{}")], 1.0))
    assert res["guided"] is None


def test_low_guided_validity_is_warned() -> None:
    # BUG (result.py module docstring, lines 16-17, vs build_result): the docstring says client.warnings
    # "also flags ... a low guided validity", but build_result never adds such a warning; a run whose
    # every guided answer is invalid (validity 0%) has no warning about it.
    res = build_result(_guided_outcome(["nope", "{}", '{"a": "x"}']))
    assert res["guided"]["validity_rate"] == 0.0
    assert any("guided" in w.lower() for w in res["client"]["warnings"]), res["client"]["warnings"]


# ------------------------------------------------------------------------------- client verdicts


def _lagging() -> list[RequestRecord]:
    """Open loop due every 0.125 s, but only one send per 0.25 s gets a slot (cap 4, 1 s per request).

    Request i: scheduled 0.125 i, sent 0.25 i (lag 125 i ms: 0 -> 1875 ms), ends 1 s later, exactly
    when request i+4 is sent, so 4 are in flight throughout (peak 4). Duration 15*0.25 + 1 = 4.75 s.
    First quarter lags 0,125,250,375 (median 187.5); last quarter 1500..1875 (median 1687.5).
    """
    return [_ok(i, 0.125 * i, 0.25 * i, 0.25 * i + 1.0) for i in range(16)]


def _steady() -> list[RequestRecord]:
    """Due every 0.25 s, sent 2 ms late, 0.5 s each: duration 15*0.25 + 0.002 + 0.5 = 4.252 s."""
    return [_ok(i, 0.25 * i, 0.25 * i + 0.002, 0.25 * i + 0.502) for i in range(16)]


def test_growing_lag_at_the_cap_is_cap_bound() -> None:
    res = build_result(_outcome(_cfg(rate=8.0, concurrency=4), _lagging(), 4.75))
    assert res["concurrency"]["peak"] == 4
    assert res["client"]["bound"] == "cap"
    assert res["client"]["lag_slope_ms_per_s"] > 0
    cap = [w for w in res["client"]["warnings"] if w.startswith("cap-bound")]
    assert len(cap) == 1
    assert "4 concurrency slots" in cap[0]
    assert not any(w.startswith("client-bound") for w in res["client"]["warnings"])


def test_growing_lag_without_a_cap_is_client_bound() -> None:
    res = build_result(_outcome(_cfg(rate=8.0), _lagging(), 4.75))
    assert res["client"]["bound"] == "client"
    assert any(w.startswith("client-bound") for w in res["client"]["warnings"])
    assert not any(w.startswith("cap-bound") for w in res["client"]["warnings"])


def test_growing_lag_with_free_slots_is_client_bound() -> None:
    # cap 8 but never more than 4 in flight: the slots were not what held the sends back
    res = build_result(_outcome(_cfg(rate=8.0, concurrency=8), _lagging(), 4.75))
    assert res["client"]["bound"] == "client"


def test_steady_small_lag_is_not_bound() -> None:
    res = build_result(_outcome(_cfg(rate=4.0), _steady(), 4.252, cpu_s=0.4))
    assert res["client"]["bound"] is None
    assert res["client"]["warnings"] == []
    assert res["schedule_lag_ms"]["p50"] == pytest.approx(2.0)


def test_busy_client_cpu_is_client_bound() -> None:
    # 4.1 s of CPU over a 4.252 s run = 96% of a core (>= 90%)
    res = build_result(_outcome(_cfg(rate=4.0), _steady(), 4.252, cpu_s=4.1))
    assert res["client"]["cpu_util"] == pytest.approx(4.1 / 4.252)
    assert res["client"]["bound"] == "client"
    assert any(w.startswith("client CPU at 96% of one core") for w in res["client"]["warnings"])


def test_closed_loop_short_of_its_concurrency_is_client_bound() -> None:
    # rate inf, concurrency 8, but only 4 lanes ever busy: request i sent at (i // 4) s, 1 s each.
    # busy 16 s over 4 s -> mean 4.0 (< 0.9 * 8); 16 requests >= 2 * 8
    recs = [_ok(i, float(i // 4), float(i // 4), float(i // 4) + 1.0) for i in range(16)]
    res = build_result(_outcome(_cfg(rate="inf", concurrency=8), recs, 4.0))
    assert res["concurrency"] == {"asked": 8, "achieved_mean": pytest.approx(4.0), "peak": 4}
    assert res["client"]["bound"] == "client"
    assert any(w.startswith("achieved concurrency 4.0 of the 8 asked") for w in res["client"]["warnings"])


def test_closed_loop_at_its_concurrency_is_fine() -> None:
    recs = [_ok(i, float(i // 4), float(i // 4), float(i // 4) + 1.0) for i in range(16)]
    res = build_result(_outcome(_cfg(rate="inf", concurrency=4), recs, 4.0))
    assert res["client"]["bound"] is None
    assert res["client"]["warnings"] == []


def test_near_the_measured_ceiling_is_warned() -> None:
    # 16 requests x 4 events = 64 events over 4.252 s = 15.05 events/s = 75% of 20 (>= 70%);
    # 16 / 4.252 = 3.76 req/s is 0.4% of 1000: not named
    ceiling = {"chunks_per_s_per_core": 20.0, "requests_per_s_per_core": 1000.0}
    res = build_result(_outcome(_cfg(rate=4.0), _steady(), 4.252, cpu_s=0.4), ceiling=ceiling)
    assert res["client"]["events"] == 64
    assert res["client"]["events_per_s"] == pytest.approx(64 / 4.252)
    near = [w for w in res["client"]["warnings"] if "bench ceiling" in w]
    assert len(near) == 1
    assert "75% of its events ceiling" in near[0]
    assert "requests ceiling" not in near[0]
    assert res["client"]["bound"] is None


def test_far_from_the_ceiling_is_not_warned() -> None:
    # 15.05 events/s is 50% of 30
    ceiling = {"chunks_per_s_per_core": 30.0, "requests_per_s_per_core": 1000.0}
    res = build_result(_outcome(_cfg(rate=4.0), _steady(), 4.252, cpu_s=0.4), ceiling=ceiling)
    assert not any("bench ceiling" in w for w in res["client"]["warnings"])


def test_label_and_config_in_the_result() -> None:
    res = build_result(_outcome(_cfg(rate=4.0, concurrency=2, api_key="secret"), _steady(), 4.252))
    assert res["label"] == "rate=4,c=2"
    assert "api_key" not in res["config"]
    assert res["config"]["rate"] == 4.0
    res = build_result(_outcome(_cfg(rate="inf", concurrency=4, label="mine"), _steady(), 4.252))
    assert res["label"] == "mine"
    assert res["config"]["rate"] == "inf"

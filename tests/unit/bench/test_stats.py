"""``bench.stats`` and the latencies of ``bench.records.RequestRecord``: hand-computed fixtures only.

Every expected number is worked out in a comment next to it; none comes from the code under test.
"""

from __future__ import annotations

import math

import pytest

from qwen_serve.bench.records import RequestRecord
from qwen_serve.bench.stats import (
    goodput,
    in_flight,
    lag_trend,
    median_interval,
    parse_slo,
    percentile,
    summarize,
)

# --------------------------------------------------------------------------------------- percentile


def test_percentile_interpolates_linearly_between_ranks() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    # p50: pos = (4-1)*0.5 = 1.5 -> xs[1] + (xs[2]-xs[1])*0.5 = 2 + 0.5 = 2.5
    assert percentile(xs, 50) == pytest.approx(2.5)
    # p90: pos = 3*0.9 = 2.7 -> xs[2] + (xs[3]-xs[2])*0.7 = 3 + 0.7 = 3.7
    assert percentile(xs, 90) == pytest.approx(3.7)
    # p0 and p100 are the ends
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0


def test_percentile_of_one_value_is_that_value() -> None:
    for q in (0, 50, 99, 100):
        assert percentile([7.5], q) == 7.5


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("q", [-1, -0.001, 100.001, 101])
def test_percentile_outside_0_100_is_an_error(q: float) -> None:
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0, 2.0], q)


# ---------------------------------------------------------------------------------------- summarize


def test_summarize_small_list_ignoring_none() -> None:
    s = summarize([30.0, None, 10.0, 50.0, 20.0, None, 40.0])
    # sorted: 10 20 30 40 50 (n=5), mean 150/5 = 30
    # p50: pos 2.0 -> 30; p90: pos 3.6 -> 40 + 10*0.6 = 46
    # p95: pos 3.8 -> 48; p99: pos 3.96 -> 49.6; max 50
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(30.0)
    assert s["p50"] == pytest.approx(30.0)
    assert s["p90"] == pytest.approx(46.0)
    assert s["p95"] == pytest.approx(48.0)
    assert s["p99"] == pytest.approx(49.6)
    assert s["max"] == 50.0
    assert set(s) == {"mean", "p50", "p90", "p95", "p99", "max", "n"}


def test_summarize_empty_gives_none_values_and_n_zero() -> None:
    expected = {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None, "n": 0}
    assert summarize([]) == expected
    assert summarize([None, None]) == expected


# ---------------------------------------------------------------------------------------- parse_slo


def test_parse_slo_good_inputs() -> None:
    assert parse_slo("ttft_ms=500,tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(" e2el_ms=1500.5 , ttft_ms=200") == {"e2el_ms": 1500.5, "ttft_ms": 200.0}
    assert parse_slo("") == {}
    assert parse_slo(None) == {}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("ttft=500", "'ttft=500'"),  # unknown key
        ("ttft_ms", "'ttft_ms'"),  # no '='
        ("ttft_ms=500,itl_ms=5", "'itl_ms=5'"),  # the second part is the bad one
        ("tpot_ms=fast", "'fast'"),  # not a number
        ("e2el_ms=0", "e2el_ms must be positive"),
        ("ttft_ms=-3", "ttft_ms must be positive"),
    ],
)
def test_parse_slo_bad_inputs_name_the_part(text: str, names: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_slo(text)
    assert names in str(info.value)
    assert str(info.value).startswith("slo:")


def test_parse_slo_rejects_nan() -> None:
    # BUG (stats.parse_slo): float("nan") passes the `<= 0` check, so a NaN SLO is accepted and
    # goodput() then counts every request as meeting it (v > nan is always False).
    with pytest.raises(ValueError):
        parse_slo("ttft_ms=nan")


# ------------------------------------------------------------------------------------------ goodput


def test_goodput_counts_rows_meeting_every_slo() -> None:
    rows = [
        {"ttft_ms": 100.0, "tpot_ms": 10.0, "e2el_ms": 900.0},  # meets all
        {"ttft_ms": 600.0, "tpot_ms": 10.0, "e2el_ms": 900.0},  # ttft over
        {"ttft_ms": 100.0, "tpot_ms": 60.0, "e2el_ms": 900.0},  # tpot over
        {"ttft_ms": 500.0, "tpot_ms": 50.0, "e2el_ms": 900.0},  # exactly at the limits: meets
    ]
    assert goodput(rows, {"ttft_ms": 500.0, "tpot_ms": 50.0}) == 2
    assert goodput(rows, {"e2el_ms": 1000.0}) == 4
    assert goodput(rows, {"e2el_ms": 800.0}) == 0


def test_goodput_missing_tpot_meets_but_missing_ttft_fails() -> None:
    one_token = {"ttft_ms": 100.0, "tpot_ms": None, "e2el_ms": 150.0}
    no_first_token = {"ttft_ms": None, "tpot_ms": None, "e2el_ms": 150.0}
    assert goodput([one_token], {"tpot_ms": 50.0}) == 1
    assert goodput([one_token], {"ttft_ms": 500.0, "tpot_ms": 50.0}) == 1
    assert goodput([no_first_token], {"ttft_ms": 500.0}) == 0
    assert goodput([no_first_token], {"tpot_ms": 50.0}) == 1


# ---------------------------------------------------------------------------------------- in_flight


def test_in_flight_mean_and_peak_of_drawn_intervals() -> None:
    #   0    1    2    3    4
    #   [---------)             a: 0..2
    #        [---------)        b: 1..3
    #             [----)        c: 2..3   (starts as a ends: no overlap with a)
    # busy = 2 + 2 + 1 = 5 over span 4 -> mean 1.25; peak 2 (1..2: a,b; 2..3: b,c)
    mean, peak = in_flight([(0.0, 2.0), (1.0, 3.0), (2.0, 3.0)], 4.0)
    assert mean == pytest.approx(1.25)
    assert peak == 2


def test_in_flight_nested_intervals_peak_three() -> None:
    # a 0..4, b 1..2, c 1.5..3 -> at 1.5..2 all three; busy 4 + 1 + 1.5 = 6.5 over 4 -> 1.625
    mean, peak = in_flight([(0.0, 4.0), (1.0, 2.0), (1.5, 3.0)], 4.0)
    assert mean == pytest.approx(1.625)
    assert peak == 3


def test_in_flight_touching_intervals_do_not_overlap() -> None:
    # [0,1] and [1,2]: the first ends at the instant the second starts -> peak 1; busy 2 over 2 -> 1.0
    mean, peak = in_flight([(0.0, 1.0), (1.0, 2.0)], 2.0)
    assert peak == 1
    assert mean == pytest.approx(1.0)
    # listed in the other order: same
    assert in_flight([(1.0, 2.0), (0.0, 1.0)], 2.0)[1] == 1


def test_in_flight_empty_and_zero_span() -> None:
    assert in_flight([], 10.0) == (0.0, 0)
    assert in_flight([(0.0, 1.0)], 0.0) == (0.0, 1)


# ---------------------------------------------------------------------------------- median_interval


def test_median_interval_median_min_max_and_ci_around_median() -> None:
    m = median_interval([3.0, 1.0, 5.0, 2.0, 4.0])
    # sorted 1..5 -> median 3, min 1, max 5, n 5
    assert m["median"] == 3.0
    assert m["min"] == 1.0
    assert m["max"] == 5.0
    assert m["n"] == 5
    assert m["ci_low"] is not None and m["ci_high"] is not None
    assert 1.0 <= m["ci_low"] <= 3.0 <= m["ci_high"] <= 5.0


def test_median_interval_even_count_and_ignores_none_nan() -> None:
    m = median_interval([4.0, None, 1.0, math.nan, 2.0, 3.0])  # type: ignore[list-item]
    # kept 1 2 3 4 -> median (2+3)/2 = 2.5
    assert m["median"] == pytest.approx(2.5)
    assert m["n"] == 4


def test_median_interval_is_reproducible_with_a_seed() -> None:
    xs = [0.91, 1.07, 0.98, 1.12, 0.95, 1.03, 1.01, 0.89, 1.10, 0.97]
    assert median_interval(xs, seed=3) == median_interval(xs, seed=3)


def test_median_interval_single_value_and_empty() -> None:
    m = median_interval([2.0])
    assert (m["median"], m["ci_low"], m["ci_high"], m["min"], m["max"], m["n"]) == (2.0, 2.0, 2.0, 2.0, 2.0, 1)
    assert median_interval([]) == {"median": None, "ci_low": None, "ci_high": None, "min": None, "max": None, "n": 0}


# ---------------------------------------------------------------------------------------- lag_trend


def test_lag_trend_slope_of_a_known_line() -> None:
    # lag = 5 + 40 * t  -> slope 40 ms per second
    pts = [(0.0, 5.0), (1.0, 45.0), (2.0, 85.0), (3.0, 125.0)]
    assert lag_trend(pts) == pytest.approx(40.0)
    # flat lag -> 0
    assert lag_trend([(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)]) == pytest.approx(0.0)


def test_lag_trend_of_noisy_points() -> None:
    # x = 0,1,2 (mean 1), y = 0, 3, 2 (mean 5/3)
    # sxy = (-1)(-5/3) + 0 + (1)(1/3) = 2; sxx = 2 -> slope 1
    assert lag_trend([(0.0, 0.0), (1.0, 3.0), (2.0, 2.0)]) == pytest.approx(1.0)


def test_lag_trend_needs_three_points_and_spread_in_time() -> None:
    assert lag_trend([]) == 0.0
    assert lag_trend([(0.0, 0.0), (1.0, 1000.0)]) == 0.0
    assert lag_trend([(1.0, 0.0), (1.0, 10.0), (1.0, 20.0)]) == 0.0


# ------------------------------------------------------------------------ RequestRecord latencies


def _record() -> RequestRecord:
    # scheduled at 1.000 s, actually sent 200 ms late, events at 1.50, 1.52, 1.55 s, done at 1.60 s;
    # the last event carried 3 tokens, 5 tokens in all.
    return RequestRecord(
        index=3, spec_index=7, scheduled=1.0, sent=1.2, end=1.6, status=200,
        input_tokens=11, output_tokens=5, target_output_tokens=5, finish_reason="length",
        chunk_times=[1.5, 1.52, 1.55], chunk_tokens=[1, 1, 3], text="abcde", client_output_tokens=3,
    )


def test_record_latencies_run_from_scheduled_not_sent() -> None:
    r = _record()
    assert r.ttft_ms == pytest.approx(500.0)  # 1.5 - 1.0
    assert r.e2el_ms == pytest.approx(600.0)  # 1.6 - 1.0
    assert r.ttft_from_send_ms == pytest.approx(300.0)  # 1.5 - 1.2
    assert r.schedule_lag_ms == pytest.approx(200.0)  # 1.2 - 1.0


def test_record_tpot_is_last_minus_first_over_tokens_minus_one() -> None:
    # (1.55 - 1.50) s = 50 ms over 5 - 1 = 4 tokens -> 12.5 ms
    assert _record().tpot_ms == pytest.approx(12.5)


def test_record_tpot_none_without_two_tokens_or_events() -> None:
    assert RequestRecord(0, 0, 0.0, chunk_times=[0.1], output_tokens=1).tpot_ms is None
    assert RequestRecord(0, 0, 0.0, chunk_times=[0.1, 0.2], output_tokens=None).tpot_ms is None
    assert RequestRecord(0, 0, 0.0, output_tokens=4).tpot_ms is None
    assert RequestRecord(0, 0, 0.0).ttft_ms is None
    assert RequestRecord(0, 0, 0.0).ttft_from_send_ms is None


def test_record_itl_spreads_a_gap_over_the_tokens_it_carried() -> None:
    # 1.50 -> 1.52: 20 ms, 1 token -> [20]; 1.52 -> 1.55: 30 ms, 3 tokens -> [10, 10, 10]
    assert _record().itl_ms() == pytest.approx([20.0, 10.0, 10.0, 10.0])


def test_record_itl_zero_or_missing_token_counts_count_as_one() -> None:
    r = RequestRecord(0, 0, 0.0, chunk_times=[0.0, 0.01, 0.03], chunk_tokens=[1, 0])
    # 10 ms with 0 tokens -> one entry; 20 ms with no count -> one entry
    assert r.itl_ms() == pytest.approx([10.0, 20.0])


def test_record_to_row_keys_and_ms_conversion() -> None:
    row = _record().to_row()
    assert set(row) == {
        "index", "spec_index", "status", "error", "error_message", "input_tokens", "output_tokens",
        "target_output_tokens", "finish_reason", "client_output_tokens", "guided_valid", "warmup", "kind",
        "conversation", "turn",
        "scheduled_ms", "sent_ms", "end_ms", "ttft_ms", "tpot_ms", "e2el_ms", "schedule_lag_ms", "chunks", "itl_ms",
    }
    assert row["scheduled_ms"] == 1000.0
    assert row["sent_ms"] == 1200.0
    assert row["end_ms"] == 1600.0
    assert row["ttft_ms"] == 500.0
    assert row["e2el_ms"] == 600.0
    assert row["schedule_lag_ms"] == 200.0
    assert row["tpot_ms"] == 12.5
    assert row["chunks"] == 3
    assert row["itl_ms"] == [20.0, 10.0, 10.0, 10.0]
    assert row["index"] == 3 and row["spec_index"] == 7 and row["output_tokens"] == 5


def test_record_to_row_of_an_unanswered_request() -> None:
    row = RequestRecord(0, 0, 0.25, sent=0.25, end=0.5, error="connection_error").to_row()
    assert row["ttft_ms"] is None and row["tpot_ms"] is None
    assert row["e2el_ms"] == 250.0
    assert row["chunks"] == 0 and row["itl_ms"] == []

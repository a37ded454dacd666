"""``bench.report``: result/records files, PNG plots and the self-contained HTML report (no engine)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.bench.records import RequestRecord
from qwen_serve.bench.report import (
    load_result,
    load_rows,
    load_sweep,
    render,
    render_from_dirs,
    write_records,
    write_result,
    write_sweep,
)
from qwen_serve.bench.report.plots import latency_cdfs, sweep_curve, timeline, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def make_records(n: int = 12, *, seed: float = 0.0) -> list[RequestRecord]:
    """``n`` ok requests with spread-out latencies, one warm-up and one failed (429) request."""
    out: list[RequestRecord] = []
    for i in range(n):
        sched = i * 0.25
        first = sched + 0.02 + 0.01 * i + seed
        times = [first + 0.005 * (k + 1) * (1 + i % 3) for k in range(8)]
        times.insert(0, first)
        out.append(
            RequestRecord(
                index=i, spec_index=i, scheduled=sched, sent=sched + 0.001, end=times[-1] + 0.001, status=200,
                input_tokens=32, output_tokens=9, target_output_tokens=9, finish_reason="length",
                chunk_times=times, chunk_tokens=[1] * 9, text="x" * 9, client_output_tokens=9,
            )
        )
    out.append(RequestRecord(index=n, spec_index=n, scheduled=0.0, sent=0.0, end=0.5, status=200,
                             chunk_times=[0.1, 0.2], chunk_tokens=[1, 1], output_tokens=2, warmup=True))
    out.append(RequestRecord(index=n + 1, spec_index=n + 1, scheduled=1.0, sent=1.0, end=1.01, status=429,
                             error="rate_limit_exceeded", error_message="slow down"))
    return out


def _lat(mean: float) -> dict[str, Any]:
    return {"mean": mean, "p50": mean, "p90": mean * 1.5, "p95": mean * 1.8, "p99": mean * 2, "max": mean * 3, "n": 12}


def make_result(label: str = "rate=4", *, rps: float = 4.0, bound: str | None = None) -> dict[str, Any]:
    return {
        "label": label,
        "started_at": "2024-01-01T00:00:00Z",
        "requests_completed": 12,
        "requests_failed": 1,
        "duration_s": 3.0,
        "request_throughput": rps,
        "output_token_throughput": rps * 9,
        "total_token_throughput": rps * 41,
        "input_token_throughput": rps * 32,
        "goodput_rps": float("nan"),
        "ttft_ms": _lat(20.0 * rps),
        "tpot_ms": _lat(5.0 * rps),
        "itl_ms": _lat(5.0 * rps),
        "e2el_ms": _lat(80.0 * rps),
        "schedule_lag_ms": _lat(1.0),
        "ttft_from_send_ms": {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "max": None, "n": 0},
        "config": {"url": "http://gw:8000", "model": "m", "rate": rps, "seed": 1, "label": label, "slo": None},
        "tokens": {"input_total": 384, "output_total": 108, "output_target_total": 108, "output_length_misses": 0,
                   "client_output_estimate_total": 108, "client_estimate_mismatch_pct": 0.0, "source": "usage"},
        "errors": {"by_status": {"429": 1}, "by_code": {"rate_limit_exceeded": 1}, "examples": [f"429 {EVIL}"]},
        "concurrency": {"asked": None, "achieved_mean": 1.3, "peak": 3},
        "client": {"cpu_util": 0.97 if bound else 0.2, "bound": bound,
                   "warnings": ["client CPU at 97% of one core"] if bound else []},
        "engine": {"kv_cache_usage_peak": 0.12, "prefix_cache_hit_rate": float("inf"), "preemptions": 0.0,
                   "queue_peak": 2.0, "before": {}, "after": {}},
        "guided": None,
        "timeseries": {"t_s": [0.0, 1.0, 2.0], "completed_rps": [3, 4, 5], "output_tps": [27, 36, 45],
                       "in_flight": [1, 2, 1], "schedule_lag_ms": [0.5, None, 0.7]},
    }


def assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5000


def write_run(d: Path, label: str, *, rps: float = 4.0, bound: str | None = None) -> None:
    result = make_result(label, rps=rps, bound=bound)
    write_result(d, result)
    write_records(d, make_records(seed=rps / 100))


def test_result_json_round_trip_and_nan_is_null(tmp_path: Path) -> None:
    result = make_result()
    path = write_result(tmp_path / "run", result)
    assert path == tmp_path / "run" / "result.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = load_result(tmp_path / "run")
    assert back["goodput_rps"] is None
    assert back["engine"]["prefix_cache_hit_rate"] is None
    assert back["ttft_ms"] == result["ttft_ms"]
    assert back["errors"] == result["errors"]
    assert back["timeseries"]["schedule_lag_ms"] == [0.5, None, 0.7]


def test_records_jsonl_and_csv(tmp_path: Path) -> None:
    records = make_records()
    jsonl, csv_path = write_records(tmp_path, records)
    rows = load_rows(tmp_path)
    assert len(rows) == len(records) == len(jsonl.read_text().splitlines())
    assert rows[0] == json.loads(json.dumps(records[0].to_row()))
    assert set(rows[0]) == set(records[0].to_row())
    assert {"ttft_ms", "tpot_ms", "e2el_ms", "itl_ms", "schedule_lag_ms", "error", "warmup"} <= set(rows[0])
    assert "text" not in rows[0]
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    expected = ["itl_ms_mean" if k == "itl_ms" else k for k in records[0].to_row()]
    assert header == expected
    assert "itl_ms" not in header and "itl_ms_mean" in header
    assert len(body) == len(records)
    first = dict(zip(header, body[0]))
    assert math.isclose(float(first["itl_ms_mean"]), sum(rows[0]["itl_ms"]) / len(rows[0]["itl_ms"]), rel_tol=1e-3)
    failed = dict(zip(header, body[-1]))
    assert failed["error"] == "rate_limit_exceeded" and failed["ttft_ms"] == "" and failed["itl_ms_mean"] == ""


def test_write_records_empty_still_has_header(tmp_path: Path) -> None:
    jsonl, csv_path = write_records(tmp_path, [])
    assert jsonl.read_text() == ""
    assert load_rows(tmp_path) == []
    assert csv_path.read_text().splitlines()[0].startswith("index,spec_index,")


def test_sweep_json_drops_timeseries(tmp_path: Path) -> None:
    points = [make_result("rate=1", rps=1), make_result("rate=2", rps=2)]
    write_sweep(tmp_path, points)
    back = load_sweep(tmp_path)
    assert [p["label"] for p in back] == ["rate=1", "rate=2"]
    assert all("timeseries" not in p for p in back)
    assert "timeseries" in points[0]  # input not mutated


def test_plots_are_pngs(tmp_path: Path) -> None:
    rows = {"a": [r.to_row() for r in make_records()], "b": [r.to_row() for r in make_records(seed=0.5)]}
    assert_png(latency_cdfs(rows, tmp_path / "cdf.png"))
    assert_png(timeline({"a": make_result("a"), "b": make_result("b", rps=8)}, tmp_path / "tl.png"))
    points = [make_result("rate=1", rps=1), make_result("rate=2", rps=2), make_result("rate=8", rps=8, bound="client")]
    assert_png(sweep_curve(points, tmp_path / "sweep.png"))


def test_plots_tolerate_empty_and_missing_data(tmp_path: Path) -> None:
    failed_only = [make_records()[-1].to_row()]
    assert_png(latency_cdfs({"x": failed_only}, tmp_path / "cdf.png"))
    assert_png(timeline({"x": {"timeseries": {"t_s": [], "completed_rps": []}}, "y": {}}, tmp_path / "tl.png"))
    assert_png(sweep_curve([{"label": "p"}, {"ttft_ms": None}], tmp_path / "sweep.png"))
    assert write_plots(tmp_path / "none", [{"label": "x"}], {"x": failed_only}) == []


def test_write_plots_names(tmp_path: Path) -> None:
    rows = {"rate=4": [r.to_row() for r in make_records()]}
    single = write_plots(tmp_path / "one", [make_result()], rows)
    assert [p.name for p in single] == ["latency_cdf.png", "timeline.png"]
    swept = write_plots(tmp_path / "sweep", [make_result()], rows,
                        sweep=[make_result("rate=1", rps=1), make_result("rate=4")])
    assert [p.name for p in swept] == ["latency_cdf.png", "timeline.png", "sweep.png"]
    for p in swept:
        assert_png(p)


def _html_for(tmp_path: Path) -> str:
    results = [make_result(EVIL), make_result("rate=8", rps=8, bound="client")]
    rows = {EVIL: [r.to_row() for r in make_records()], "rate=8": [r.to_row() for r in make_records(seed=0.3)]}
    path = render(tmp_path, results, rows, title=f"bench {EVIL}")
    assert path == tmp_path / "report.html"
    return path.read_text(encoding="utf-8")


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    html = _html_for(tmp_path)
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 3  # latency CDFs, timeline, the two runs as a curve
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    urls = re.findall(r'(?:src|href|action|srcset)\s*=\s*["\']?([^"\' >]+)', html, flags=re.IGNORECASE)
    assert not [u for u in urls if not u.startswith("data:")]
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", html, flags=re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    assert "http://gw:8000" in html  # the config value is shown as text, not as a link


def test_html_content(tmp_path: Path) -> None:
    html = _html_for(tmp_path)
    assert 'class="warnings"' in html
    assert "CLIENT-BOUND" in html and "NOT the server" in html
    assert "client CPU at 97% of one core" in html
    assert "client-bound" in html  # the column badge
    assert "rate_limit_exceeded" in html and "429" in html
    assert "(no SLO)" in html
    assert "<details>" in html and "Configuration" in html
    for metric in ("TTFT", "TPOT", "ITL", "E2EL", "Schedule lag", "KV cache", "Prefix cache", "Guided JSON"):
        assert metric in html


def test_html_without_warnings(tmp_path: Path) -> None:
    result = make_result("calm")
    result["requests_failed"] = 0
    result["errors"] = {"by_status": {}, "by_code": {}, "examples": []}
    html = render(tmp_path, [result], {"calm": []}).read_text()
    assert 'class="warnings"' not in html and "No client-side warnings" in html
    assert "No errors." in html


def test_render_from_dirs_overlays_two_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "rate=2", rps=2)
    write_run(tmp_path / "b", "", rps=6, bound="cap")  # no label: named after its directory
    out = render_from_dirs(tmp_path / "out", [tmp_path / "a", tmp_path / "b"])
    html = out.read_text()
    header = re.search(r'<table class="summary"><thead><tr>(.*?)</tr></thead>', html)
    assert header is not None
    assert len(re.findall(r"<th[ >]", header.group(1))) == 3  # metric + two runs
    assert "rate=2" in header.group(1) and ">b<" in header.group(1)
    assert "CAP-BOUND" in html
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"latency_cdf.png", "timeline.png", "sweep.png"}


def test_render_from_sweep_dir(tmp_path: Path) -> None:
    points = [make_result(f"rate={r}", rps=r) for r in (1, 2, 4)]
    for p in points:
        write_result(tmp_path / "sw" / p["label"].replace("=", "-"), p)
    write_sweep(tmp_path / "sw", points)
    html = render_from_dirs(tmp_path / "sw", [tmp_path / "sw"]).read_text()
    for p in points:
        assert p["label"] in html
    assert (tmp_path / "sw" / "sweep.png").is_file()
    with pytest.raises(FileNotFoundError):
        render_from_dirs(tmp_path / "x", [tmp_path / "empty-does-not-exist"])

"""``qwen-serve bench`` against the real stack: files, figures and token counts the engine confirms.

The CLI runs as a subprocess (the path a user takes) against the shared gateway (auth on). What is
asserted is deterministic: counts, files, token totals (``ignore_eos`` makes every answer exactly
``--output-len`` tokens, and the engine's own ``vllm:generation_tokens_total`` must grow by the same
amount), the report's self-containment. Timing figures are only checked for shape and sanity.
"""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.engine

CONTRACT_KEYS = ("requests_completed", "requests_failed", "duration_s", "request_throughput",
                 "output_token_throughput", "total_token_throughput", "goodput_rps", "ttft_ms", "tpot_ms",
                 "itl_ms", "e2el_ms", "schedule_lag_ms", "config")
LATENCY_KEYS = ("mean", "p50", "p90", "p95", "p99")
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "qwen_serve", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"bench {args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "poster", "data", "action")]


def assert_self_contained(html: Path) -> None:
    """Nothing in the page makes the browser fetch anything: images inline, no scripts, no links out."""
    text = html.read_text()
    p = _Refs()
    p.feed(text)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert p.refs and all(r.startswith(("data:image/png;base64,", "#")) for r in p.refs), p.refs[:5]
    assert "url(" not in text and "@import" not in text


def assert_result(d: Path) -> dict:
    result = json.loads((d / "result.json").read_text())
    for key in CONTRACT_KEYS:
        assert key in result, key
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "schedule_lag_ms"):
        assert all(isinstance(result[key][k], float) for k in LATENCY_KEYS), (key, result[key])
    assert result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"] <= result["e2el_ms"]["max"]
    return result


def test_bench_run_writes_results_plots_and_report(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "run"
    n, in_len, out_len, warmup = 12, 64, 8, 2
    bench("run", "--url", stack.url, "--api-key", stack.api_key, "--model", stack.model,
          "--workload", "random", "--input-len", str(in_len), "--output-len", str(out_len),
          "--rate", "6", "--concurrency", "4", "--num-requests", str(n), "--warmup", str(warmup),
          "--slo", "ttft_ms=60000,tpot_ms=60000", "--out", str(out), "--no-progress")
    result = assert_result(out)
    assert result["requests_completed"] == n and result["requests_failed"] == 0
    tokens = result["tokens"]
    assert tokens["source"] == "usage" and tokens["input_exact"] is True
    assert tokens["output_total"] == n * out_len and tokens["output_length_misses"] == 0
    assert tokens["input_total"] == n * in_len  # /tokenize made every prompt exactly --input-len
    # The engine's own counter agrees with the client's usage-based total (warm-up excluded).
    assert result["engine"]["generation_tokens"] == n * out_len
    assert result["engine"]["prompt_tokens"] == n * in_len
    assert result["goodput_rps"] == pytest.approx(result["request_throughput"])
    assert result["config"]["rate"] == 6 and "api_key" not in result["config"]

    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == n + warmup and sum(r["warmup"] for r in rows) == warmup
    measured = [r for r in rows if not r["warmup"]]
    assert all(r["output_tokens"] == out_len and r["input_tokens"] == in_len for r in measured)
    assert all(r["ttft_ms"] >= r["schedule_lag_ms"] >= 0 for r in measured)
    assert (out / "requests.csv").read_text().count("\n") == n + warmup + 1
    for png in ("latency_cdf.png", "timeline.png"):
        assert (out / png).read_bytes().startswith(PNG)
    assert_self_contained(out / "report.html")


def test_bench_sweep_three_points(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    bench("sweep", "--url", stack.url, "--api-key", stack.api_key, "--model", stack.model,
          "--input-len", "64", "--output-len", "6", "--concurrencies", "1,2,4", "--num-requests", "6",
          "--no-stop", "--out", str(out), "--no-progress")
    points = json.loads((out / "sweep.json").read_text())
    assert [p["label"] for p in points] == ["c=1", "c=2", "c=4"]
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 3
    for d, point in zip(dirs, points):
        result = assert_result(d)
        assert result["requests_completed"] == 6 and result["tokens"]["output_total"] == 36
        assert result["request_throughput"] == pytest.approx(point["request_throughput"])
        assert (d / "requests.jsonl").read_text().count("\n") == 6
        assert result["concurrency"]["peak"] <= result["concurrency"]["asked"]
    for png in ("latency_cdf.png", "timeline.png", "sweep.png"):
        assert (out / png).read_bytes().startswith(PNG)
    assert_self_contained(out / "report.html")
    # Re-rendering an overlay of two saved runs works from the files alone.
    bench("report", str(dirs[0]), str(dirs[2]), "--out", str(tmp_path / "overlay"))
    assert_self_contained(tmp_path / "overlay" / "report.html")


def test_bench_run_against_the_responses_api(stack: Stack, tmp_path: Path) -> None:
    """``--api responses``: the same load through ``/v1/responses``; tokens from each ``response.completed``
    event's ``usage`` (the engine agrees), TTFT at the first ``response.output_text.delta``."""
    out = tmp_path / "responses"
    n, in_len, out_len = 4, 64, 6
    bench("run", "--url", stack.url, "--api-key", stack.api_key, "--model", stack.model, "--api", "responses",
          "--workload", "random", "--input-len", str(in_len), "--output-len", str(out_len),
          "--rate", "inf", "--concurrency", "2", "--num-requests", str(n), "--out", str(out), "--no-progress")
    result = assert_result(out)
    assert result["config"]["api"] == "responses"
    assert result["requests_completed"] == n and result["requests_failed"] == 0
    tokens = result["tokens"]
    assert tokens["source"] == "usage" and tokens["output_total"] == n * out_len
    assert tokens["input_total"] == n * in_len  # the same chat template as /tokenize counted
    assert result["engine"]["generation_tokens"] == n * out_len
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == out_len for r in rows)
    assert all(0 < r["ttft_ms"] <= r["e2el_ms"] for r in rows)

"""``bench.config`` (RunConfig via ``build``, scenario files) and ``bench.compare.parse_target``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.bench.compare import Target, parse_target
from qwen_serve.bench.config import BenchConfigError, build, load_scenario

BASE: dict[str, Any] = {"url": "http://127.0.0.1:8000", "model": "m"}


def _build(**kw: Any) -> Any:
    return build({**BASE, **kw})


def _error(**kw: Any) -> str:
    with pytest.raises(BenchConfigError) as info:
        _build(**kw)
    return str(info.value)


# ------------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("rate", [0, -1.5, "0", float("nan")])
def test_rate_must_be_positive(rate: Any) -> None:
    assert _error(rate=rate, num_requests=10) == "rate: must be positive or 'inf'"


@pytest.mark.parametrize("text", ["inf", "INF", " Infinity "])
def test_rate_inf_string_accepted(text: str) -> None:
    cfg = _build(rate=text, num_requests=10)
    assert math.isinf(cfg.rate)
    assert not cfg.closed_loop  # no concurrency cap: a burst


def test_rate_inf_with_concurrency_is_closed_loop() -> None:
    cfg = _build(rate="inf", concurrency=8, duration=30)
    assert cfg.closed_loop
    assert not _build(rate=5, concurrency=8, duration=30).closed_loop


def test_unknown_workload_names_the_field() -> None:
    msg = _error(workload="bogus", num_requests=1)
    assert msg.startswith("workload: unknown workload 'bogus'")


def test_sharegpt_needs_a_file() -> None:
    assert _error(workload="sharegpt", num_requests=1).startswith("workload: sharegpt needs a file")
    cfg = _build(workload="sharegpt:/data/sg.json", num_requests=1)
    assert cfg.workload_name == "sharegpt"
    assert cfg.workload_path == "/data/sg.json"


def test_needs_duration_or_num_requests() -> None:
    assert "give --duration S or --num-requests N" in _error()


def test_rate_inf_with_duration_needs_concurrency() -> None:
    assert "--rate inf with --duration needs --concurrency" in _error(rate="inf", duration=10)


def test_unknown_key_names_it() -> None:
    assert _error(num_requests=1, no_such_flag=3).startswith("no_such_flag:")


def test_several_errors_all_named() -> None:
    msg = _error(num_requests=1, rate=-1, output_len=0)
    assert "rate: must be positive or 'inf'" in msg
    assert "output_len:" in msg


def test_slo_string_parsed() -> None:
    assert _build(num_requests=1, slo="ttft_ms=500,tpot_ms=50").slo == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert _build(num_requests=1, slo=None).slo == {}
    assert _build(num_requests=1).slo == {}


def test_bad_slo_names_the_field_and_part() -> None:
    msg = _error(num_requests=1, slo="ttft=5")
    assert msg.startswith("slo:")
    assert "'ttft=5'" in msg


def test_infinite_duration_is_rejected() -> None:
    # BUG (config.RunConfig.duration, Field(gt=0)): 'inf' passes validation; with a finite --rate and no
    # --num-requests, arrivals.schedule(None, rate, duration=inf) then never leaves its loop (the list
    # of arrival offsets grows until memory runs out).
    with pytest.raises(BenchConfigError, match="duration"):
        _build(rate=10, duration=float("inf"))


def test_public_omits_api_key_and_writes_inf_as_text() -> None:
    cfg = _build(num_requests=3, api_key="sk-secret", concurrency=2)
    pub = cfg.public()
    assert "api_key" not in pub
    assert "sk-secret" not in repr(pub)
    assert pub["rate"] == "inf"
    assert pub["url"] == "http://127.0.0.1:8000" and pub["num_requests"] == 3 and pub["concurrency"] == 2
    assert _build(num_requests=3, rate=2.5).public()["rate"] == 2.5


# ---------------------------------------------------------------------------------- load_scenario


def test_scenario_keys_with_dashes_or_underscores(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("num-requests: 20\ninput_len: 64\nrate: inf\nmax-model-len: 2048\nslo: ttft_ms=500\n")
    values = load_scenario(p)
    assert values == {"num_requests": 20, "input_len": 64, "rate": "inf", "max_model_len": 2048,
                      "slo": "ttft_ms=500"}
    cfg = build({**BASE, **values})
    assert cfg.num_requests == 20 and math.isinf(cfg.rate) and cfg.slo == {"ttft_ms": 500.0}


def test_scenario_empty_file_is_no_settings(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_scenario(p) == {}


def test_scenario_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- rate: 1\n- rate: 2\n")
    with pytest.raises(BenchConfigError, match="must be a mapping"):
        load_scenario(p)


def test_scenario_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("rate: [1, 2\n")
    with pytest.raises(BenchConfigError, match=r"^scenario: .*bad\.yaml: line 2, column 1: invalid YAML \("):
        load_scenario(p)
    with pytest.raises(BenchConfigError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------ compare.parse_target


def test_parse_target_name_and_url() -> None:
    assert parse_target("a=http://127.0.0.1:8000") == Target(name="a", url="http://127.0.0.1:8000")


def test_parse_target_with_options() -> None:
    t = parse_target("gw=https://gw.example/v,api_key=sk-1,model=qwen")
    assert t == Target(name="gw", url="https://gw.example/v", api_key="sk-1", model="qwen")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("http://127.0.0.1:8000", "is not NAME=URL"),
        ("a=", "is not NAME=URL"),
        ("=http://x", "is not NAME=URL"),
        ("a=ftp://x", "URL must start with http:// or https://, got 'ftp://x'"),
        ("a=http://x,colour=blue", "unknown option 'colour=blue'"),
        ("a=http://x,api_key", "unknown option 'api_key'"),
    ],
)
def test_parse_target_bad_forms(text: str, part: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert part in str(info.value)
    assert str(info.value).startswith("target:")


def test_unreachable_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that is not there ends the run with one line naming the request, not a traceback."""
    import socket

    from qwen_serve.cli import main

    with socket.socket() as s:  # a port that was just free on loopback: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["bench", "run", "--url", f"http://127.0.0.1:{port}", "--model", "m", "--num-requests", "1",
                 "--no-progress", "--no-engine-metrics"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "/tokenize" in err and "Traceback" not in err

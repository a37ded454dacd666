"""``api_key_file`` / ``--api-key-file``: the key read from a file, its precedence, and that it is never saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from qwen_serve.bench.cli import _settings
from qwen_serve.bench.config import BenchConfigError, build
from qwen_serve.bench.records import RequestRecord, RequestSpec
from qwen_serve.bench.report import write_result
from qwen_serve.bench.result import build_result
from qwen_serve.bench.run import RunOutcome
from qwen_serve.cli import _parser
from qwen_serve.cli import main as cli_main

BASE: dict[str, Any] = {"url": "http://127.0.0.1:9", "model": "m", "num_requests": 4}
SECRET = "qs-not-a-real-key-0123456789"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(f"  {SECRET}\n\n")
    path.chmod(0o600)
    return path


def test_key_is_the_stripped_file_content(key_file: Path) -> None:
    cfg = build({**BASE, "api_key_file": str(key_file)})
    assert cfg.api_key == SECRET
    assert cfg.api_key_file == str(key_file)


def test_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache" / "qwen-serve").mkdir(parents=True)
    (tmp_path / ".cache" / "qwen-serve" / "demo-key").write_text(SECRET + "\n")
    assert build({**BASE, "api_key_file": "~/.cache/qwen-serve/demo-key"}).api_key == SECRET


def test_missing_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(BenchConfigError) as info:
        build({**BASE, "api_key_file": str(tmp_path / "nope")})
    assert str(info.value) == f"api_key_file: cannot read {tmp_path / 'nope'}: No such file or directory"


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_names_the_field(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty"
    path.write_text(content)
    with pytest.raises(BenchConfigError, match=r"^api_key_file: .* is empty$"):
        build({**BASE, "api_key_file": str(path)})


def test_directory_or_unreadable_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(BenchConfigError, match=r"^api_key_file: cannot read "):
        build({**BASE, "api_key_file": str(tmp_path)})
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BenchConfigError, match=r"^api_key_file: .* is not UTF-8 text$"):
        build({**BASE, "api_key_file": str(path)})


def test_api_key_wins_and_the_file_is_not_read(tmp_path: Path) -> None:
    cfg = build({**BASE, "api_key": "qs-direct", "api_key_file": str(tmp_path / "missing")})
    assert cfg.api_key == "qs-direct"


def test_key_is_not_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert build(dict(BASE)).api_key is None


def test_result_json_holds_the_path_never_the_key(key_file: Path, tmp_path: Path) -> None:
    cfg = build({**BASE, "api_key_file": str(key_file), "engine_metrics": False, "progress": False})
    rec = RequestRecord(index=0, spec_index=0, scheduled=0.0, sent=0.0, end=0.5, status=200, input_tokens=3,
                        output_tokens=2, chunk_times=[0.1, 0.5], chunk_tokens=[1, 1], client_output_tokens=2)
    outcome = RunOutcome(config=cfg, specs=[RequestSpec(index=0, body={})], records=[rec], warmup=[],
                         duration_s=0.5, cpu_s=0.01, engine=None)
    result = build_result(outcome)
    assert result["config"]["api_key_file"] == str(key_file)
    assert "api_key" not in result["config"]
    path = write_result(tmp_path / "out", result)
    assert SECRET not in path.read_text()
    assert json.loads(path.read_text())["config"]["api_key_file"] == str(key_file)


# ------------------------------------------------------------------------------- command line


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("cmd", [["run"], ["sweep", "--rates", "1,2"],
                                 ["compare", "--target", "a=http://127.0.0.1:9", "--target", "b=http://127.0.0.1:10"]])
def test_flag_on_every_load_subcommand(cmd: list[str], key_file: Path) -> None:
    url = [] if cmd[0] == "compare" else ["--url", "http://127.0.0.1:9"]
    values, _ = _settings(_args(*cmd, *url, "--model", "m", "--num-requests", "2", "--api-key-file", str(key_file)))
    values.setdefault("url", "http://127.0.0.1:9")
    assert build(values).api_key == SECRET


def _scenario(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text("url: http://127.0.0.1:9\nmodel: m\nnum_requests: 2\n" + text)
    return path


def test_command_line_key_replaces_the_scenario_key_file(tmp_path: Path, key_file: Path) -> None:
    scenario = _scenario(tmp_path, f"api_key_file: {tmp_path / 'missing'}\n")
    values, _ = _settings(_args("run", "--scenario", str(scenario), "--api-key", "qs-flag"))
    assert build(values).api_key == "qs-flag"


def test_command_line_key_file_replaces_the_scenario_key(tmp_path: Path, key_file: Path) -> None:
    scenario = _scenario(tmp_path, "api-key: qs-scenario\n")
    values, _ = _settings(_args("run", "--scenario", str(scenario), "--api-key-file", str(key_file)))
    assert build(values).api_key == SECRET


def test_scenario_key_file_used_without_flags(tmp_path: Path, key_file: Path) -> None:
    scenario = _scenario(tmp_path, f"api-key-file: {key_file}\n")
    values, _ = _settings(_args("run", "--scenario", str(scenario)))
    assert build(values).api_key == SECRET


def test_cli_exits_2_with_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["bench", "run", "--url", "http://127.0.0.1:9", "--model", "m", "--num-requests", "1",
                     "--api-key-file", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qwen-serve bench: api_key_file: cannot read {tmp_path / 'missing'}: No such file or directory"]
    assert not (tmp_path / "out").exists()


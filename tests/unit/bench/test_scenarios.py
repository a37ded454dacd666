"""``benchmarks/scenarios/*.yaml``: every scenario loads through the real command line and config builder.

Each file's header carries a ``# usage: qwen-serve bench ...`` line; that command is parsed by the real
``qwen-serve`` parser, the scenario overlaid by its flags (``bench.cli._settings``) and built into a
:class:`RunConfig`, so a stale or misspelt key, a bad value or a usage line that no longer parses fails
here. ``demo.yaml`` must also point at what ``qwen-serve demo`` serves and writes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from qwen_serve import demo
from qwen_serve.bench.cli import _settings
from qwen_serve.bench.config import RunConfig, build, load_scenario
from qwen_serve.bench.sweep import plan_points
from qwen_serve.cli import _parser

REPO = Path(__file__).resolve().parents[3]
SCENARIOS = sorted((REPO / "benchmarks" / "scenarios").glob("*.yaml"))
DOC = REPO / "docs" / "bench.md"
KEY = "qs-scenario-test-key"
# Settings a subcommand takes besides RunConfig's.
OTHER = {"run": {"out"}, "sweep": {"out", "rates", "concurrencies", "points", "no_stop"},
         "compare": {"out", "targets", "rounds"}}


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A HOME holding the demo key where ``qwen-serve demo`` writes it, and a KEYFILE for the others."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("QWEN_SERVE_CACHE", raising=False)
    demo.write_demo_key(KEY)
    (tmp_path / "keyfile").write_text(KEY + "\n")
    monkeypatch.chdir(REPO)
    return tmp_path


def _usage(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("# usage: ")]
    assert len(lines) == 1, f"{path.name}: needs exactly one '# usage: qwen-serve bench ...' header line"
    argv = shlex.split(lines[0].removeprefix("# usage: "))
    assert argv[:2] == ["qwen-serve", "bench"] and argv[2] in OTHER, f"{path.name}: {lines[0]}"
    assert argv[argv.index("--scenario") + 1] == f"benchmarks/scenarios/{path.name}"
    return argv


def test_there_are_scenarios() -> None:
    names = {p.name for p in SCENARIOS}
    assert {"demo.yaml", "chat-poisson.yaml", "prefix-multiturn.yaml", "long-context.yaml", "guided-json.yaml",
            "saturation-sweep.yaml"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_has_a_comment_header(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# {path.name}: "), f"{path.name}: first line should be '# {path.name}: what it is'"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_usage_line_builds(path: Path, home: Path) -> None:
    argv = _usage(path)
    cmd = argv[2]
    args = _parser().parse_args([a.replace("KEYFILE", str(home / "keyfile")) for a in argv[1:]])
    values, other = _settings(args)
    assert set(other) <= OTHER[cmd], f"{path.name}: keys {sorted(set(other) - OTHER[cmd])} do nothing for bench {cmd}"
    cfg = build(values)
    assert cfg.api_key == KEY
    if cmd == "sweep":
        if other.get("points") is None:
            for key in ("rates", "concurrencies"):
                assert isinstance(other.get(key) or [], list), f"{path.name}: {key} must be a YAML list"
            assert plan_points(cfg, rates=other.get("rates") or (), concurrencies=other.get("concurrencies") or ())
        else:
            assert isinstance(other["points"], int) and other["points"] >= 2


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_builds_with_only_url_and_model_added(path: Path, home: Path) -> None:
    values = load_scenario(path)
    for key in OTHER["sweep"] | OTHER["compare"]:
        values.pop(key, None)
    values.setdefault("url", "http://127.0.0.1:8080")
    values.setdefault("model", "m")
    assert isinstance(build(values), RunConfig)


def test_demo_scenario_matches_the_demo(home: Path) -> None:
    values = load_scenario(REPO / "benchmarks" / "scenarios" / "demo.yaml")
    assert values["url"] == demo.DEMO_URL
    assert values["model"] == demo.SMOLLM2_NAME
    assert Path(values["api_key_file"]).expanduser() == demo.demo_key_path()
    cfg = build(values)
    assert cfg.api_key == KEY
    # Small enough to finish in a minute or two on two CPU cores.
    assert cfg.num_requests is not None and cfg.num_requests <= 50 and cfg.output_len <= 64
    assert cfg.input_len is not None and cfg.input_len + cfg.output_len <= 2048  # the demo's max_model_len


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_is_in_the_docs(path: Path) -> None:
    assert f"`{path.name}`" in DOC.read_text(), f"docs/bench.md does not mention {path.name}"

"""Config loading: every problem is one ``key.path: problem`` line (the command exits 2 with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwen_serve.config import load_config, parse_config
from qwen_serve.errors import ConfigError


def error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_defaults() -> None:
    c = parse_config({"model": {"source": "Qwen/Qwen2.5-7B-Instruct"}})
    assert c.engine.tensor_parallel_size == "auto" and c.engine.gpus == 4
    assert c.model.name == "Qwen/Qwen2.5-7B-Instruct"
    assert c.gateway.port == 8080 and c.engine.port == 8001


def test_model_revision() -> None:
    assert parse_config({"model": {"source": "m"}}).model.revision is None
    c = parse_config({"model": {"source": "m", "revision": "0123abcd"}})
    assert c.model.revision == "0123abcd"
    assert error({"model": {"source": "m", "revision": 123}}) == "model.revision: must be a string"


def test_unknown_key_names_its_path() -> None:
    assert error({"model": {"source": "m"}, "engine": {"gpuz": 4}}) == "engine.gpuz: unknown key"
    assert error({"model": {"source": "m"}, "modle": {}}) == "modle: unknown key"


@pytest.mark.parametrize("gpus", [-1, 0])
def test_gpus_must_be_positive(gpus: int) -> None:
    assert error({"model": {"source": "m"}, "engine": {"gpus": gpus}}) == "engine.gpus: must be a positive integer"


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        ("engine", "gpus", "four", "must be an integer"),
        ("model", "tool_calling", "maybe", "must be true or false"),
        ("engine", "extra_args", "--foo", "must be a list"),
        ("engine", "device", "tpu", "must be one of"),
        ("engine", "gpu_memory_utilization", 1.5, "must be <= 1"),
    ],
)
def test_wrong_type_names_its_path(section: str, key: str, value: Any, problem: str) -> None:
    data: dict[str, Any] = {"model": {"source": "m"}, section: {key: value}}
    if section == "model":
        data["model"]["source"] = "m"
    assert error(data).startswith(f"{section}.{key}: {problem}")


@pytest.mark.parametrize("value", ["big", 0, 2.5])
def test_auto_or_int_names_only_the_key(value: Any) -> None:
    message = error({"model": {"source": "m"}, "engine": {"tensor_parallel_size": value}})
    assert message.startswith("engine.tensor_parallel_size: must be one of 'auto' or ")
    assert message.count("engine.") == 1  # the union's member names never leak into the path


def test_missing_source() -> None:
    assert error({"model": {"served_name": "x"}}) == "model.source: required key is missing"
    assert error({}) == "model: required key is missing"


def test_top_level_must_be_a_mapping() -> None:
    assert error(["model"]) == "config: top level must be a mapping"


def test_invalid_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:.* invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_load_sets_base_dir(tmp_path: Path) -> None:
    path = tmp_path / "qs.yaml"
    path.write_text("model:\n  source: ./models/tiny\nengine:\n  tensor_parallel_size: 2\n")
    c = load_config(path)
    assert c.engine.tensor_parallel_size == 2
    assert c.resolve_path("./models/tiny") == tmp_path.resolve() / "models" / "tiny"


def test_metrics_port_defaults_to_the_main_port_and_a_one_second_engine_cache() -> None:
    gw = parse_config({"model": {"source": "m"}}).gateway
    assert gw.metrics_port is None and gw.engine_metrics_cache_s == 1.0
    gw = parse_config({"model": {"source": "m"}, "gateway": {"metrics_port": 9090, "engine_metrics_cache_s": 0}}).gateway
    assert gw.metrics_port == 9090 and gw.engine_metrics_cache_s == 0


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"metrics_port": 8080}, "gateway.metrics_port: must differ from gateway.port"),
        ({"port": 9000, "metrics_port": 9000}, "gateway.metrics_port: must differ from gateway.port"),
        ({"metrics_port": 0}, "gateway.metrics_port: must be >= 1"),
        ({"metrics_port": 65536}, "gateway.metrics_port: must be <= 65535"),
        ({"metrics_port": "metrics"}, "gateway.metrics_port: must be an integer"),
        ({"metrics_port": True}, "gateway.metrics_port: must be an integer"),
        ({"engine_metrics_cache_s": -1}, "gateway.engine_metrics_cache_s: must be >= 0"),
    ],
)
def test_bad_metrics_settings_name_their_key(gateway: dict[str, Any], message: str) -> None:
    assert error({"model": {"source": "m"}, "gateway": gateway}).startswith(message)

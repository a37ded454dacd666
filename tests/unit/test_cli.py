"""``qwen-serve`` exits 2 with one line naming the problem (contract §1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen_serve", *args], capture_output=True, text=True, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_tp_that_does_not_divide_heads() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-7b-instruct", "--tensor-parallel-size", "3"))
    assert "tensor_parallel_size" in line and "28" in line


def test_tp4_impossible_for_half_b() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-0.5b-instruct", "--tensor-parallel-size", "4"))
    assert "tensor_parallel_size" in line and "14" in line


def test_negative_gpu_count() -> None:
    line = _one_line_error(run_cli("plan", "--model", "qwen2.5-7b-instruct", "--gpus", "-1"))
    assert line == "qwen-serve: engine.gpus: must be a positive integer"


def test_unknown_key_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  source: qwen2.5-7b-instruct\nengine:\n  gpuz: 4\n")
    line = _one_line_error(run_cli("plan", "--config", str(cfg)))
    assert "engine.gpuz" in line and "unknown key" in line


@pytest.mark.parametrize("cmd", [["up", "--config"], ["gateway", "--config"]])
def test_up_and_gateway_refuse_bad_config(tmp_path: Path, cmd: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  source: x\ngateway:\n  port: -5\n")
    line = _one_line_error(run_cli(*cmd, str(cfg)))
    assert "gateway.port" in line


def test_plan_json_has_contract_keys() -> None:
    proc = run_cli("plan", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--gpus", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    for key in ("model", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
                "native_context", "max_model_len", "tensor_parallel_size", "data_parallel_size", "rope_scaling",
                "param_count", "weights_bytes_per_gpu", "kv_cache_bytes_per_token", "kv_cache_tokens_per_replica",
                "max_full_context_sequences_per_replica", "vllm_args", "warnings"):
        assert key in plan, key
    assert (plan["tensor_parallel_size"], plan["data_parallel_size"]) == (1, 4)
    assert plan["rope_scaling"] is None


def test_plan_7b_128k_uses_yarn() -> None:
    proc = run_cli("plan", "--model", "qwen2.5-7b-instruct", "--max-model-len", "131072", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "--hf-overrides" in plan["vllm_args"]
    assert plan["vllm_args"][plan["vllm_args"].index("--host") + 1] == "127.0.0.1"


def test_keys_cli_create_then_revoke(tmp_path: Path) -> None:
    import re

    import yaml

    keys = tmp_path / "keys.yaml"
    created = run_cli("keys", "create", "--file", str(keys), "--id", "team-a", "--models", "qwen2.5-*", "--rpm", "60")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert re.fullmatch(r"qs-[A-Za-z0-9_-]{43}", secret)
    assert secret not in keys.read_text()  # only the hash is stored
    entry = yaml.safe_load(keys.read_text())["keys"][0]
    assert entry["id"] == "team-a" and entry["models"] == ["qwen2.5-*"] and entry["rpm"] == 60
    revoked = run_cli("keys", "revoke", "--file", str(keys), "--id", "team-a")
    assert revoked.returncode == 0, revoked.stderr
    assert yaml.safe_load(keys.read_text())["keys"][0]["disabled"] is True


def test_keys_cli_unknown_id_is_a_one_line_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    assert run_cli("keys", "create", "--file", str(keys), "--id", "a").returncode == 0
    line = _one_line_error(run_cli("keys", "revoke", "--file", str(keys), "--id", "nope"))
    assert "nope" in line
